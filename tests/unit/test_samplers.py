"""Sampler names and schedule types: every name resolves, unknown names are clear errors."""

import diffusers
import pytest

from pipelines.errors import UnknownSamplerError
from pipelines.samplers import (
    SAMPLERS,
    SEED_SAMPLER_NAMES,
    SEED_SCHEDULER_TYPES,
    accepted_sampler_names,
    accepted_schedule_types,
    build_scheduler,
    resolve_sampler,
    sampler_names,
    schedule_type_names,
)

SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False,
}  # fmt: skip


def test_listing_starts_with_the_seed_names_and_contains_a1111_names():
    names = sampler_names()
    assert names[: len(SEED_SAMPLER_NAMES)] == SEED_SAMPLER_NAMES
    assert set(SAMPLERS) <= set(names)
    assert schedule_type_names()[:5] == SEED_SCHEDULER_TYPES
    # What the API accepts (its schema's enums) is the listing plus older and alternative spellings.
    assert set(names) <= set(accepted_sampler_names()) and "k_euler_a" in accepted_sampler_names()
    assert "DPM++ 3M SDE Exponential" in accepted_sampler_names()
    assert set(schedule_type_names()) <= set(accepted_schedule_types()) and "SGM Uniform" in accepted_schedule_types()


@pytest.mark.parametrize("name", accepted_sampler_names())
def test_every_sampler_name_builds_a_diffusers_scheduler(name):
    resolved = resolve_sampler(name, None)
    scheduler = build_scheduler(resolved, SD15_SCHEDULER_CONFIG)
    assert type(scheduler).__name__ == SAMPLERS[resolved.sampler].scheduler_class
    scheduler.set_timesteps(5)


@pytest.mark.parametrize("schedule", accepted_schedule_types())
def test_every_schedule_type_name_and_label_resolves(schedule):
    resolved = resolve_sampler("Euler", schedule)
    scheduler = build_scheduler(resolved, SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)


@pytest.mark.parametrize(
    ("sampler", "schedule", "expected_sampler", "expected_label", "options"),
    [
        ("DPM++ 2M Karras", None, "DPM++ 2M", "Karras", {"use_karras_sigmas": True}),
        ("DPM++ 2M", None, "DPM++ 2M", "Karras", {"use_karras_sigmas": True}),  # A1111 default schedule
        ("DPM++ 2M", "exponential", "DPM++ 2M", "Exponential", {"use_exponential_sigmas": True}),
        ("DPM++ 2M Karras", "Exponential", "DPM++ 2M", "Exponential", {"use_exponential_sigmas": True}),
        ("DPM++ 2M Karras", "default", "DPM++ 2M", "Karras", {"use_karras_sigmas": True}),
        ("LMS Karras", None, "LMS", "Karras", {"use_karras_sigmas": True}),
        ("DPM++ SDE Karras", None, "DPM++ SDE", "Karras", {"use_karras_sigmas": True}),
        ("Euler a", None, "Euler a", "Automatic", {}),
        ("euler a", "automatic", "Euler a", "Automatic", {}),
        ("k_euler_a", None, "Euler a", "Automatic", {}),
        ("Euler", "SGM Uniform", "Euler", "SGM Uniform", {"timestep_spacing": "trailing"}),
        ("DDIM", "ddim", "DDIM", "DDIM", {"timestep_spacing": "leading"}),
        ("DDIM", "pndm", "DDIM", "DDIM", {"timestep_spacing": "leading"}),
        ("PLMS", None, "PLMS", "Automatic", {"skip_prk_steps": True}),
        ("DPM++ 2M SDE", None, "DPM++ 2M SDE", "Exponential",
         {"algorithm_type": "sde-dpmsolver++", "use_exponential_sigmas": True}),
    ],
)  # fmt: skip
def test_resolution(sampler, schedule, expected_sampler, expected_label, options):
    resolved = resolve_sampler(sampler, schedule)
    assert (resolved.sampler, resolved.schedule_label) == (expected_sampler, expected_label)
    assert {k: resolved.options[k] for k in options} == options


def test_flags_reach_the_scheduler():
    scheduler = build_scheduler(resolve_sampler("DPM++ 2M SDE", "karras"), SD15_SCHEDULER_CONFIG)
    assert isinstance(scheduler, diffusers.DPMSolverMultistepScheduler)
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "DPM++ 2S a", "Restart", "DDIM CFG++"])
def test_approximations_are_reported(name):
    resolved = resolve_sampler(name, None)
    assert resolved.warnings and name in resolved.warnings[0]


def test_unsupported_schedule_for_a_sampler_is_dropped_with_a_warning():
    resolved = resolve_sampler("Euler a", "karras")
    scheduler = build_scheduler(resolved, SD15_SCHEDULER_CONFIG)
    assert isinstance(scheduler, diffusers.EulerAncestralDiscreteScheduler)
    assert resolved.schedule_label == "Automatic"
    assert any("'Karras' is not available for sampler 'Euler a'" in w for w in resolved.warnings)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UnknownSamplerError) as raised:
        resolve_sampler("Euler b", None)
    assert raised.value.field == "sampler_name"
    assert "'Euler b'" in str(raised.value) and "DPM++ 2M Karras" in str(raised.value)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(UnknownSamplerError) as raised:
        resolve_sampler("Euler", "quadratic")
    assert raised.value.field == "scheduler_type"
    assert "karras" in str(raised.value) and "sgm_uniform" in str(raised.value)


def test_model_flags_do_not_leak_into_another_sampler():
    karras_config = {**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True}
    scheduler = build_scheduler(resolve_sampler("Euler", None), karras_config)
    assert scheduler.config.use_karras_sigmas is False
