"""txt2img and img2img on loaded diffusers pipelines.

The flow of a job, top to bottom:
1. `prepare_job` checks the request and resolves everything that needs no model (sampler, seed, the
   input image), so bad input fails before any model work;
2. `ImageEngine.load` returns the model's pipeline from a small LRU cache (loaded with the real loaders);
3. `ImageEngine.run` runs a list of compatible jobs as one diffusers call with one generator per job, so
   each job gets exactly its own seed's image, and builds each image's A1111 infotext.
"""

import io
import logging
import math
import os
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import psutil
import torch
from PIL import Image

from pipelines.catalog import ModelCatalog, ModelEntry
from pipelines.errors import (
    DiffusionAPIError,
    InvalidRequestError,
    JobCancelledError,
    ModelLoadError,
    OutOfMemoryError,
    UnknownModelError,
)
from pipelines.images import decode_base64_image, encode_base64
from pipelines.infotext import build_infotext
from pipelines.limits import LIMITS
from pipelines.loras import (
    FAMILY_LABELS,
    LoraLibrary,
    LoraUse,
    lora_hashes_value,
    prompt_with_lora_tags,
    read_lora_state_dict,
)
from pipelines.prompts import encode_prompts, needs_own_encoding, without_emphasis
from pipelines.samplers import SCHEDULERS_WITH_NOISE_PER_CALL, ResolvedSampler, build_scheduler, resolve_sampler
from pipelines.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from pipelines.settings import VERSION
from pipelines.speed import SpeedOptions, apply_speed_options, set_qkv_fused, set_vae_tiling
from pipelines.upscalers import UpscalerLibrary, hires_size, latent_mode, upscale_latents

logger = logging.getLogger(__name__)
# Keeping several LoRA adapters loaded on one model is deliberate (a cache); peft warns about it each time.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)

INFOTEXT_VERSION = f"DiffusionAPI v{VERSION}"  # must not look like "v1.x": A1111 would apply backcompat
ProgressCallback = Callable[[int, int, str], None]  # (done, total, phase): overall progress across phases
# (the jobs of the running call, done, total, phase): a batch's progress, for the jobs it concerns
BatchProgressCallback = Callable[[list["PreparedJob"], int, int, str], None]
Mode = Literal["txt2img", "img2img"]


PHASE_GENERATION = "generation"
PHASE_FIRST_PASS = "initial generation"
PHASE_UPSCALING = "upscaling"
PHASE_HIRES_PASS = "hires pass"
PHASE_REFINING = "refining"
StepCallback = Callable[[int, int], None]  # (step, steps of this phase)


class PhaseProgress:
    """One overall progress figure across a job's phases (first pass, upscaling, second pass, refiner), each
    phase weighted by its share of the denoising steps. It never goes backwards."""

    RESOLUTION = 1000

    def __init__(
        self,
        progress: ProgressCallback | None,
        weights: list[tuple[str, float]],
        is_cancelled: Callable[[], bool] | None = None,
    ):
        self.is_cancelled = is_cancelled
        total = sum(weight for _, weight in weights)
        self.ranges: dict[str, tuple[float, float]] = {}
        start = 0.0
        for name, weight in weights:
            self.ranges[name] = (start, start + weight / total)
            start += weight / total
        self.progress = progress
        self._last = 0

    @classmethod
    def for_job(cls, job: "PreparedJob", progress: ProgressCallback | None, is_cancelled=None) -> "PhaseProgress":
        if job.hires is not None:
            second = max(1, int(job.hires.steps * job.hires.denoising_strength))
            upscaling = 0.1 * (job.steps + second)
            weights = [(PHASE_FIRST_PASS, job.steps), (PHASE_UPSCALING, upscaling), (PHASE_HIRES_PASS, second)]
        elif job.refiner is not None:
            refiner_steps = job.steps - int(job.steps * job.refiner.switch_at)
            weights = [(PHASE_GENERATION, job.steps - refiner_steps), (PHASE_REFINING, refiner_steps)]
        else:
            weights = [(PHASE_GENERATION, 1.0)]
        return cls(progress, weights, is_cancelled)

    @property
    def first_phase(self) -> str:
        return next(iter(self.ranges))

    def report(self, phase: str, done: int, total: int) -> None:
        """Records progress; raises JobCancelledError when the job was cancelled, which stops the diffusers
        loop at this step."""
        if self.is_cancelled is not None and self.is_cancelled():
            raise JobCancelledError("cancelled by request")
        start, end = self.ranges[phase]
        value = int(self.RESOLUTION * (start + (end - start) * min(done / max(total, 1), 1.0)))
        self._last = max(value, self._last)
        if self.progress is not None:
            self.progress(self._last, self.RESOLUTION, phase)

    def step(self, phase: str) -> StepCallback:
        return lambda done, total: self.report(phase, done, total)


def select_device(
    device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA in half precision (bfloat16 where the GPU has it) where present, then Apple MPS, else the CPU in
    float32.

    `DIFFUSION_API_DEVICE` / `DIFFUSION_API_DTYPE` (e.g. `cuda:1`, `bfloat16`) override the choice.
    """
    device = device or os.environ.get("DIFFUSION_API_DEVICE")
    dtype = dtype or os.environ.get("DIFFUSION_API_DTYPE")
    if not device:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    chosen = torch.device(device)
    if isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype:
        torch_dtype = getattr(torch, dtype)
    elif chosen.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        torch_dtype = torch.bfloat16  # as fast as float16 on Ampere and later, and no overflow to NaN
    else:
        torch_dtype = torch.float32 if chosen.type == "cpu" else torch.float16
    return chosen, torch_dtype


def memory_mb(device: torch.device) -> float:
    """GPU memory allocated by torch on an accelerator, else this process's resident memory, in MB."""
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return round(psutil.Process().memory_info().rss / 2**20, 1)


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
    loras: list[LoraUse] = field(default_factory=list)  # compatible ones only; `prompt` has no <lora:> tags
    hires: HiresPlan | None = None
    refiner: RefinerPlan | None = None
    warnings: list[str] = field(default_factory=list)
    job_id: str = ""  # the service's id for the job (logs, progress and hand-offs of a batch)
    image_index: int = 0  # which of its request's images this is (batch_size x n_iter images, seed + index)
    image_count: int = 1

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
        return (self.mode, self.steps, self.cfg_scale, self.width, self.height, sampler, self.clip_skip,
                self.denoising_strength, loras, self.hires, refiner, alone)  # fmt: skip


UpscaleHook = Callable[[list[Image.Image], str, int, int], list[Image.Image]]  # (images, upscaler, width, height)
RefineHook = Callable[[ModelEntry, list[PreparedJob], torch.Tensor, PhaseProgress], list[Image.Image]]


@dataclass
class GenerationResult:
    image: Image.Image
    seed: int
    infotext: str
    width: int
    height: int
    generation_time_sec: float
    memory_before_mb: float
    memory_after_mb: float
    model: str
    model_hash: str
    warnings: list[str]
    batch_size: int = 1  # how many jobs ran in the diffusers call that made this image


def random_seed() -> int:
    return secrets.randbelow(2**32)


def prepare_job(
    request: Txt2ImgRequest | Img2ImgRequest,
    model: ModelEntry | None = None,
    loras: LoraLibrary | None = None,
    catalog: ModelCatalog | None = None,
    upscalers: UpscalerLibrary | None = None,
) -> PreparedJob:
    """Validates a request and resolves everything that needs no loaded model: sampler, seed, input image,
    LoRAs (checked against `model`; incompatible ones dropped with a warning), hires fix and refiner."""
    mode: Mode = "img2img" if isinstance(request, Img2ImgRequest) else "txt2img"
    sampler = resolve_sampler(request.sampler_name, request.scheduler_type)
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
        cfg_scale=request.cfg_scale,
        width=request.width,
        height=request.height,
        seed=seed,
        sampler=sampler,
        clip_skip=request.clip_skip,
        loras=plan.uses if plan else [],
        warnings=list(plan.warnings) if plan else [],
    )
    if isinstance(request, Img2ImgRequest):
        image = decode_base64_image(request.image, field="image")
        job.init_image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
        job.denoising_strength = at_least_one_step(request.steps, request.denoising_strength, "", job.warnings)
    job.hires = _plan_hires(request, mode, upscalers, job.warnings)
    job.refiner = _plan_refiner(request, mode, model, catalog, job.warnings)
    if job.hires is not None:
        job.denoising_strength = job.hires.denoising_strength
    return job


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
    request: GenerationRequest, mode: Mode, upscalers: UpscalerLibrary | None, warnings: list[str]
) -> HiresPlan | None:
    hires = request.hires if isinstance(request, Txt2ImgRequest) else None  # a field of txt2img only
    if hires is None or not hires.enabled:
        return None
    if upscalers is None:
        raise InvalidRequestError("hires fix needs the upscaler folder; none is configured here", field="hires")
    upscaler = upscalers.check(hires.upscaler)
    scale = hires.scale
    width, height = hires_size(request.width, request.height, scale)
    if max(width, height) > LIMITS.max_size or width * height > LIMITS.max_pixels:
        # The largest factor within the limits (the first pass itself is within them: at least 1x).
        first_pixels = request.width * request.height
        scale = min(LIMITS.max_size / max(request.width, request.height), math.sqrt(LIMITS.max_pixels / first_pixels))
        fitted = (max(8, int(request.width * scale) // 8 * 8), max(8, int(request.height * scale) // 8 * 8))
        warnings.append(
            f"hires fix: {hires.scale:g}x would make {width}x{height}, above the limits of {LIMITS.max_size} px a "
            f"side and {LIMITS.max_pixels} pixels; upscaled {scale:.3g}x to {fitted[0]}x{fitted[1]} instead"
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
    if refiner.family != "sdxl-refiner":
        installed = [e.name for e in catalog.list_models() if e.family == "sdxl-refiner"]
        raise UnknownModelError(
            f"'refiner_checkpoint' {refiner.name!r} is not an SDXL refiner (it is an "
            f"{FAMILY_LABELS[refiner.family]} model); "
            f"installed refiners: {', '.join(map(repr, installed)) or 'none'}",
            field="refiner_checkpoint",
        )
    skipped = f"refiner '{refiner.name}' not used: "
    if model is not None and model.family != "sdxl":
        warnings.append(skipped + f"a refiner continues SDXL base models; '{model.name}' is "
                        f"{FAMILY_LABELS[model.family]}")  # fmt: skip
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


def check_mode_supported(entry: ModelEntry, mode: Mode) -> None:
    """A refiner only continues images: it has no first text encoder for txt2img."""
    if entry.family == "sdxl-refiner" and mode == "txt2img":
        raise UnknownModelError(
            f"model '{entry.name}' is an SDXL refiner, not a txt2img model: use it for img2img or as "
            "'refiner_checkpoint'",
            field="model",
        )


class LoadedModel:
    """A checkpoint's pipeline plus the lock that keeps one job at a time on it (jobs set its scheduler)."""

    def __init__(self, entry: ModelEntry, pipe, model_hash: str):
        self.entry = entry
        self.pipe = pipe
        self.model_hash = model_hash
        self.lock = threading.Lock()
        self.speed: list[str] = []  # speed options applied at load
        self.qkv_fused = False
        self._img2img = None
        self.adapters: OrderedDict[str, str] = OrderedDict()  # LoRA adapters kept loaded: name -> file

    MAX_CACHED_ADAPTERS = 4

    def apply_loras(self, uses: list[LoraUse]) -> tuple[list[LoraUse], list[str]]:
        """Loads (or reuses) and activates the job's LoRAs at their scales; returns the ones applied and a
        warning for each that failed to load (skipped). Call `clear_loras` when the job ends. Hold `lock`."""
        warnings = []
        active = []
        for use in uses:
            if use.adapter_name not in self.adapters:
                error = self.load_adapter(use)
                if error is not None:
                    warnings.append(f"LoRA '{use.lora.name}' skipped: it could not be loaded into model "
                                    f"'{self.entry.name}': {error}")  # fmt: skip
                    continue
            self.adapters.move_to_end(use.adapter_name)
            active.append(use)
        if active:
            self.pipe.enable_lora()
            self.pipe.set_adapters([u.adapter_name for u in active], adapter_weights=[u.scale for u in active])
        return active, warnings

    def load_adapter(self, use: LoraUse) -> str | None:
        """Loads one LoRA as a named adapter (evicting the least recently used); the error text on failure."""
        self._evict_adapters(self.MAX_CACHED_ADAPTERS - 1)
        try:
            self.pipe.load_lora_weights(read_lora_state_dict(use.lora.path), adapter_name=use.adapter_name)
        except Exception as error:  # size mismatches are RuntimeError; unknown layers are peft errors
            self._forget_adapter(use.adapter_name)
            return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        present = {name for names in self.pipe.get_list_adapters().values() for name in names}
        if use.adapter_name not in present:
            return "no layer of the model matched its weights"
        self.adapters[use.adapter_name] = str(use.lora.path)
        return None

    def _evict_adapters(self, limit: int) -> None:
        """Deletes the least recently used adapters until at most `limit` stay loaded."""
        while len(self.adapters) > max(limit, 0):
            name, _ = self.adapters.popitem(last=False)
            self._forget_adapter(name)

    def unload_adapter(self, name: str) -> None:
        """Removes one LoRA adapter from the model. Hold `lock`."""
        self.adapters.pop(name, None)
        self._forget_adapter(name)

    def _forget_adapter(self, name: str) -> None:
        present = {adapter for names in self.pipe.get_list_adapters().values() for adapter in names}
        if name in present:
            self.pipe.delete_adapters([name])

    def clear_loras(self) -> None:
        """Turns every LoRA off, so the next job sees the model exactly as loaded. Hold `lock`."""
        if self.adapters:
            self.pipe.disable_lora()

    def pipeline_for(self, mode: Mode):
        check_mode_supported(self.entry, mode)
        if mode == "txt2img" or self.entry.family == "sdxl-refiner":
            return self.pipe
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

            cls = StableDiffusionXLImg2ImgPipeline if self.entry.family == "sdxl" else StableDiffusionImg2ImgPipeline
            self._img2img = cls.from_pipe(self.pipe)  # shares the modules: no extra memory
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


def load_pipeline(entry: ModelEntry, device: torch.device, dtype: torch.dtype):
    """Loads a checkpoint with diffusers' own loaders, offline for local folders."""
    import diffusers

    try:
        if entry.format == "single-file":
            cls = {
                "sd15": diffusers.StableDiffusionPipeline,
                "sdxl": diffusers.StableDiffusionXLPipeline,
                "sdxl-refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
            }[entry.family]
            extra = {"config": str(entry.config_dir), "local_files_only": True} if entry.config_dir else {}
            pipe = cls.from_single_file(str(entry.path), dtype=dtype, **extra)
        else:
            pipe = diffusers.DiffusionPipeline.from_pretrained(entry.path, dtype=dtype, local_files_only=True)
    except Exception as error:
        hint = ""
        if entry.format == "single-file" and entry.config_dir is None:
            hint = (
                f" (offline, a single-file checkpoint needs its diffusers configs in "
                f"{entry.path.parent / '.configs' / entry.name}/)"
            )
        raise ModelLoadError(f"could not load model '{entry.name}': {error}{hint}", field="model") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class ImageEngine:
    """Loads checkpoints (LRU-cached) and runs jobs on them. Thread-safe; one job per model at a time."""

    def __init__(
        self,
        catalog: ModelCatalog,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_loaded_models: int = 2,
        torch_threads: int | None = None,
        speed: SpeedOptions | None = None,
    ):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        if torch_threads:
            # Ray sets OMP_NUM_THREADS=1 in replicas with num_cpus <= 1: without this, torch runs on one core.
            torch.set_num_threads(torch_threads)
        self.catalog = catalog
        self.loras = LoraLibrary(catalog.settings, catalog.facts)
        self.device, self.dtype = select_device(device, dtype)
        self.speed = speed or SpeedOptions.from_env()
        self.upscalers = UpscalerLibrary(catalog.settings, device=self.device)
        self.max_loaded_models = max_loaded_models
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    # Models ------------------------------------------------------------------------------------------------
    def load(self, model: str | ModelEntry | None) -> LoadedModel:
        """The loaded pipeline for a model name/label/entry; loads it (evicting the least recently used)."""
        entry = model if isinstance(model, ModelEntry) else self.catalog.resolve(model)
        with self._lock:
            loaded = self._loaded.get(entry.name)
            if loaded is not None and loaded.entry == entry:
                self._loaded.move_to_end(entry.name)
                return loaded
            self._make_room()
            started = time.perf_counter()
            loaded = self._keep(entry, load_pipeline(entry, self.device, self.dtype))
            options = ", ".join(loaded.speed) or "no speed options"
            logger.info("loaded model %s in %.2fs on %s (%s; %s)", entry.name, time.perf_counter() - started,
                        self.device, str(self.dtype).removeprefix("torch."), options)  # fmt: skip
            return loaded

    def adopt(self, entry: ModelEntry, pipe) -> LoadedModel:
        """Takes a pipeline built elsewhere (the GPU benchmark's full-size random models) as the loaded model for
        `entry`, as `load` would: progress bars off, this engine's speed options applied, LRU eviction."""
        pipe.set_progress_bar_config(disable=True)
        with self._lock:
            self._loaded.pop(entry.name, None)
            self._make_room()
            return self._keep(entry, pipe)

    def _make_room(self) -> None:
        while len(self._loaded) >= self.max_loaded_models:
            name, _ = self._loaded.popitem(last=False)
            logger.info("unloading model %s", name)
            self._free_memory()

    def _keep(self, entry: ModelEntry, pipe) -> LoadedModel:
        loaded = LoadedModel(entry, pipe, self.catalog.model_hash(entry) if entry.path.exists() else "0" * 10)
        loaded.speed = apply_speed_options(pipe, self.speed)
        loaded.qkv_fused = "fused QKV" in loaded.speed
        self._loaded[entry.name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is not None:
                self._free_memory()

    def loaded_models(self) -> list[str]:
        return list(self._loaded)

    def _free_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # Jobs --------------------------------------------------------------------------------------------------
    def prepare(self, request: Txt2ImgRequest | Img2ImgRequest, model: ModelEntry | None = None) -> PreparedJob:
        """`prepare_job` with this engine's LoRA folder, for `model` (the request's model when not given)."""
        model = model or self.catalog.resolve(request.model)
        return prepare_job(request, model, self.loras, self.catalog, self.upscalers)

    def warm_up(self, model: str, width: int, height: int, steps: int, batch_sizes: list[int]) -> float:
        """Loads `model` and runs throwaway jobs of each batch size, so work done on a model's first calls
        (torch.compile compiles per shape) happens now rather than on a user's job; returns the seconds."""
        started = time.perf_counter()
        loaded = self.load(model)
        mode: Mode = "img2img" if loaded.entry.family == "sdxl-refiner" else "txt2img"
        for batch_size in batch_sizes:
            fields = {"prompt": "warm-up", "model": loaded.entry.name, "steps": steps, "width": width,
                      "height": height}  # fmt: skip
            requests = [
                Img2ImgRequest(**fields, image=_gray_png_base64(width, height), seed=seed)
                if mode == "img2img"
                else Txt2ImgRequest(**fields, seed=seed)
                for seed in range(batch_size)
            ]
            self.run(loaded, [self.prepare(request, loaded.entry) for request in requests])
        return time.perf_counter() - started

    def txt2img(self, request: Txt2ImgRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        loaded = self.load(request.model)
        return self.run(loaded, [self.prepare(request, loaded.entry)], progress)[0]

    def img2img(self, request: Img2ImgRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        loaded = self.load(request.model)
        return self.run(loaded, [self.prepare(request, loaded.entry)], progress)[0]

    def run(
        self,
        loaded: LoadedModel,
        jobs: list[PreparedJob],
        progress: ProgressCallback | None = None,
        upscale: UpscaleHook | None = None,
        refine: RefineHook | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> list[GenerationResult]:
        """Runs compatible jobs as one diffusers call (plus their hires pass or refiner); returns one result per
        job, in order. `upscale` and `refine` replace the in-process upscaler and refiner (the service hands
        that work to other deployments)."""
        if not jobs:
            return []
        first = jobs[0]
        if any(job.batch_key() != first.batch_key() for job in jobs):
            raise ValueError("jobs in one batch must share mode, size, steps, cfg, sampler and strength")
        phases = PhaseProgress.for_job(first, progress, is_cancelled)
        with loaded.lock:
            pipe = loaded.pipeline_for(first.mode)
            memory_before = memory_mb(self.device)
            started = time.perf_counter()
            pipe.scheduler = build_scheduler(first.sampler, dict(loaded.pipe.scheduler.config))
            applied, lora_warnings = loaded.apply_loras(first.loras) if first.mode == "txt2img" else ([], [])
            if applied and loaded.qkv_fused:
                set_qkv_fused(loaded.pipe, False)
            final_size = (first.hires.width, first.hires.height) if first.hires else (first.width, first.height)
            set_vae_tiling(loaded.pipe, self.speed, *final_size)
            clip_warnings = _fit_clip_skip(pipe, jobs)
            try:
                for job in jobs:
                    job.sampler = first.sampler  # equal in a batch; build_scheduler may have adjusted its label
                    job.loras = applied
                    new_warnings = first.sampler.warnings + lora_warnings + clip_warnings
                    job.warnings.extend(w for w in dict.fromkeys(new_warnings) if w not in job.warnings)
                if first.hires is not None:
                    images = self._run_hires(loaded, pipe, jobs, phases, upscale or self._upscale_here)
                elif first.refiner is not None:
                    latents = self._call_pipeline(pipe, jobs, phases.step(PHASE_GENERATION), output_type="latent",
                                                  denoising_end=first.refiner.switch_at)  # fmt: skip
                    images = (refine or self._refine_here)(first.refiner.model, jobs, latents, phases)
                else:
                    images = self._call_pipeline(pipe, jobs, phases.step(PHASE_GENERATION))
            except torch.cuda.OutOfMemoryError as error:
                self._free_memory()
                raise OutOfMemoryError(
                    f"out of GPU memory at {first.width}x{first.height}"
                    + (f" (hires to {first.hires.width}x{first.hires.height})" if first.hires else "")
                    + f", {len(jobs)} image(s): try a smaller size, a smaller hires scale or fewer LoRAs ({error})"
                ) from error
            finally:
                loaded.clear_loras()
                if applied and loaded.qkv_fused:
                    set_qkv_fused(loaded.pipe, True)
            elapsed = round(time.perf_counter() - started, 3)
            memory_after = memory_mb(self.device)
        return [
            GenerationResult(
                image=image,
                seed=job.seed,
                infotext=self.infotext(loaded, job),
                width=image.width,
                height=image.height,
                generation_time_sec=elapsed,
                memory_before_mb=memory_before,
                memory_after_mb=memory_after,
                model=loaded.entry.name,
                model_hash=loaded.model_hash,
                warnings=list(job.warnings),
                batch_size=len(jobs),
            )
            for job, image in zip(jobs, images, strict=True)
        ]

    def run_batch(
        self,
        loaded: LoadedModel,
        jobs: list[PreparedJob],
        progress: BatchProgressCallback | None = None,
        upscale: UpscaleHook | None = None,
        refine: RefineHook | None = None,
        is_cancelled: Callable[[PreparedJob], bool] | None = None,
    ) -> list[GenerationResult | DiffusionAPIError]:
        """Runs jobs from different requests as one batch and gives each its own outcome: its result, or the
        error that ended it. A job cancelled while its batch-mates run on gets JobCancelledError (its image is
        discarded); the call stops early only when every job of the batch is cancelled. When the batch runs
        out of memory, each job is retried alone before any job fails."""

        def run_group(group: list[PreparedJob]) -> list[GenerationResult | DiffusionAPIError]:
            on_progress = (lambda done, total, phase: progress(group, done, total, phase)) if progress else None
            all_cancelled = (lambda: all(is_cancelled(job) for job in group)) if is_cancelled else None
            results = self.run(loaded, group, on_progress, upscale, refine, all_cancelled)
            return [
                JobCancelledError("cancelled by request") if is_cancelled and is_cancelled(job) else result
                for job, result in zip(group, results, strict=True)
            ]

        try:
            return run_group(jobs)
        except JobCancelledError as error:
            return [error] * len(jobs)
        except OutOfMemoryError as error:
            if len(jobs) == 1:
                return [error]
            logger.warning("a batch of %d ran out of memory; retrying its jobs one by one", len(jobs))
        outcomes: list[GenerationResult | DiffusionAPIError] = []
        for job in jobs:
            try:
                outcomes.extend(run_group([job]))
            except DiffusionAPIError as error:  # out of memory alone too, cancelled, ...
                outcomes.append(error)
        return outcomes

    def _run_hires(self, loaded: LoadedModel, pipe, jobs: list[PreparedJob], phases: "PhaseProgress",
                   upscale: "UpscaleHook") -> list[Image.Image]:  # fmt: skip
        """First pass at the requested size, upscale (latents, or the decoded image with an upscaler model),
        then an img2img pass at the final size, with the same seeds."""
        hires = jobs[0].hires
        if hires.latent is not None:
            latents = self._call_pipeline(pipe, jobs, phases.step(PHASE_FIRST_PASS), output_type="latent")
            phases.report(PHASE_UPSCALING, 0, 1)
            second_input = upscale_latents(latents, hires.height, hires.width, hires.latent)
        else:
            first_pass = self._call_pipeline(pipe, jobs, phases.step(PHASE_FIRST_PASS))
            phases.report(PHASE_UPSCALING, 0, 1)
            second_input = upscale(first_pass, hires.upscaler, hires.width, hires.height)
        phases.report(PHASE_UPSCALING, 1, 1)
        img2img = loaded.pipeline_for("img2img")
        img2img.scheduler = build_scheduler(jobs[0].sampler, dict(loaded.pipe.scheduler.config))
        return self._call_pipeline(img2img, jobs, phases.step(PHASE_HIRES_PASS), image=second_input,
                                   strength=hires.denoising_strength, num_inference_steps=hires.steps,
                                   width=hires.width, height=hires.height)  # fmt: skip

    def _upscale_here(self, images: list[Image.Image], upscaler: str, width: int, height: int) -> list[Image.Image]:
        return [self.upscalers.upscale(image, upscaler, width, height) for image in images]

    def _refine_here(self, refiner: ModelEntry, jobs: list[PreparedJob], latents, phases: "PhaseProgress"):
        return self.refine(self.load(refiner), jobs, latents, phases.step(PHASE_REFINING))

    def refine(self, loaded: LoadedModel, jobs: list[PreparedJob], latents, on_step: "StepCallback"):
        """The refiner's part of a base -> refiner job: the steps after `switch_at`, from the base's latents."""
        first = jobs[0]
        with loaded.lock:
            pipe = loaded.pipeline_for("img2img")
            pipe.scheduler = build_scheduler(first.sampler, dict(loaded.pipe.scheduler.config))
            set_vae_tiling(loaded.pipe, self.speed, first.width, first.height)
            return self._call_pipeline(pipe, jobs, on_step, image=latents.to(self.device, self.dtype),
                                       denoising_start=first.refiner.switch_at)  # fmt: skip

    def _call_pipeline(self, pipe, jobs: list[PreparedJob], on_step: "StepCallback", **overrides):
        """One diffusers call for the batch; `overrides` replace or add call arguments (image, strength,
        output_type, denoising_start/end, ...)."""
        first = jobs[0]

        def on_step_end(pipeline, step_index, timestep, callback_kwargs):
            on_step(step_index + 1, pipeline.num_timesteps)
            return callback_kwargs

        prompts, negatives = [job.prompt for job in jobs], [job.negative_prompt for job in jobs]
        # Emphasis, BREAK or more than 75 tokens: A1111's chunked, weighted encoding (pipelines/prompts.py);
        # otherwise diffusers' own, so that a plain prompt gives the pixels it always did.
        own_encoding = any(needs_own_encoding(pipe, text) for text in prompts + negatives)
        arguments = dict(
            prompt=[without_emphasis(text) for text in prompts],
            negative_prompt=[without_emphasis(text) for text in negatives],
            num_inference_steps=first.steps,
            guidance_scale=first.cfg_scale,
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            clip_skip=first.clip_skip - 1 if first.clip_skip > 1 else None,
            callback_on_step_end=on_step_end,
        )
        if first.mode == "img2img":
            arguments.update(image=[job.init_image for job in jobs], strength=first.denoising_strength)
        arguments.update(width=first.width, height=first.height)
        arguments.update(overrides)
        # Not every pipeline takes every argument (SDXL img2img has no size: the image sets it).
        parameters = _call_parameters(pipe)
        for name in ("clip_skip", "denoising_start", "denoising_end", "width", "height"):
            if name in arguments and name not in parameters:
                arguments.pop(name)
        with torch.inference_mode():
            if own_encoding:
                arguments.update(encode_prompts(pipe, prompts, negatives, first.clip_skip))
                for name in ("prompt", "negative_prompt", "clip_skip"):
                    arguments.pop(name, None)
            elif arguments.get("clip_skip") and not hasattr(pipe.text_encoder, "text_model") and not _is_sdxl(pipe):
                # diffusers' SD1.5 clip skip reaches for `text_encoder.text_model`, which transformers 5
                # removed from CLIPTextModel; encode the prompts here instead, the same way A1111 does.
                arguments["prompt_embeds"] = _embeds_with_clip_skip(pipe, arguments.pop("prompt"), first.clip_skip)
                arguments["negative_prompt_embeds"] = _embeds_with_clip_skip(
                    pipe, arguments.pop("negative_prompt"), first.clip_skip
                )
                arguments.pop("clip_skip")
            output = pipe(**arguments).images
        return output

    def infotext(self, loaded: LoadedModel, job: PreparedJob) -> str:
        params = {
            "Steps": job.steps,
            "Sampler": job.sampler.sampler,
            "Schedule type": job.sampler.schedule_label,
            "CFG scale": job.cfg_scale,
            "Seed": job.seed,
            "Size": f"{job.width}x{job.height}",
            "Model hash": loaded.model_hash,
            "Model": loaded.entry.name,
            "Denoising strength": job.denoising_strength,
            "Clip skip": job.clip_skip if job.clip_skip >= 2 else None,
            "RNG": "CPU",
            "Lora hashes": lora_hashes_value(job.loras),
            "Version": INFOTEXT_VERSION,
        }
        if job.hires is not None:
            params.update({"Hires upscale": f"{job.hires.scale:g}", "Hires steps": job.hires.steps,
                           "Hires upscaler": job.hires.upscaler})  # fmt: skip
        if job.refiner is not None:
            params.update({"Refiner": f"{job.refiner.model.name} [{job.refiner.model_hash}]",
                           "Refiner switch at": job.refiner.switch_at})  # fmt: skip
        return build_infotext(prompt_with_lora_tags(job.prompt, job.loras), job.negative_prompt, params)


def _gray_png_base64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return encode_base64(buffer.getvalue())


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _fit_clip_skip(pipe, jobs: list[PreparedJob]) -> list[str]:
    """Clip skip counts back through the text encoder's layers; a model with fewer layers than asked for (a
    small or pruned encoder) uses its first layer, and the job says so."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    layers = [encoder.config.num_hidden_layers for encoder in encoders if encoder is not None]
    deepest = min(layers, default=jobs[0].clip_skip)
    if jobs[0].clip_skip <= deepest:
        return []
    asked = jobs[0].clip_skip
    for job in jobs:
        job.clip_skip = deepest
    return [f"clip_skip {asked} is more than the text encoder's {deepest} layers; used {deepest}"]


def _embeds_with_clip_skip(pipe, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """CLIP text embeddings from the layer `clip_skip` counts back from the last (A1111's definition:
    1 = last layer), passed through the final layer norm."""
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    encoder = pipe.text_encoder
    output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
    hidden = output.hidden_states[-clip_skip]
    return encoder.final_layer_norm(hidden).to(dtype=encoder.dtype)
