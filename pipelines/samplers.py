"""A1111 sampler names and schedule types -> a diffusers scheduler.

`SAMPLERS` is the one table of the mapping. Where diffusers has no exact equivalent of an A1111 sampler
the closest scheduler is used and `approximation` says what differs; that sentence is added to the job's
warnings. Every job gets its own scheduler instance (schedulers hold per-run state).
"""

import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.errors import UnknownSamplerError

if TYPE_CHECKING:
    from pipelines.families import ModelFamily

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_class: str  # a class in `diffusers`
    options: dict = field(default_factory=dict)  # constructor arguments on top of the model's config
    default_schedule: str = "automatic"  # A1111's schedule for "Automatic"; "automatic" = the sampler's own
    approximation: str | None = None  # None when diffusers implements the same sampler
    aliases: tuple[str, ...] = ()  # A1111's alternative names (`k_...`)
    schedules: tuple[str, ...] | None = None  # the schedule types it can run; None: every one of its family's


# A1111 v1.10 sampler (without schedule) -> diffusers. Order = A1111's `GET /samplers` order.
SAMPLERS: dict[str, SamplerSpec] = {
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler", {}, "karras", aliases=("k_dpmpp_2m",)),
    "DPM++ SDE": SamplerSpec("DPMSolverSDEScheduler", {}, "karras", aliases=("k_dpmpp_sde",)),
    "DPM++ 2M SDE": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
        "exponential",
        aliases=("k_dpmpp_2m_sde",),
    ),  # fmt: skip
    "DPM++ 2M SDE Heun": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        "exponential",
        aliases=("k_dpmpp_2m_sde_heun",),
    ),  # fmt: skip
    "DPM++ 2S a": SamplerSpec(
        "DPMSolverSinglestepScheduler",
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        "karras",
        approximation="diffusers has no ancestral DPM++ 2S; using the single-step DPM-Solver++ (order 2, SDE "
        "variant), which is close but not identical",
        aliases=("k_dpmpp_2s_a",),
    ),  # fmt: skip
    "DPM++ 3M SDE": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        "exponential",
        aliases=("k_dpmpp_3m_sde",),
    ),  # fmt: skip
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral")),
    "Euler": SamplerSpec("EulerDiscreteScheduler", aliases=("k_euler",)),
    "LMS": SamplerSpec("LMSDiscreteScheduler", aliases=("k_lms",)),
    "Heun": SamplerSpec("HeunDiscreteScheduler", aliases=("k_heun",)),
    "DPM2": SamplerSpec("KDPM2DiscreteScheduler", {}, "karras", aliases=("k_dpm_2",)),
    "DPM2 a": SamplerSpec("KDPM2AncestralDiscreteScheduler", {}, "karras", aliases=("k_dpm_2_a",)),
    "DPM fast": SamplerSpec(
        "DPMSolverSinglestepScheduler",
        {"solver_order": 3, "algorithm_type": "dpmsolver++"},
        approximation="diffusers has no DPM fast; using the single-step DPM-Solver++ (order 3), the same "
        "solver family without k-diffusion's fast step schedule",
        aliases=("k_dpm_fast",),
    ),  # fmt: skip
    "DPM adaptive": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {},
        approximation="diffusers has no adaptive-step DPM solver; using DPM++ 2M with the requested number of steps",
        aliases=("k_dpm_ad",),
    ),  # fmt: skip
    "Restart": SamplerSpec(
        "HeunDiscreteScheduler",
        {},
        "karras",
        approximation="diffusers has no Restart sampler; using Heun, the solver Restart is built on, "
        "without the restart noise",
        aliases=("restart",),
    ),  # fmt: skip
    "DDIM": SamplerSpec("DDIMScheduler", aliases=("ddim",)),
    "DDIM CFG++": SamplerSpec(
        "DDIMScheduler",
        approximation="diffusers has no CFG++ guidance; using plain DDIM",
        aliases=("ddim_cfgpp",),
    ),  # fmt: skip
    "PLMS": SamplerSpec("PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms",)),
    "UniPC": SamplerSpec("UniPCMultistepScheduler", aliases=("unipc",)),
    "LCM": SamplerSpec("LCMScheduler", aliases=("lcm",)),
}

# Flow-matching models (FLUX.1, SD 3.5): the samplers that run on flow sigmas, and Forge's schedule types for
# them (Simple: the model's own shifted sigmas, the default). Ancestral and SDE samplers are not here: their noise
# does not follow each job's seed in a batch. A family module takes the ones its pipeline can run.
FLOW_PREDICTION = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SAMPLERS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("FlowMatchEulerDiscreteScheduler", default_schedule="simple", aliases=("k_euler",)),
    "Heun": SamplerSpec(
        "FlowMatchHeunDiscreteScheduler", default_schedule="simple", aliases=("k_heun",), schedules=("simple",)
    ),  # fmt: skip
    "DPM++ 2M": SamplerSpec(
        "DPMSolverMultistepScheduler", FLOW_PREDICTION, "simple", aliases=("k_dpmpp_2m",), schedules=("simple",)
    ),  # fmt: skip
    "UniPC": SamplerSpec(
        "UniPCMultistepScheduler", FLOW_PREDICTION, "simple", aliases=("unipc",), schedules=("simple",)
    ),  # fmt: skip
}


# The seed API's names, in its order (old A1111 names with the schedule in the name). Listed first.
SEED_SAMPLER_NAMES = [
    "Euler", "Euler a", "Heun", "DPM2", "DPM++ 2S a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE",
    "DPM++ SDE Karras", "DPM fast", "DPM adaptive", "LMS", "LMS Karras", "DDIM", "PLMS", "UniPC",
]  # fmt: skip


@dataclass(frozen=True)
class ScheduleSpec:
    label: str  # A1111's label, written to the infotext's `Schedule type`
    options: dict = field(default_factory=dict)
    approximation: str | None = None


# A1111 schedule type name -> diffusers flags.
SCHEDULES: dict[str, ScheduleSpec] = {
    "automatic": ScheduleSpec("Automatic"),
    "uniform": ScheduleSpec("Uniform", {"timestep_spacing": "linspace"}),
    "karras": ScheduleSpec("Karras", {"use_karras_sigmas": True}),
    "exponential": ScheduleSpec("Exponential", {"use_exponential_sigmas": True}),
    "polyexponential": ScheduleSpec(
        "Polyexponential",
        {"use_exponential_sigmas": True},
        approximation="diffusers has no polyexponential schedule; using the exponential one",
    ),  # fmt: skip
    "sgm_uniform": ScheduleSpec("SGM Uniform", {"timestep_spacing": "trailing"}),
    "kl_optimal": ScheduleSpec(
        "KL Optimal", {}, approximation="diffusers has no KL Optimal schedule; using the model's default"
    ),
    "align_your_steps": ScheduleSpec(
        "Align Your Steps",
        {},
        approximation="Align Your Steps is not applied; using the model's default schedule",
    ),
    "simple": ScheduleSpec("Simple", {"timestep_spacing": "trailing"}),
    "normal": ScheduleSpec("Normal", {"timestep_spacing": "linspace"}),
    "ddim": ScheduleSpec("DDIM", {"timestep_spacing": "leading"}),
    "beta": ScheduleSpec("Beta", {"use_beta_sigmas": True}),
}
FLOW_SCHEDULES: dict[str, ScheduleSpec] = {
    "automatic": ScheduleSpec("Automatic"),
    "simple": ScheduleSpec("Simple"),
    "karras": ScheduleSpec("Karras", {"use_karras_sigmas": True}),
    "exponential": ScheduleSpec("Exponential", {"use_exponential_sigmas": True}),
    "beta": ScheduleSpec("Beta", {"use_beta_sigmas": True}),
}
# The seed API's `scheduler_type` values that are not A1111 names.
SEED_SCHEDULE_ALIASES = {"default": "automatic", "pndm": "ddim", "sgmuniform": "sgm_uniform"}
SEED_SCHEDULER_TYPES = ["default", "karras", "exponential", "ddim", "pndm"]


def sampler_names() -> list[str]:
    """Every accepted sampler name for listings: the seed's names, then A1111's current ones."""
    return list(dict.fromkeys(SEED_SAMPLER_NAMES + list(SAMPLERS)))


def schedule_type_names() -> list[str]:
    """Every accepted schedule type for listings: the seed's values, then A1111's names."""
    return list(dict.fromkeys(SEED_SCHEDULER_TYPES + list(SCHEDULES)))


# A1111's names from before the schedule type was a field of its own (v1.5 to v1.9): the schedule is in the name.
LEGACY_SAMPLER_NAMES = [
    "DPM++ 2M Karras", "DPM++ SDE Karras", "DPM++ 2M SDE Exponential", "DPM++ 2M SDE Karras",
    "DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun Exponential", "DPM++ 3M SDE Karras", "DPM++ 3M SDE Exponential",
    "DPM2 Karras", "DPM2 a Karras", "DPM++ 2S a Karras", "LMS Karras",
]  # fmt: skip


def accepted_sampler_names() -> list[str]:
    """Every value `sampler_name` takes, exactly as written (the API schema's enum): the listed names, A1111's
    older names with the schedule in them and k-diffusion's aliases."""
    aliases = [alias for spec in SAMPLERS.values() for alias in spec.aliases]
    return list(dict.fromkeys(sampler_names() + LEGACY_SAMPLER_NAMES + aliases))


def accepted_schedule_types() -> list[str]:
    """Every value `scheduler_type` takes, exactly as written (the API schema's enum): the listed values and
    A1111's labels."""
    return list(dict.fromkeys(schedule_type_names() + [spec.label for spec in SCHEDULES.values()]))


def _schedule_key(value: str, schedules: dict[str, "ScheduleSpec"]) -> str | None:
    wanted = value.strip().lower()
    wanted = SEED_SCHEDULE_ALIASES.get(wanted, wanted)
    for key, spec in schedules.items():
        if wanted in (key, spec.label.lower(), spec.label.lower().replace(" ", "")):
            return key
    return None


def sampler_key(value: str) -> str | None:
    """The A1111 sampler a plain name or alias names (`k_euler` -> Euler); None for a name with a schedule in it
    (`DPM++ 2M Karras`) or an unknown one."""
    return _sampler_key(value, SAMPLERS)


def _sampler_key(value: str, samplers: dict[str, SamplerSpec]) -> str | None:
    wanted = value.strip().lower()
    for name, spec in samplers.items():
        if wanted == name.lower() or wanted in spec.aliases:
            return name
    return None


# Schedulers whose noise is drawn once per diffusers call rather than per image from each job's generator
# (DPM++ SDE's Brownian tree is seeded from the first generator only): a job batched with others would not
# get its own seed's image, so jobs on these never share a batch.
SCHEDULERS_WITH_NOISE_PER_CALL = frozenset({"DPMSolverSDEScheduler"})


@dataclass
class ResolvedSampler:
    """What a job runs: the diffusers class and options, plus the A1111 names for its infotext."""

    sampler: str  # A1111 sampler name without the schedule, e.g. "DPM++ 2M"
    schedule_label: str  # A1111 label, e.g. "Karras"; "Automatic" when the sampler's own schedule runs
    scheduler_class: str
    options: dict
    warnings: list[str]


def resolve_sampler(sampler_name: str | None, schedule_type: str | None,
                    family: "ModelFamily | None" = None) -> ResolvedSampler:  # fmt: skip
    """Parses a sampler (old names like `DPM++ 2M Karras` too) and an optional schedule type, among the ones
    `family` runs (its own tables where it has them, as FLUX.1's flow-matching samplers; else this module's).

    An explicit schedule type wins over one written in the sampler name, as in A1111.
    """
    samplers = family.samplers if family is not None and family.samplers is not None else SAMPLERS
    schedules = family.schedules if family is not None and family.schedules is not None else SCHEDULES
    of_family = f" for {family.label} models" if family is not None and family.samplers is not None else ""
    raw = (sampler_name or "DPM++ 2M").strip()
    sampler = _sampler_key(raw, samplers)
    schedule_in_name = None
    if sampler is None:  # old style: "<sampler> <schedule>"
        for key, spec in schedules.items():
            for suffix in (spec.label, key):
                if raw.lower().endswith(" " + suffix.lower()):
                    sampler = _sampler_key(raw[: -len(suffix) - 1], samplers)
                    if sampler:
                        schedule_in_name = key
                        break
            if sampler:
                break
    if sampler is None:
        valid = list(samplers) if samplers is not SAMPLERS else sampler_names()
        raise UnknownSamplerError(f"unknown sampler_name {raw!r}{of_family}; valid: {', '.join(valid)}",
                                  field="sampler_name")  # fmt: skip
    schedule = "automatic"
    if schedule_type is not None and schedule_type.strip():
        key = _schedule_key(schedule_type, schedules)
        if key is None:
            valid = [spec.label for spec in schedules.values()] if schedules is not SCHEDULES else schedule_type_names()
            raise UnknownSamplerError(
                f"unknown scheduler_type {schedule_type!r}{of_family}; valid: {', '.join(valid)}",
                field="scheduler_type",
            )
        schedule = key
    if schedule == "automatic" and schedule_in_name:
        schedule = schedule_in_name

    spec = samplers[sampler]
    warnings = []
    if spec.approximation:
        warnings.append(f"Sampler '{sampler}': {spec.approximation}.")
    effective = spec.default_schedule if schedule == "automatic" else schedule
    if spec.schedules is not None and effective not in spec.schedules:
        warnings.append(f"Schedule type '{schedules[effective].label}' is not available for sampler '{sampler}'; "
                        f"'{schedules[spec.schedules[0]].label}' was used.")  # fmt: skip
        effective = spec.schedules[0]
    schedule_spec = schedules[effective]
    if schedule_spec.approximation:
        warnings.append(f"Schedule type '{schedule_spec.label}': {schedule_spec.approximation}.")
    return ResolvedSampler(
        sampler=sampler,
        schedule_label=schedule_spec.label,
        scheduler_class=spec.scheduler_class,
        options={**spec.options, **schedule_spec.options},
        warnings=warnings,
    )


def build_scheduler(resolved: ResolvedSampler, model_scheduler_config: dict):
    """A fresh scheduler for one job, configured from the model's own scheduler config.

    Flags the class does not accept (diffusers would drop them silently) are removed from the resolved
    options and the job is told; the infotext then says `Automatic` for a schedule that was not applied.
    """
    import diffusers

    scheduler_class = getattr(diffusers, resolved.scheduler_class)
    base = {k: v for k, v in model_scheduler_config.items() if not k.startswith("_")}
    # Start every job from the model's noise schedule, not from a previous job's sampler flags.
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "algorithm_type",
                 "solver_order", "solver_type", "skip_prk_steps"):  # fmt: skip
        base.pop(flag, None)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if "shift" in base and "flow_shift" in accepted and resolved.options.get("use_flow_sigmas"):
        base["flow_shift"] = base["shift"]  # a flow-matching model's shift, under the name these solvers use
    dropped = [key for key in resolved.options if key not in accepted]
    if dropped:
        resolved.warnings.append(
            f"Schedule type '{resolved.schedule_label}' is not available for sampler '{resolved.sampler}' in "
            f"diffusers; its default schedule was used."
        )
        resolved.schedule_label = "Automatic"
        for key in dropped:
            resolved.options.pop(key)
    return scheduler_class.from_config({**base, **resolved.options})
