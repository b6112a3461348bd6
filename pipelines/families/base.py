"""The shape of a model family's facts (pipelines/families/__init__.py has the table)."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.samplers import SamplerSpec, ScheduleSpec

Guidance = Literal["cfg", "distilled"]  # classifier-free guidance; FLUX's guidance embedding (+ optional true CFG)
PromptEncoding = Literal["a1111-clip", "plain"]  # A1111's weighted CLIP chunks where asked for; diffusers' own
LatentLayout = Literal["spatial", "packed"]  # UNet latents (c, h, w); transformer tokens (h*w/4, c*4) for FLUX


class UnsupportedModelError(Exception):
    """Files that look like a model of a family this service does not run (skipped with a warning)."""


@dataclass(frozen=True)
class FamilyPipelines:
    """diffusers class names, looked up in `diffusers` when a model is loaded."""

    txt2img: str | None  # None: the family only continues images (the SDXL refiner)
    img2img: str
    inpaint: str | None  # None: no inpainting pipeline
    single_file: str | None = None  # the class whose `from_single_file` reads an original-layout checkpoint
    controlnet: dict[str, str] = field(default_factory=dict)  # pipeline class -> its ControlNet pipeline class


@dataclass(frozen=True)
class ModelFamily:
    """One family's facts. `name` is the id the API, the job store and the metrics use."""

    name: str
    label: str  # as messages and listings name it: "SD1.5", "SDXL", "FLUX.1"
    deployment: str  # the generator deployment that runs its jobs
    pipelines: FamilyPipelines
    native_size: tuple[int, int]  # (width, height) it was trained at: the OpenAI door's `size: auto`
    latent_rgb: tuple[tuple[float, float, float], ...]  # latent channel -> RGB weights for live previews
    lora_family: str | None  # the LoRA family that fits (pipelines/loras.py detects it); None: LoRAs do not apply
    embedding_family: str | None = None  # the textual-inversion embeddings that fit (pipelines/embeddings.py)
    refines: str | None = None  # a refiner: the family whose images it continues (`refiner_checkpoint`)
    max_batch_size: int = 8  # the generator's default cross-request batching limits
    max_batch_pixels: int = 2 * 1024 * 1024
    weights_folder: str = "unet"  # the folder of a diffusers model whose weights give its A1111 `Model hash`
    guidance: Guidance = "cfg"
    prompt_encoding: PromptEncoding = "a1111-clip"
    latent_layout: LatentLayout = "spatial"
    latent_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # Its samplers and schedule types (A1111 name -> diffusers), where they differ from pipelines/samplers.py's.
    samplers: dict[str, SamplerSpec] | None = None
    schedules: dict[str, ScheduleSpec] | None = None
    # Request fields a job of this family gets when the caller did not send them (FLUX.1: cfg_scale 1, Euler).
    request_defaults: dict[str, object] = field(default_factory=dict)
    distilled_cfg_scale: float | None = None  # guidance "distilled": the guidance embedding's default
    latent_channels: int = 4  # its VAE's (a VAE file of other latent channels is another family's)
    sizes_multiple_of: int = 8  # width and height must be multiples of this (the VAE's downsampling x patching)
    # Recognising its files: an original-layout checkpoint's tensor names, a diffusers folder's model_index.json
    # (with the folder, for component configs). Families are asked in `FAMILIES` order; the first claim wins.
    claims_checkpoint: Callable[[Iterable[str]], bool] = lambda keys: False  # may raise UnsupportedModelError
    claims_folder: Callable[[dict, Path], bool] = lambda index, folder: False
    # Its LoRA files, by tensor names and shapes (without torch) and training metadata; families that do not
    # claim one leave it to pipelines/loras.py's SD rules.
    claims_lora: Callable[[dict, dict], bool] = lambda shapes, metadata: False
    # A single file that lacks parts of the model (FLUX.1's transformer alone, as Black Forest Labs ships it; SD
    # 3.5's without its text encoders) runs with module files of these kinds (pipelines/modules.py), in this
    # order, but for those it carries itself (`carried_modules(keys)`) and optional ones that are not installed;
    # `module_names`: the usual file names of a kind, where they are the family's own (its VAE). Such files are
    # loaded by `single_file_loader(entry, dtype)` rather than diffusers' `from_single_file` of
    # `pipelines.single_file`.
    single_file_modules: tuple[str, ...] = ()
    optional_modules: tuple[str, ...] = ()
    module_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    carried_modules: Callable[[Iterable[str]], tuple[str, ...]] = lambda keys: ()
    single_file_loader: Callable | None = None
    optional_components: tuple[str, ...] = ()  # a diffusers folder may lack these (SD 3.5's T5): loaded as None
    inpainting_checkpoints: bool = True  # 9-channel UNets (image + mask conditioning) exist for it
    # The largest width or height a model at `path` (a diffusers folder or a single file) can make, read from its
    # files (SD 3's table of patch positions); None (or None from it): no limit beyond configs/limits.yaml.
    largest_side: Callable[[Path], int | None] | None = None

    @property
    def txt2img(self) -> bool:
        return self.pipelines.txt2img is not None
