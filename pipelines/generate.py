"""txt2img and img2img on loaded diffusers pipelines.

The flow of a job, top to bottom:
1. `prepare_job` checks the request and resolves everything that needs no model (sampler, seed, the
   input image), so bad input fails before any model work;
2. `ImageEngine.load` returns the model's pipeline from a small LRU cache (loaded with the real loaders);
3. `ImageEngine.run` runs a list of compatible jobs as one diffusers call with one generator per job, so
   each job gets exactly its own seed's image, and builds each image's A1111 infotext.
"""

import logging
import os
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import psutil
import torch
from PIL import Image

from pipelines.catalog import ModelCatalog, ModelEntry
from pipelines.errors import InvalidRequestError, ModelLoadError
from pipelines.images import decode_base64_image
from pipelines.infotext import build_infotext
from pipelines.loras import LoraLibrary, LoraUse, lora_hashes_value, prompt_with_lora_tags, read_lora_state_dict
from pipelines.samplers import ResolvedSampler, build_scheduler, resolve_sampler
from pipelines.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from pipelines.settings import VERSION

logger = logging.getLogger(__name__)
# Keeping several LoRA adapters loaded on one model is deliberate (a cache); peft warns about it each time.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)

INFOTEXT_VERSION = f"DiffusionAPI v{VERSION}"  # must not look like "v1.x": A1111 would apply backcompat
ProgressCallback = Callable[[int, int, str], None]  # (step, total steps, phase)
Mode = Literal["txt2img", "img2img"]


def select_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in half precision where present, then Apple MPS, else the CPU in float32.

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
    if dtype:
        torch_dtype = getattr(torch, dtype)
    else:
        torch_dtype = torch.float32 if chosen.type == "cpu" else torch.float16
    return chosen, torch_dtype


def memory_mb(device: torch.device) -> float:
    """GPU memory allocated by torch on an accelerator, else this process's resident memory, in MB."""
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return round(psutil.Process().memory_info().rss / 2**20, 1)


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
    warnings: list[str] = field(default_factory=list)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can run as one diffusers batch."""
        loras = tuple((use.adapter_name, use.scale) for use in self.loras)
        sampler = (self.sampler.scheduler_class, tuple(sorted(self.sampler.options.items())))
        return (self.mode, self.steps, self.cfg_scale, self.width, self.height, sampler, self.clip_skip,
                self.denoising_strength, loras)  # fmt: skip


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


def random_seed() -> int:
    return secrets.randbelow(2**32)


def _reject_unsupported(request: GenerationRequest) -> None:
    """Features that later versions add; until then they are refused, never silently ignored."""
    if request.hires is not None and request.hires.enabled:
        raise InvalidRequestError("'hires' (hires fix) is not available in this version", field="hires")
    if request.refiner_checkpoint:
        raise InvalidRequestError("'refiner_checkpoint' is not available in this version", field="refiner_checkpoint")


def prepare_job(
    request: Txt2ImgRequest | Img2ImgRequest, model: ModelEntry | None = None, loras: LoraLibrary | None = None
) -> PreparedJob:
    """Validates a request and resolves its sampler, seed, input image and LoRAs (checked against `model`;
    incompatible ones are dropped with a warning)."""
    _reject_unsupported(request)
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
        effective_steps = int(request.steps * request.denoising_strength)
        if effective_steps < 1:
            raise InvalidRequestError(
                f"steps x denoising_strength must give at least one step (got {request.steps} x "
                f"{request.denoising_strength}); raise 'steps' or 'denoising_strength'",
                field="denoising_strength",
            )
        image = decode_base64_image(request.image, field="image")
        job.init_image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
        job.denoising_strength = request.denoising_strength
    return job


def check_mode_supported(entry: ModelEntry, mode: Mode) -> None:
    """A refiner only continues images: it has no first text encoder for txt2img."""
    if entry.family == "sdxl-refiner" and mode == "txt2img":
        raise InvalidRequestError(
            f"model '{entry.name}' is an SDXL refiner: use it for img2img or as 'refiner_checkpoint', not for txt2img",
            field="model",
        )


class LoadedModel:
    """A checkpoint's pipeline plus the lock that keeps one job at a time on it (jobs set its scheduler)."""

    def __init__(self, entry: ModelEntry, pipe, model_hash: str):
        self.entry = entry
        self.pipe = pipe
        self.model_hash = model_hash
        self.lock = threading.Lock()
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
        dtype: str | None = None,
        max_loaded_models: int = 2,
    ):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        self.catalog = catalog
        self.loras = LoraLibrary(catalog.settings, catalog.facts)
        self.device, self.dtype = select_device(device, dtype)
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
            while len(self._loaded) >= self.max_loaded_models:
                name, _ = self._loaded.popitem(last=False)
                logger.info("unloading model %s", name)
                self._free_memory()
            started = time.perf_counter()
            pipe = load_pipeline(entry, self.device, self.dtype)
            loaded = LoadedModel(entry, pipe, self.catalog.model_hash(entry))
            self._loaded[entry.name] = loaded
            logger.info("loaded model %s in %.2fs on %s", entry.name, time.perf_counter() - started, self.device)
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
        return prepare_job(request, model or self.catalog.resolve(request.model), self.loras)

    def txt2img(self, request: Txt2ImgRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        loaded = self.load(request.model)
        return self.run(loaded, [self.prepare(request, loaded.entry)], progress)[0]

    def img2img(self, request: Img2ImgRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        loaded = self.load(request.model)
        return self.run(loaded, [self.prepare(request, loaded.entry)], progress)[0]

    def run(
        self, loaded: LoadedModel, jobs: list[PreparedJob], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Runs compatible jobs as one diffusers call; returns one result per job, in order."""
        if not jobs:
            return []
        first = jobs[0]
        if any(job.batch_key() != first.batch_key() for job in jobs):
            raise ValueError("jobs in one batch must share mode, size, steps, cfg, sampler and strength")
        with loaded.lock:
            pipe = loaded.pipeline_for(first.mode)
            memory_before = memory_mb(self.device)
            started = time.perf_counter()
            pipe.scheduler = build_scheduler(first.sampler, dict(loaded.pipe.scheduler.config))
            applied, lora_warnings = loaded.apply_loras(first.loras) if first.mode == "txt2img" else ([], [])
            try:
                for job in jobs:
                    job.loras = applied
                    job.warnings.extend(w for w in first.sampler.warnings + lora_warnings if w not in job.warnings)
                    job.warnings.extend(self._prompt_warnings(pipe, job))
                images = self._call_pipeline(pipe, jobs, progress)
            finally:
                loaded.clear_loras()
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
            )
            for job, image in zip(jobs, images, strict=True)
        ]

    def _call_pipeline(self, pipe, jobs: list[PreparedJob], progress: ProgressCallback | None) -> list[Image.Image]:
        first = jobs[0]
        phase = "generation"

        def on_step_end(pipeline, step_index, timestep, callback_kwargs):
            if progress is not None:
                progress(step_index + 1, pipeline.num_timesteps, phase)
            return callback_kwargs

        arguments = dict(
            prompt=[job.prompt for job in jobs],
            negative_prompt=[job.negative_prompt for job in jobs],
            num_inference_steps=first.steps,
            guidance_scale=first.cfg_scale,
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            clip_skip=first.clip_skip - 1 if first.clip_skip > 1 else None,
            callback_on_step_end=on_step_end,
        )
        if first.mode == "img2img":
            arguments.update(image=[job.init_image for job in jobs], strength=first.denoising_strength)
            if "width" in _call_parameters(pipe):  # SDXL img2img has no size arguments: the image sets it
                arguments.update(width=first.width, height=first.height)
        else:
            arguments.update(width=first.width, height=first.height)
        if "clip_skip" not in _call_parameters(pipe):
            arguments.pop("clip_skip")
        with torch.inference_mode():
            if arguments.get("clip_skip") and not hasattr(pipe.text_encoder, "text_model") and not _is_sdxl(pipe):
                # diffusers' SD1.5 clip skip reaches for `text_encoder.text_model`, which transformers 5
                # removed from CLIPTextModel; encode the prompts here instead, the same way A1111 does.
                arguments["prompt_embeds"] = _embeds_with_clip_skip(pipe, arguments.pop("prompt"), first.clip_skip)
                arguments["negative_prompt_embeds"] = _embeds_with_clip_skip(
                    pipe, arguments.pop("negative_prompt"), first.clip_skip
                )
                arguments.pop("clip_skip")
            return pipe(**arguments).images

    @staticmethod
    def _prompt_warnings(pipe, job: PreparedJob) -> list[str]:
        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        if tokenizer is None:
            return []
        warnings = []
        for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            count = len(tokenizer(text, truncation=False).input_ids)
            if count > tokenizer.model_max_length:
                warnings.append(f"'{name}' is {count} tokens; only the first {tokenizer.model_max_length} are used.")
        return warnings

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
        return build_infotext(prompt_with_lora_tags(job.prompt, job.loras), job.negative_prompt, params)


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


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
