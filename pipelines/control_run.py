"""ControlNet in a diffusers call: the job's pipeline made a ControlNet pipeline, the call's control arguments,
and A1111's control modes (engine side: torch; the planning is pipelines/control_plan.py).

- weight -> `controlnet_conditioning_scale`; guidance start/end -> `control_guidance_start/end` (fractions of
  the steps, as A1111's);
- "ControlNet is more important" -> diffusers' `guess_mode`: the control only on the conditional half of
  classifier-free guidance, its outputs scaled up through the layers (10^-1 ... 1: A1111's 0.825^(12-i) for
  SD's 13 outputs, to within 1%). diffusers has one guess mode per call: with units of mixed modes, it is used
  only when every unit asks for it (a warning says so otherwise);
- "My prompt is more important" -> the same scaling through the layers on both halves (A1111's soft
  injection without its cfg injection), applied to that unit's outputs by a forward hook for the call;
- hires fix: a unit applies to both passes unless its `hr_option` says "Low res only" or "High res only"; the
  maps of the second pass are resized to its size.
"""

import contextlib
import inspect
from collections.abc import Iterator

from PIL import Image

from pipelines.controlnets import ControlNetLibrary
from pipelines.models import LoadedModel, with_controlnet
from pipelines.prepare import PreparedJob

PROMPT_FIRST = "My prompt is more important"
CONTROL_FIRST = "ControlNet is more important"


def active_units(job: PreparedJob, hires_pass: bool) -> list[int]:
    """The units that apply to a pass (the first pass, or the hires fix's second)."""
    skipped = "Low res only" if hires_pass else "High res only"
    return [index for index, control in enumerate(job.controls) if control.hr_option != skipped]


def controlled(loaded: LoadedModel, pipe, job: PreparedJob, library: ControlNetLibrary, hires_pass: bool = False):
    """(the pipeline for this pass, its ControlNet models in unit order): the ControlNet pipeline when units
    apply to the pass, else `pipe` and none."""
    units = active_units(job, hires_pass)
    if not units:
        return pipe, []
    models = [library.load(job.controls[index].model, loaded.pipe.unet) for index in units]
    return with_controlnet(pipe, models), models


def control_arguments(pipe, jobs: list[PreparedJob], hires_pass: bool, width: int, height: int,
                      warnings: list[str]) -> dict:  # fmt: skip
    """The ControlNet arguments of the batch's call: each job's own maps (stacked per unit), and the units'
    weights, guidance windows and mode."""
    units = active_units(jobs[0], hires_pass)
    controls = [jobs[0].controls[index] for index in units]
    # One unit: a map per job; several: per job, a map per unit (diffusers' layout for a MultiControlNetModel).
    per_job = [[_sized(job.controls[index].image, width, height) for index in units] for job in jobs]
    modes = {control.control_mode for control in controls}
    guess_mode = modes == {CONTROL_FIRST}
    if CONTROL_FIRST in modes and not guess_mode:
        warnings.append(f"ControlNet: '{CONTROL_FIRST}' applies only when every unit of the job asks for it (one "
                        "guess mode per diffusers call); its unit ran as 'Balanced'")  # fmt: skip
    single = len(controls) == 1
    takes_control_image = "control_image" in _parameters(pipe)  # img2img and inpainting: `image` is the input
    return {
        "control_image" if takes_control_image else "image": [maps[0] for maps in per_job] if single else per_job,
        "controlnet_conditioning_scale": controls[0].weight if single else [c.weight for c in controls],
        "control_guidance_start": [c.guidance_start for c in controls],
        "control_guidance_end": [c.guidance_end for c in controls],
        "guess_mode": guess_mode,
    }


@contextlib.contextmanager
def soft_injection(pipe, jobs: list[PreparedJob], hires_pass: bool) -> Iterator[None]:
    """ "My prompt is more important": each such unit's outputs scaled 0.825^(n-1-i) through its n layers for
    the block (hooks removed after, however it ends: the ControlNets are shared with later jobs)."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        yield
        return
    models = list(getattr(controlnet, "nets", [controlnet]))
    units = active_units(jobs[0], hires_pass)
    handles = [model.register_forward_hook(_scale_outputs) for model, index in zip(models, units, strict=True)
               if jobs[0].controls[index].control_mode == PROMPT_FIRST]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scale_outputs(module, args, output):
    down, mid = output[0], output[1]
    count = len(down) + 1
    scaled = [sample * (0.825 ** float(count - 1 - index)) for index, sample in enumerate(down)]
    return (scaled, mid, *output[2:]) if isinstance(output, tuple) else type(output)(scaled, mid)


def _sized(control_map: Image.Image, width: int, height: int) -> Image.Image:
    return (
        control_map
        if control_map.size == (width, height)
        else control_map.resize((width, height), Image.Resampling.LANCZOS)
    )


def _parameters(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)
