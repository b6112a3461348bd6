"""Preparing a job: everything about a request that needs no loaded model (sampler, seed, input image,
LoRAs, hires fix, refiner), checked and resolved before any model work, so bad input fails first."""

import math
import re
import secrets
from dataclasses import dataclass, field, replace

from PIL import Image

from pipelines.catalog import Mode, ModelCatalog, ModelEntry
from pipelines.control_plan import UnitPlan, control_units, plan_controls
from pipelines.controlnets import ControlNetLibrary
from pipelines.embeddings import EmbeddingFile, EmbeddingLibrary
from pipelines.errors import (
    InvalidRequestError,
    UnknownModelError,
)
from pipelines.families import FAMILIES, ModelFamily, family_label, family_of
from pipelines.images import decode_base64_image, decode_image
from pipelines.inpaint import InpaintPlan, plan_inpainting
from pipelines.limits import LIMITS
from pipelines.loras import (
    LoraLibrary,
    LoraUse,
)
from pipelines.samplers import SCHEDULERS_WITH_NOISE_PER_CALL, ResolvedSampler, resolve_sampler
from pipelines.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from pipelines.upscalers import UpscalerLibrary, hires_size, latent_mode
from pipelines.vaes import VaeFile, VaeLibrary, is_automatic


@dataclass(frozen=True)
class HiresPlan:
    """Hires fix: upscale the first pass to `width` x `height`, then a second img2img pass."""

    upscaler: str  # "Latent" (or a variant) or an upscaler file name
    latent: tuple[str, bool] | None  # the interpolation of a latent upscaler; None for an external one
    scale: float
    steps: int
    denoising_strength: float
    width: int
    height: int


@dataclass(frozen=True)
class RefinerPlan:
    """SDXL base -> refiner hand-off of the latents at `switch_at` of the schedule."""

    model: ModelEntry
    model_hash: str
    switch_at: float


@dataclass
class PreparedJob:
    """A request with everything resolved that needs no model."""

    mode: Mode
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    seed: int
    sampler: ResolvedSampler
    clip_skip: int
    init_image: Image.Image | None = None
    denoising_strength: float | None = None
    inpaint: InpaintPlan | None = None  # img2img with a mask
    loras: list[LoraUse] = field(default_factory=list)  # compatible ones only; `prompt` has no <lora:> tags
    hires: HiresPlan | None = None
    refiner: RefinerPlan | None = None
    vae: VaeFile | None = None  # a chosen VAE; None: the model's own
    embeddings: list[EmbeddingFile] = field(default_factory=list)  # named in its prompts, of its model's family
    foreign_embeddings: list[EmbeddingFile] = field(default_factory=list)  # of another family: names removed
    warnings: list[str] = field(default_factory=list)
    job_id: str = ""  # the service's id for the job (logs, progress and hand-offs of a batch)
    image_index: int = 0  # which of its request's images this is (batch_size x n_iter images, seed + index)
    image_count: int = 1
    preview: bool = False  # live previews of the image so far (pipelines/previews.py)
    controls: list[UnitPlan] = field(default_factory=list)  # ControlNet units (maps made) and IP-Adapter units
    distilled_cfg_scale: float | None = None  # a guidance-distilled family's (FLUX.1's) guidance embedding

    def per_image(self, count: int) -> list["PreparedJob"]:
        """The `count` images of one request (`batch_size` x `n_iter`), as A1111 makes them: seeds seed,
        seed + 1, ...; each is a job of its own for the engine (one torch.Generator per image)."""
        return [
            replace(
                self, seed=self.seed + index, warnings=list(self.warnings), image_index=index, image_count=count
            )  # fmt: skip
            for index in range(count)
        ]

    def batch_key(self) -> tuple:
        """Jobs with equal keys can run as one diffusers batch: everything but prompt, seed, input image and
        output format. The sampler's A1111 names are part of it, so each job's infotext names its own."""
        loras = tuple((use.adapter_name, use.scale) for use in self.loras)
        sampler = (self.sampler.sampler, self.sampler.schedule_label, self.sampler.scheduler_class,
                   tuple(sorted(self.sampler.options.items())))  # fmt: skip
        refiner = (self.refiner.model.name, self.refiner.switch_at) if self.refiner else None
        alone = id(self) if self.sampler.scheduler_class in SCHEDULERS_WITH_NOISE_PER_CALL else None
        vae = str(self.vae.path) if self.vae else None
        masked = self.inpaint.fill if self.inpaint else None  # the inpainting pipeline; one start per batch
        controls = tuple(control.batch_key() for control in self.controls)  # the maps are per job
        return (self.mode, self.steps, self.cfg_scale, self.width, self.height, sampler, self.clip_skip,
                self.denoising_strength, loras, self.hires, refiner, vae, masked, controls, alone,
                self.distilled_cfg_scale)  # fmt: skip


def random_seed() -> int:
    return secrets.randbelow(2**32)


def prepare_job(
    request: Txt2ImgRequest | Img2ImgRequest,
    model: ModelEntry | None = None,
    loras: LoraLibrary | None = None,
    catalog: ModelCatalog | None = None,
    upscalers: UpscalerLibrary | None = None,
    vaes: VaeLibrary | None = None,
    embeddings: EmbeddingLibrary | None = None,
    input_bytes: dict[str, bytes] | None = None,
    controlnets: ControlNetLibrary | None = None,
) -> PreparedJob:
    """Validates a request and resolves everything that needs no loaded model: sampler, seed, input image,
    LoRAs (checked against `model`; incompatible ones dropped with a warning), hires fix, refiner and VAE (an
    unknown one is a 404). `input_bytes`: the img2img `image` and `mask` files when the caller has decoded
    their base64 already (so it is decoded once), and the ControlNet units' images (`controlnet.N.image`)."""
    mode: Mode = "img2img" if isinstance(request, Img2ImgRequest) else "txt2img"
    family = family_of(model.family) if model is not None else None
    sent = {"sampler_name": request.sampler_name, "scheduler_type": request.scheduler_type,
            "cfg_scale": request.cfg_scale}  # fmt: skip
    sent.update(unsent_family_defaults(request, model.family) if model else {})
    sampler = resolve_sampler(sent["sampler_name"], sent["scheduler_type"], family)
    if loras is not None:
        plan = loras.plan(request.loras, request.prompt, model, mode)
    elif request.loras or "<lora:" in request.prompt:
        raise InvalidRequestError("LoRAs need a LoRA folder; none is configured here", field="loras")
    else:
        plan = None
    seed = request.seed if request.seed is not None and request.seed >= 0 else random_seed()
    job = PreparedJob(
        mode=mode,
        prompt=plan.prompt if plan else request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        cfg_scale=sent["cfg_scale"],
        width=request.width,
        height=request.height,
        seed=seed,
        sampler=sampler,
        clip_skip=request.clip_skip,
        loras=plan.uses if plan else [],
        warnings=list(plan.warnings) if plan else [],
        preview=request.preview,
    )
    raw = input_bytes or {}
    if isinstance(request, Img2ImgRequest):
        image = decode_image(raw["image"]) if "image" in raw else decode_base64_image(request.image, field="image")
        job.init_image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
        job.denoising_strength = at_least_one_step(request.steps, request.denoising_strength, "", job.warnings)
        if request.mask:
            mask = (decode_image(raw["mask"], field="mask", mode=None) if "mask" in raw
                    else decode_base64_image(request.mask, field="mask", mode=None))  # fmt: skip
            job.init_image, job.inpaint = plan_inpainting(
                image, mask, request.width, request.height, blur=request.mask_blur,
                invert=request.inpainting_mask_invert, fill=request.inpainting_fill,
                full_res=request.inpaint_full_res, padding=request.inpaint_full_res_padding, warnings=job.warnings,
            )  # fmt: skip
        elif ignored := request.ignored_mask_fields():
            job.warnings.append(f"{', '.join(ignored)} ignored: they apply to inpainting, and no 'mask' was sent")
    if not is_automatic(request.vae):
        if vaes is None:
            raise InvalidRequestError("a VAE needs the VAE folder; none is configured here", field="vae")
        job.vae = vaes.resolve(request.vae)
    if embeddings is not None and model is not None:
        job.embeddings, job.foreign_embeddings = embeddings.named_in([job.prompt, job.negative_prompt], model.family)
        job.warnings += [f"embedding '{item.name}' is for {item.family} models, not {model.family}; its name was "
                         f"removed from the prompt" for item in job.foreign_embeddings]  # fmt: skip
    job.controls = plan_controls(request.controlnet, model, controlnets, request.width, request.height,
                                 job.init_image, raw, job.warnings)  # fmt: skip
    job.hires = _plan_hires(request, mode, upscalers, job.warnings, model)
    job.refiner = _plan_refiner(request, mode, model, catalog, job.warnings)
    if job.hires is not None:
        job.denoising_strength = job.hires.denoising_strength
    _check_control_combinations(job, model)
    if family is not None:
        _apply_family_rules(job, request, family, vaes)
        _check_largest_side(job, model)
    return job


def unsent_family_defaults(request: GenerationRequest, family: str) -> dict:
    """The family's defaults for the request fields the caller did not send (FLUX.1: cfg_scale 1, Euler,
    Simple), by API name: used when the job is prepared, and written into its stored request, so a job
    dispatched again is prepared the same."""
    defaults = family_of(family).request_defaults
    return {name: value for name, value in defaults.items() if name not in request.model_fields_set}


A1111_SYNTAX = re.compile(r"[()\[\]]|\bBREAK\b")  # emphasis brackets or BREAK (pipelines/prompts.py reads them)


def _apply_family_rules(job: PreparedJob, request: GenerationRequest, family: ModelFamily,
                        vaes: VaeLibrary | None = None) -> None:  # fmt: skip
    """What a family asks of a job beyond the shared checks: its size multiple (the hires size fitted to it),
    a VAE of its latent channels, A1111's prompt syntax where it has no weighted encoding, what packed latents
    cannot do (a latent hires fix or fill), and its guidance (FLUX.1's distilled guidance; its negative prompt
    only with true CFG)."""
    multiple = family.sizes_multiple_of
    for name in ("width", "height"):
        if getattr(request, name) % multiple:
            raise InvalidRequestError(f"{name} must be a multiple of {multiple} for {family.label} models, not "
                                      f"{getattr(request, name)}", field=name)  # fmt: skip
    if job.hires is not None and (job.hires.width % multiple or job.hires.height % multiple):
        fitted = replace(job.hires, width=job.hires.width // multiple * multiple,
                         height=job.hires.height // multiple * multiple)  # fmt: skip
        job.warnings.append(f"hires size {job.hires.width}x{job.hires.height} made {fitted.width}x{fitted.height}: "
                            f"{family.label} sizes are multiples of {multiple}")  # fmt: skip
        job.hires = fitted
    if family.prompt_encoding == "plain" and any(
        A1111_SYNTAX.search(text) for text in (job.prompt, job.negative_prompt)
    ):
        job.warnings.append(f"emphasis and BREAK are not applied on {family.label} models: the prompt was sent "
                            "without them")  # fmt: skip
    if job.vae is not None and vaes is not None:
        channels = vaes.latent_channels(job.vae)
        if channels is not None and channels != family.latent_channels:
            raise InvalidRequestError(f"vae: '{job.vae.name}' has {channels} latent channels and {family.label} "
                                      f"models {family.latent_channels}: it is a VAE of another family",
                                      field="vae")  # fmt: skip
    if family.latent_layout == "packed":  # FLUX.1's tokens: no latent image to resize or fill
        if job.hires is not None and job.hires.latent is not None:
            raise InvalidRequestError(f"a latent hires fix cannot run on {family.label} models (their latents are "
                                      "packed); choose a model upscaler or Lanczos for hires.upscaler",
                                      field="hires.upscaler")  # fmt: skip
        if job.inpaint is not None and job.inpaint.fill in (2, 3):
            raise InvalidRequestError(f"inpainting_fill 2 (latent noise) and 3 (latent nothing) cannot run on "
                                      f"{family.label} models here; use 0 or 1", field="inpainting_fill")  # fmt: skip
    if family.guidance != "distilled":
        return
    job.distilled_cfg_scale = (request.distilled_cfg_scale if request.distilled_cfg_scale is not None
                               else family.distilled_cfg_scale)  # fmt: skip
    if job.cfg_scale <= 1 and job.negative_prompt.strip():
        job.warnings.append(f"negative_prompt not used: with cfg_scale {job.cfg_scale:g} a {family.label} model "
                            "runs no unconditional pass; a cfg_scale above 1 uses it (true CFG)")  # fmt: skip


def _check_largest_side(job: PreparedJob, model: ModelEntry) -> None:
    """A model whose denoiser makes images only up to a size of its own (SD 3's position table) refuses larger
    ones here, rather than diffusers failing the job after it waited in the queue (a hires size was fitted)."""
    if model.largest_side is None:
        return
    for name, side in (("width", job.width), ("height", job.height)):
        if side > model.largest_side:
            raise InvalidRequestError(f"{name} {side} is above the {model.largest_side} px a side model "
                                      f"'{model.name}' can make", field=name)  # fmt: skip


def _check_control_combinations(job: PreparedJob, model: ModelEntry | None) -> None:
    """What diffusers' ControlNet inpainting pipelines cannot run, refused at submission (they take no
    prepared masked-image latents): A1111's "latent noise" / "latent nothing", and a latent hires fix on an
    inpainting checkpoint. IP-Adapter units run in the plain pipelines: nothing to refuse."""
    if not control_units(job.controls):
        return
    if job.inpaint is not None and job.inpaint.fill in (2, 3):
        message = "inpainting_fill 2 (latent noise) and 3 (latent nothing) cannot run with ControlNet here; use 0 or 1"
        raise InvalidRequestError(message, field="inpainting_fill")
    if job.hires is not None and job.hires.latent is not None and model is not None and model.inpainting:
        message = (
            "a latent hires fix cannot run with ControlNet on an inpainting checkpoint here; choose a model "
            "upscaler or Lanczos for hires.upscaler"
        )
        raise InvalidRequestError(message, field="hires.upscaler")


def at_least_one_step(steps: int, strength: float, field_prefix: str, warnings: list[str]) -> float:
    """The denoising strength to run: the requested one, or the smallest that gives one step where steps x
    strength is below one (A1111 then runs one step at the lowest noise level rather than refusing)."""
    if int(steps * strength) >= 1:
        return strength
    smallest = min(1.0, 1.0 / steps + 1e-9)
    warnings.append(
        f"{field_prefix}steps x {field_prefix}denoising_strength = {steps} x {strength:g} is less than one step; "
        f"ran one step (denoising strength {smallest:.4g}), as A1111 does"
    )
    return smallest


def _plan_hires(
    request: GenerationRequest,
    mode: Mode,
    upscalers: UpscalerLibrary | None,
    warnings: list[str],
    model: ModelEntry | None = None,
) -> HiresPlan | None:
    """The hires fix's plan; a final size above the limits (configs/limits.yaml's, or the model's own where
    smaller: SD 3's position table) is fitted to them with a warning, as A1111 users expect of a scale."""
    hires = request.hires if isinstance(request, Txt2ImgRequest) else None  # a field of txt2img only
    if hires is None or not hires.enabled:
        return None
    if upscalers is None:
        raise InvalidRequestError("hires fix needs the upscaler folder; none is configured here", field="hires")
    upscaler = upscalers.check(hires.upscaler)
    scale = hires.scale
    width, height = hires_size(request.width, request.height, scale)
    max_side = model.max_size if model is not None else LIMITS.max_size
    if max(width, height) > max_side or width * height > LIMITS.max_pixels:
        # The largest factor within the limits (the first pass itself is within them: at least 1x).
        first_pixels = request.width * request.height
        scale = min(max_side / max(request.width, request.height), math.sqrt(LIMITS.max_pixels / first_pixels))
        fitted = (max(8, int(request.width * scale) // 8 * 8), max(8, int(request.height * scale) // 8 * 8))
        whose = f" (model '{model.name}' makes at most {max_side} px a side)" if max_side < LIMITS.max_size else ""
        warnings.append(
            f"hires fix: {hires.scale:g}x would make {width}x{height}, above the limits of {max_side} px a "
            f"side and {LIMITS.max_pixels} pixels{whose}; upscaled {scale:.3g}x to {fitted[0]}x{fitted[1]} instead"
        )
        width, height = fitted
        scale = round(scale, 3)
    strength = at_least_one_step(hires.steps, hires.denoising_strength, "hires.", warnings)
    return HiresPlan(upscaler=upscaler, latent=latent_mode(upscaler), scale=scale, steps=hires.steps,
                     denoising_strength=strength, width=width, height=height)  # fmt: skip


def _plan_refiner(
    request: GenerationRequest,
    mode: Mode,
    model: ModelEntry | None,
    catalog: ModelCatalog | None,
    warnings: list[str],
) -> RefinerPlan | None:
    """The refiner hand-off. A refiner that cannot take part (another base family, hires fix, too few steps
    to share) is left out with a warning, as an incompatible LoRA is: the request itself is well formed."""
    if not request.refiner_checkpoint:
        return None
    if catalog is None:
        raise InvalidRequestError(
            "a refiner needs the model catalog; none is configured here", field="refiner_checkpoint"
        )
    refiner = catalog.resolve(request.refiner_checkpoint, field="refiner_checkpoint")
    base_family = family_of(refiner.family).refines  # the family whose images it continues
    if base_family is None:
        installed = [e.name for e in catalog.list_models() if family_of(e.family).refines is not None]
        refiners = " or ".join(spec.label for spec in FAMILIES.values() if spec.refines is not None)
        raise UnknownModelError(
            f"'refiner_checkpoint' {refiner.name!r} is not an {refiners} (it is an "
            f"{family_label(refiner.family)} model); "
            f"installed refiners: {', '.join(map(repr, installed)) or 'none'}",
            field="refiner_checkpoint",
        )
    skipped = f"refiner '{refiner.name}' not used: "
    if model is not None and model.family != base_family:
        warnings.append(skipped + f"a refiner continues {family_label(base_family)} base models; '{model.name}' is "
                        f"{family_label(model.family)}")  # fmt: skip
        return None
    if isinstance(request, Txt2ImgRequest) and request.hires is not None and request.hires.enabled:
        warnings.append(skipped + "hires fix and a refiner in one job are not supported; the job ran with hires fix")
        return None
    base_start = 1.0 - request.denoising_strength if isinstance(request, Img2ImgRequest) else 0.0
    switch = request.refiner_switch_at
    base_steps = int(request.steps * (switch - base_start))
    refiner_steps = request.steps - int(request.steps * switch)
    if base_steps < 1 or refiner_steps < 1:
        warnings.append(
            skipped + f"refiner_switch_at {switch:g} leaves {max(base_steps, 0)} step(s) to the base model and "
            f"{refiner_steps} to the refiner out of {request.steps}; both need at least one"
            + (f" (img2img starts at 1 - denoising_strength = {base_start:.2f})" if base_start else "")
        )
        return None
    return RefinerPlan(model=refiner, model_hash=catalog.model_hash(refiner), switch_at=switch)
