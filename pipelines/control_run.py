"""ControlNet in a diffusers call: the job's pipeline made a ControlNet pipeline, the call's control arguments,
and A1111's control modes (engine side: torch; the planning is pipelines/control_plan.py).

- weight -> `controlnet_conditioning_scale`; guidance start/end -> `control_guidance_start/end` (fractions of
  the steps, as A1111's);
- "ControlNet is more important" -> diffusers' `guess_mode`: the control only on the conditional half of
  classifier-free guidance, its outputs scaled up through the layers (10^-1 ... 1: A1111's 0.825^(12-i) for
  SD's 13 outputs, to within 1%). diffusers has one guess mode per call: with units of mixed modes, it is used
  only when every unit asks for it (a warning says so otherwise);
- "My prompt is more important" -> A1111's soft injection (output i x 0.825^(12-i)) on both halves, by a forward
  hook on that unit's own copy of its ControlNet; in the hires fix's second pass every unit gets it, as in A1111;
- hires fix: a unit applies to both passes unless its `hr_option` says "Low res only" or "High res only"; the
  maps of the second pass are resized to its size. Without hires fix every unit applies.
"""

import copy
import inspect
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from pipelines.control_plan import control_units
from pipelines.controlnets import ControlNetLibrary
from pipelines.models import LoadedModel, with_controlnet
from pipelines.prepare import PreparedJob

PROMPT_FIRST = "My prompt is more important"
CONTROL_FIRST = "ControlNet is more important"
SOFT_BASE, SOFT_LAYERS = 0.825, 13  # A1111's soft injection: output i (down blocks, then mid) x 0.825^(12-i)


def applies_to_pass(job: PreparedJob, index: int, hires_pass: bool) -> bool:
    """Whether a unit applies to a pass: without hires fix, every unit does (as A1111, whatever `hr_option`
    says); with it, those of the first pass or of the second."""
    if job.hires is None:
        return True
    return job.controls[index].hr_option != ("Low res only" if hires_pass else "High res only")


def active_units(job: PreparedJob, hires_pass: bool) -> list[int]:
    """The ControlNet units that apply to a pass."""
    return [index for index in control_units(job.controls) if applies_to_pass(job, index, hires_pass)]


def controlled(loaded: LoadedModel, pipe, job: PreparedJob, library: ControlNetLibrary, hires_pass: bool = False):
    """The pipeline for this pass: the ControlNet pipeline when units apply to it, else `pipe`. Each unit gets
    a shallow copy of its (cached, shared) ControlNet, with hooks of its own: two units may use one model, and
    one's soft injection must not reach the other, nor a later job."""
    units = active_units(job, hires_pass)
    if not units:
        return pipe
    models = []
    for index in units:
        own = copy.copy(library.load(job.controls[index].model, loaded.pipe.unet))  # shares the weights
        own._forward_hooks, own._forward_hooks_with_kwargs = OrderedDict(), OrderedDict()
        own._forward_hooks_always_called = OrderedDict()
        if job.controls[index].control_mode == PROMPT_FIRST or hires_pass:  # A1111: all units in the hires pass
            own.register_forward_hook(_soft_injection)
        models.append(own)
    return with_controlnet(pipe, loaded.entry.family, models)


def control_arguments(pipe, jobs: list[PreparedJob], hires_pass: bool, width: int, height: int,
                      warnings: list[str]) -> dict:  # fmt: skip
    """The ControlNet arguments of the batch's call: each job's own maps, and the units' weights, guidance
    windows and mode. One unit: a map per job. Several: per unit, the jobs' maps as one (batch, 3, H, W) tensor
    in [0, 1], the layout every diffusers ControlNet pipeline reads for a MultiControlNetModel."""
    units = active_units(jobs[0], hires_pass)
    controls = [jobs[0].controls[index] for index in units]
    modes = {control.control_mode for control in controls}
    guess_mode = modes == {CONTROL_FIRST}
    if CONTROL_FIRST in modes and not guess_mode:
        warnings.append(f"ControlNet: '{CONTROL_FIRST}' applies only when every unit of the job asks for it (one "
                        "guess mode per diffusers call); its unit ran as 'Balanced'")  # fmt: skip
    single = len(controls) == 1
    if single:
        maps = [_sized(job.controls[units[0]].image, width, height) for job in jobs]
    else:
        maps = [torch.stack([_tensor(_sized(job.controls[index].image, width, height)) for job in jobs])
                for index in units]  # fmt: skip
    takes_control_image = "control_image" in _parameters(pipe)  # img2img and inpainting: `image` is the input
    weights, starts, ends = zip(*(control.call_settings() for control in controls), strict=True)
    return {
        "control_image" if takes_control_image else "image": maps,
        "controlnet_conditioning_scale": weights[0] if single else list(weights),
        "control_guidance_start": list(starts),
        "control_guidance_end": list(ends),
        "guess_mode": guess_mode,
    }


def _soft_injection(module, args, output):
    """A1111's soft injection on one ControlNet's outputs (SDXL's 10 outputs take the first 10 scales, its mid
    block 0.825^3, as A1111 zips them)."""
    down, mid = output[0], output[1]
    scales = [SOFT_BASE ** float(SOFT_LAYERS - 1 - index) for index in range(len(down) + 1)]
    scaled = [sample * scale for sample, scale in zip(down, scales, strict=False)]
    mid = mid * scales[len(down)]
    return (scaled, mid, *output[2:]) if isinstance(output, tuple) else type(output)(scaled, mid)


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _sized(control_map: Image.Image, width: int, height: int) -> Image.Image:
    if control_map.size == (width, height):
        return control_map
    return control_map.resize((width, height), Image.Resampling.LANCZOS)


def _parameters(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)
