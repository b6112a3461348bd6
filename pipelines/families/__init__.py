"""Model families: everything that differs between SD1.5, SDXL, the SDXL refiner, FLUX.1, ..., in one table.

A family is one module of this package that builds a `ModelFamily` and is listed in `FAMILIES` below. The rest
of the service asks the table and never tests a family's name: how its files are recognised, which diffusers
pipelines run it (txt2img, img2img, inpainting, ControlNet), its samplers, its guidance, how prompts are encoded,
its live-preview coefficients, which LoRAs fit it, its native size and batching limits, and the generator
deployment that serves it. Adding a family is a module here, a row in `FAMILIES`, a generator deployment class
(deployments/generators.py), rows in the serve configs and a demo model (README "Adding a model family").

This module imports neither torch nor diffusers (the ingress reads the table too): pipelines are named by their
class names in `diffusers`.
"""

from typing import Literal

from pipelines.families import flux, sd3, sd15, sdxl
from pipelines.families.base import FamilyPipelines, ModelFamily

__all__ = ["FAMILIES", "FamilyName", "FamilyPipelines", "ModelFamily", "family_label", "family_of"]

# The served families, in the order their files are recognised and defaults chosen (SD1.5 first, as the seed API).
FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (sd15.SD15, sdxl.SDXL, sdxl.SDXL_REFINER, flux.FLUX, sd3.SD3)
}
FamilyName = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]  # the closed set, as an enum in /openapi.json

# Families whose LoRAs, embeddings or ControlNets are recognised (to name them in an error) but not served.
OTHER_FAMILY_LABELS = {"sd2": "SD 2.x"}


def family_of(name: str) -> ModelFamily:
    """The family by its id; a KeyError for one that is not served."""
    return FAMILIES[name]


def family_label(name: str) -> str:
    """How a message names a family id (served or only recognised); the id itself when unknown."""
    if name in FAMILIES:
        return FAMILIES[name].label
    return OTHER_FAMILY_LABELS.get(name, name)
