"""IP-Adapter in a diffusers call (engine side: torch; the planning is pipelines/control_plan.py).

- The job's adapters are loaded into the model's UNet with diffusers' `load_ip_adapter` (from the cached
  state dicts) for the job only: `LoadedModel.ip_adapters_loaded` puts the UNet's attention processors back
  after, so no job's adapter reaches another's images.
- The reference images are read by the unit's CLIP image encoder here, and their features go to the call as
  `ip_adapter_image_embeds`. diffusers' pipelines repeat those features for every prompt of the call (a row per
  job would be folded into its neighbours' attention), so jobs share a call only with the same references
  (`IpAdapterPlan.batch_key`): the first job's features are the batch's.
- weight -> the adapter's scale; guidance start/end as diffusers' ControlNet windows them (a step i of n
  applies when i/n >= start and (i+1)/n <= end): the scales are set before the call and from its step
  callback (`ScaleSchedule`); with hires fix a unit applies to the passes its `hr_option` names. Control
  modes do not apply to IP-Adapter units (as in the extension, which has none for them).
"""

from dataclasses import dataclass

import torch

from pipelines.control_plan import IpAdapterPlan, ip_adapter_units
from pipelines.control_run import applies_to_pass
from pipelines.devices import execution_device
from pipelines.ipadapters import IpAdapterLibrary
from pipelines.prepare import PreparedJob


@dataclass
class IpAdapterFeatures:
    """A batch's IP-Adapter units, ready for its calls: per unit, the reference images' features and the
    unconditional ones, (1, images, ...) each (diffusers repeats them for each prompt)."""

    units: list[int]
    positive: list[torch.Tensor]
    negative: list[torch.Tensor]

    def call_arguments(self, guidance: bool) -> dict:
        """`ip_adapter_image_embeds` as the pipelines read it: per adapter, [unconditional; conditional] rows
        under classifier-free guidance, else the conditional rows."""
        embeds = [torch.cat([negative, positive]) if guidance else positive
                  for positive, negative in zip(self.positive, self.negative, strict=True)]  # fmt: skip
        return {"ip_adapter_image_embeds": embeds}


def adapters_of(jobs: list[PreparedJob], library: IpAdapterLibrary) -> list[dict]:
    """The state dicts of the batch's adapters, in unit order (equal in a batch), for `load_ip_adapter`."""
    return [library.state_dict(jobs[0].controls[index].model) for index in ip_adapter_units(jobs[0].controls)]


def encode_references(jobs: list[PreparedJob], library: IpAdapterLibrary, unet) -> IpAdapterFeatures | None:
    """The batch's reference images through its units' encoders (equal for every job of a batch), on the
    UNet's device and in its precision; None when it has no IP-Adapter unit."""
    units = ip_adapter_units(jobs[0].controls)
    if not units:
        return None
    device, dtype = execution_device(unet), unet.dtype
    positive, negative = [], []
    for index in units:
        plan: IpAdapterPlan = jobs[0].controls[index]
        features, unconditional = library.encode(plan.encoder, plan.model, list(plan.images), device, dtype)
        positive.append(features[None])
        negative.append(unconditional[None])
    return IpAdapterFeatures(units, positive, negative)


class ScaleSchedule:
    """Each adapter's scale per step of a call: its weight on the steps of its window in a pass it applies to,
    else 0 (an adapter at 0 adds nothing: the pixels of no adapter). Set before the call for its first step and
    from the step callback for the next ones (not by a hook on the UNet, which torch.compile would trace)."""

    def __init__(self, pipe, job: PreparedJob, features: IpAdapterFeatures, hires_pass: bool):
        self.pipe = pipe
        self.units = [job.controls[index] for index in features.units]
        self.in_pass = [applies_to_pass(job, index, hires_pass) for index in features.units]
        self.current: list[float] | None = None

    def set_for(self, step: int, total: int) -> None:
        """`total`: the call's steps (before its first step, its `num_inference_steps`: an img2img call runs
        fewer, so a window ending before the first step's end is judged by that count)."""
        total = max(int(total or 1), 1)
        scales = []
        for unit, applies in zip(self.units, self.in_pass, strict=True):
            weight, start, end = unit.call_settings()
            inside = step / total >= start and (step + 1) / total <= end
            scales.append(weight if applies and inside else 0.0)
        if scales != self.current:
            self.pipe.set_ip_adapter_scale(scales)
            self.current = scales
