"""The family table (pipelines/families/) is the one place a family is defined: every family has its generator
deployment, pipelines diffusers has, and the demo models are recognised as their family from their files."""

import diffusers
import pytest

from deployments.generators import GENERATORS
from pipelines.catalog import ModelCatalog, family_of_checkpoint_keys
from pipelines.families import FAMILIES, family_label


def test_every_family_has_its_generator_deployment_and_real_pipelines():
    assert set(GENERATORS) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert GENERATORS[name].name == family.deployment
        pipelines = family.pipelines
        for class_name in (pipelines.txt2img, pipelines.img2img, pipelines.inpaint, pipelines.single_file,
                           *pipelines.controlnet, *pipelines.controlnet.values()):  # fmt: skip
            assert class_name is None or hasattr(diffusers, class_name), (name, class_name)
        assert family.refines is None or family.refines in FAMILIES
        assert len(family.latent_rgb) >= 4 and all(len(row) == 3 for row in family.latent_rgb)


def test_the_demo_models_are_recognised_by_family(settings):
    families = {entry.name: entry.family for entry in ModelCatalog(settings).list_models()}
    assert families["demo-sd15"] == "sd15" and families["demo-sd15-single"] == "sd15"
    assert families["models--demo--tiny-sdxl-base"] == "sdxl"
    assert families["demo-sdxl-refiner"] == "sdxl-refiner"


@pytest.mark.parametrize(
    ("keys", "family"),
    [(["model.diffusion_model.x", "cond_stage_model.transformer.y"], "sd15"),
     (["model.diffusion_model.x", "conditioner.embedders.0.transformer.y", "conditioner.embedders.1.model.z"], "sdxl"),
     (["model.diffusion_model.x", "conditioner.embedders.0.model.z"], "sdxl-refiner")],
)  # fmt: skip
def test_checkpoint_tensor_names_give_the_family(keys, family):
    assert family_of_checkpoint_keys(keys) == family


def test_labels_name_served_and_recognised_families():
    assert family_label("sd15") == "SD1.5" and family_label("sd2") == "SD 2.x" and family_label("new") == "new"
