"""txt2img and img2img on loaded diffusers pipelines.

The flow of a job, top to bottom:
1. `prepare_job` (pipelines/prepare.py) checks the request and resolves everything that needs no model
   (sampler, seed, the input image, LoRAs, hires fix, refiner), so bad input fails before any model work;
2. `ImageEngine.load` returns the model's pipeline from a small LRU cache, the one owner of loaded pipelines
   (pipelines/models.py: loaded with the real loaders);
3. `ImageEngine.run` runs a list of compatible jobs as one diffusers call with one generator per job, so
   each job gets exactly its own seed's image (prompts encoded by pipelines/prompts.py where A1111's syntax
   needs it; progress through pipelines/progress.py), and builds each image's A1111 infotext.
"""

import contextlib
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from pipelines.catalog import ModelCatalog, ModelEntry
from pipelines.control_plan import control_files
from pipelines.control_run import control_arguments, controlled
from pipelines.controlnets import ControlNetLibrary, module_bytes
from pipelines.embeddings import EmbeddingLibrary, load_into, rewrite_prompt, unload_from
from pipelines.errors import (
    DiffusionAPIError,
    JobCancelledError,
    OutOfMemoryError,
)
from pipelines.families import ModelFamily, family_of
from pipelines.images import encode_base64
from pipelines.infotext import build_infotext
from pipelines.inpaint import inpaint_arguments, is_inpaint_pipeline, paste_back
from pipelines.ip_adapter_run import IpAdapterFeatures, ScaleSchedule, adapters_of, encode_references
from pipelines.loras import (
    LoraLibrary,
    lora_hashes_value,
    prompt_with_lora_tags,
)
from pipelines.models import LoadedModel, Mode, check_device, load_pipeline, memory_mb, select_device
from pipelines.prepare import PreparedJob, prepare_job
from pipelines.previews import PREVIEW_INTERVAL_S, PREVIEW_SINK, preview_jpeg_base64
from pipelines.progress import (
    PHASE_FIRST_PASS,
    PHASE_GENERATION,
    PHASE_HIRES_PASS,
    PHASE_REFINING,
    PHASE_UPSCALING,
    BatchProgressCallback,
    PhaseProgress,
    ProgressCallback,
    StepCallback,
)
from pipelines.prompts import encode_prompts, needs_own_encoding, without_emphasis
from pipelines.samplers import build_scheduler
from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest
from pipelines.settings import VERSION
from pipelines.speed import SpeedOptions, apply_speed_options, set_vae_tiling
from pipelines.upscalers import UpscalerLibrary, upscale_latents
from pipelines.vaes import VaeLibrary

logger = logging.getLogger(__name__)

INFOTEXT_VERSION = f"DiffusionAPI v{VERSION}"  # must not look like "v1.x": A1111 would apply backcompat


@dataclass
class RefinedImages:
    """The refiner's part of a base -> refiner batch as it comes back to the base (from the Refiner deployment,
    pickled): the images, and for each job the warnings the refiner's run added and the embeddings it used
    (name -> A1111's short hash). The base adds them to the job's warnings and infotext, which it writes."""

    images: list[Image.Image]
    warnings: list[list[str]]
    ti_hashes: list[dict[str, str]]


UpscaleHook = Callable[[list[Image.Image], str, int, int], list[Image.Image]]  # (images, upscaler, width, height)
RefineHook = Callable[[ModelEntry, list[PreparedJob], torch.Tensor, PhaseProgress], RefinedImages]


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
    parameters: dict[str, str] = field(default_factory=dict)  # the infotext's parameters, structured


class ImageEngine:
    """Loads checkpoints and runs jobs on them. Thread-safe; one job per model at a time.

    Its LRU cache is the one owner of loaded pipelines, with the one budget (`max_loaded_models`): nothing else
    may keep a pipeline alive (the service's multiplexed cache holds handles, deployments/generators.py), so
    the models it lists are the ones in memory.
    """

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
        self.vaes = VaeLibrary(catalog.settings, catalog.facts)
        self.embeddings = EmbeddingLibrary(catalog.settings, catalog.facts)
        self.controlnets = ControlNetLibrary(catalog.settings, catalog.facts)
        self.device, self.dtype = select_device(device, dtype)
        self.speed = speed or SpeedOptions.from_env()
        self.upscalers = UpscalerLibrary(catalog.settings, device=self.device)
        self.max_loaded_models = max_loaded_models
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        # Re-entrant: a finalizer that runs in `_free_memory`'s gc.collect() may call `release` in this thread.
        self._lock = threading.RLock()

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
            # With model CPU offload, the parts stay in CPU memory and go to the device as each runs.
            offloaded = self.speed.cpu_offload == "model"
            device = torch.device("cpu") if offloaded else self.device
            loaded = self._keep(entry, load_pipeline(entry, device, self.dtype))
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
        loaded.speed = apply_speed_options(pipe, self.speed, self.device)
        loaded.qkv_fused = "fused QKV" in loaded.speed
        self._loaded[entry.name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is not None:
                self._free_memory()

    def release(self, loaded: LoadedModel) -> bool:
        """Unloads this very load of a model, if the cache still holds it (a later load of the same name is not
        touched, so a late or repeated call is harmless); whether it did. A job still running on it keeps it
        until the job ends."""
        if not self.holds(loaded):  # no lock for nothing to do: a load in progress does not hold this up
            return False
        with self._lock:
            if not self.holds(loaded):
                return False
            del self._loaded[loaded.entry.name]
            logger.info("unloading model %s", loaded.entry.name)
            self._free_memory()
            return True

    def holds(self, loaded: LoadedModel) -> bool:
        """Whether the cache still holds this very load of a model (not evicted or released since)."""
        return self._loaded.get(loaded.entry.name) is loaded

    def loaded_models(self) -> list[str]:
        return list(self._loaded)

    def check_health(self) -> None:
        """Raises when this engine's device no longer computes (pipelines/models.py `check_device`): cheap
        enough for a health check every few seconds."""
        check_device(self.device)

    def _free_memory(self) -> None:
        import gc

        self.controlnets.clear()  # cached ControlNets are reloaded from their files when next asked for
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # Jobs --------------------------------------------------------------------------------------------------
    def prepare(self, request: Txt2ImgRequest | Img2ImgRequest, model: ModelEntry | None = None) -> PreparedJob:
        """`prepare_job` with this engine's LoRA folder, for `model` (the request's model when not given)."""
        model = model or self.catalog.resolve(request.model)
        return prepare_job(request, model, self.loras, self.catalog, self.upscalers, self.vaes, self.embeddings,
                           controlnets=self.controlnets)  # fmt: skip

    def warm_up(self, model: str, width: int, height: int, steps: int, batch_sizes: list[int]) -> float:
        """Loads `model` and runs throwaway jobs of each batch size, so work done on a model's first calls
        (torch.compile compiles per shape) happens now rather than on a user's job; returns the seconds."""
        started = time.perf_counter()
        loaded = self.load(model)
        mode: Mode = "txt2img" if family_of(loaded.entry.family).txt2img else "img2img"
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

    def generate(
        self, request: Txt2ImgRequest | Img2ImgRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """One request's image on its model, loaded if need be (txt2img or img2img: the request's type says
        which). The CLI's, the benchmarks' and the tests' entry point; the service runs batches (`run_batch`)."""
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
        family = family_of(loaded.entry.family)
        # job_scope puts back whatever the job changes on the model (scheduler, LoRAs, QKV fusion, VAE tiling)
        # and vae_swapped the model's own VAE, however the job ends.
        # job_models holds what the job loads into the model for itself (its IP-Adapters), taken out first.
        with loaded.lock, loaded.job_scope(), loaded.vae_swapped(self._vae_for(loaded, first)), \
                contextlib.ExitStack() as job_models:  # fmt: skip
            pipe = loaded.pipeline_for(first.mode, masked=first.inpaint is not None)
            memory_before = memory_mb(self.device)
            started = time.perf_counter()
            embeddings: list[tuple] = []
            refiner_ti_hashes: list[dict[str, str]] = [{} for _ in jobs]
            try:
                pipe = controlled(loaded, pipe, first, self.controlnets)  # the ControlNet pipeline if units apply
                pipe.scheduler = build_scheduler(first.sampler, loaded.scheduler_config)
                fitting, lora_warnings = self.loras.usable(first.loras, loaded.entry) if first.loras else ([], [])
                applied, load_warnings = loaded.apply_loras(fitting) if first.mode == "txt2img" else ([], [])
                lora_warnings += load_warnings
                # IP-Adapters after the LoRAs: unfusing QKV for a LoRA sets the attention processors anew.
                job_models.enter_context(loaded.ip_adapters_loaded(adapters_of(jobs, self.controlnets.ip_adapters)))
                features = encode_references(jobs, self.controlnets.ip_adapters, loaded.denoiser)
                self.controlnets.fit_budget(module_bytes(loaded.denoiser), keep=control_files(first.controls))
                final_size = (first.hires.width, first.hires.height) if first.hires else (first.width, first.height)
                set_vae_tiling(loaded.pipe, self.speed, *final_size)
                clip_warnings = _fit_clip_skip(pipe, jobs)
                if family.guidance == "distilled" and not loaded.denoiser.config.get("guidance_embeds"):
                    for job in jobs:  # schnell: no guidance embedding, so no Distilled CFG Scale to run or write
                        job.distilled_cfg_scale = None
                embeddings = _load_embeddings(loaded.pipe, jobs)  # unloaded after the call
                for job in jobs:
                    job.sampler = first.sampler  # equal in a batch; build_scheduler may have adjusted its label
                    job.loras = applied
                    new_warnings = first.sampler.warnings + lora_warnings + clip_warnings
                    job.warnings.extend(w for w in dict.fromkeys(new_warnings) if w not in job.warnings)
                if first.hires is not None:
                    images = self._run_hires(loaded, pipe, jobs, phases, upscale or self._upscale_here, features)
                elif first.refiner is not None:
                    latents = self._call_pipeline(family, pipe, jobs, phases.step(PHASE_GENERATION),
                                                  output_type="latent", denoising_end=first.refiner.switch_at,
                                                  ip_features=features)  # fmt: skip
                    refined = (refine or self._refine_here)(first.refiner.model, jobs, latents, phases)
                    images, refiner_ti_hashes = refined.images, refined.ti_hashes
                    for job, added in zip(jobs, refined.warnings, strict=True):
                        job.warnings.extend(w for w in dict.fromkeys(added) if w not in job.warnings)
                else:
                    images = self._call_pipeline(family, pipe, jobs, phases.step(PHASE_GENERATION),
                                                 ip_features=features)  # fmt: skip
                images = [paste_back(image, job.inpaint) if job.inpaint else image
                          for job, image in zip(jobs, images, strict=True)]  # fmt: skip
            except torch.cuda.OutOfMemoryError as error:
                self._free_memory()
                raise OutOfMemoryError(
                    f"out of GPU memory at {first.width}x{first.height}"
                    + (f" (hires to {first.hires.width}x{first.hires.height})" if first.hires else "")
                    + f", {len(jobs)} image(s): try a smaller size, a smaller hires scale or fewer LoRAs ({error})"
                ) from error
            finally:
                unload_from(loaded.pipe, embeddings)  # logs its own failures; job_scope clears the LoRAs anyway
            elapsed = round(time.perf_counter() - started, 3)
            memory_after = memory_mb(self.device)
        parameters = [self.infotext_parameters(loaded, job, ti_hashes)
                      for job, ti_hashes in zip(jobs, refiner_ti_hashes, strict=True)]  # fmt: skip
        return [
            GenerationResult(
                image=image,
                seed=job.seed,
                infotext=_infotext_of(job, params),
                parameters=params,
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
            for job, image, params in zip(jobs, images, parameters, strict=True)
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
                   upscale: "UpscaleHook", features: IpAdapterFeatures | None = None) -> list[Image.Image]:  # fmt: skip
        """First pass at the requested size, upscale (latents, or the decoded image with an upscaler model),
        then an img2img pass at the final size, with the same seeds."""
        hires, family = jobs[0].hires, family_of(loaded.entry.family)
        if hires.latent is not None:
            latents = self._call_pipeline(family, pipe, jobs, phases.step(PHASE_FIRST_PASS), output_type="latent",
                                          ip_features=features)  # fmt: skip
            phases.report(PHASE_UPSCALING, 0, 1)
            second_input = upscale_latents(latents, hires.height, hires.width, hires.latent)
        else:
            first_pass = self._call_pipeline(family, pipe, jobs, phases.step(PHASE_FIRST_PASS),
                                             ip_features=features)  # fmt: skip
            phases.report(PHASE_UPSCALING, 0, 1)
            second_input = upscale(first_pass, hires.upscaler, hires.width, hires.height)
        phases.report(PHASE_UPSCALING, 1, 1)
        img2img = controlled(loaded, loaded.pipeline_for("img2img"), jobs[0], self.controlnets, hires_pass=True)
        img2img.scheduler = build_scheduler(jobs[0].sampler, loaded.scheduler_config)
        return self._call_pipeline(family, img2img, jobs, phases.step(PHASE_HIRES_PASS), hires_pass=True,
                                   image=second_input, strength=hires.denoising_strength,
                                   num_inference_steps=hires.steps, width=hires.width, height=hires.height,
                                   ip_features=features)  # fmt: skip

    def _upscale_here(self, images: list[Image.Image], upscaler: str, width: int, height: int) -> list[Image.Image]:
        return [self.upscalers.upscale(image, upscaler, width, height) for image in images]

    def _refine_here(self, refiner: ModelEntry, jobs: list[PreparedJob], latents,
                     phases: "PhaseProgress") -> RefinedImages:  # fmt: skip
        return self.refine(self.load(refiner), jobs, latents, phases.step(PHASE_REFINING))

    def refine(self, loaded: LoadedModel, jobs: list[PreparedJob], latents, on_step: "StepCallback") -> RefinedImages:
        """The refiner's part of a base -> refiner job: the steps after `switch_at`, from the base's latents.
        It runs on copies of the jobs' embedding lists and warnings: an embedding the refiner cannot load is
        left out of its own call only (the base used it, and its hash stays in the infotext); what the refiner
        adds comes back in the result, the same in this process as from the Refiner deployment."""
        first, family = jobs[0], family_of(loaded.entry.family)
        own = [replace(job, embeddings=list(job.embeddings), foreign_embeddings=list(job.foreign_embeddings),
                       warnings=[]) for job in jobs]  # fmt: skip
        with loaded.lock, loaded.job_scope(), loaded.vae_swapped(self._vae_for(loaded, first)):
            pipe = loaded.pipeline_for("img2img")
            pipe.scheduler = build_scheduler(first.sampler, loaded.scheduler_config)
            set_vae_tiling(loaded.pipe, self.speed, first.width, first.height)
            embeddings: list[tuple] = []
            try:
                embeddings = _load_embeddings(loaded.pipe, own)
                images = self._call_pipeline(family, pipe, own, on_step, image=latents.to(self.device, self.dtype),
                                             denoising_start=first.refiner.switch_at)  # fmt: skip
            finally:
                unload_from(loaded.pipe, embeddings)
        return RefinedImages(images=images, warnings=[job.warnings for job in own],
                             ti_hashes=[self._ti_hashes(job) for job in own])  # fmt: skip

    def _vae_for(self, loaded: LoadedModel, job: PreparedJob):
        """The job's chosen VAE, loaded like the model's own (None: the model's own)."""
        return self.vaes.load(job.vae, loaded.pipe.vae) if job.vae else None

    def _call_pipeline(self, family: ModelFamily, pipe, jobs: list[PreparedJob], on_step: "StepCallback",
                       hires_pass: bool = False, ip_features: IpAdapterFeatures | None = None,
                       **overrides):  # fmt: skip
        """One diffusers call for the batch on a model of `family`; `overrides` replace or add call arguments
        (image, strength, output_type, denoising_start/end, ...); `hires_pass`: the hires fix's second pass (its
        ControlNet and IP-Adapter units); `ip_features`: the jobs' reference image features (IP-Adapter units)."""
        first = jobs[0]
        preview_sink = PREVIEW_SINK.get()
        previewed: dict[str, int] = {}  # job id -> the batch index of its first image here (its preview)
        for index, job in enumerate(jobs):
            if job.preview and preview_sink:
                previewed.setdefault(job.job_id, index)
        last_preview = [time.monotonic()]
        schedule: ScaleSchedule | None = None  # the IP-Adapters' scales per step, when the batch has any

        def on_step_end(pipeline, step_index, timestep, callback_kwargs):
            if schedule is not None:  # the IP-Adapters' scales for the next step
                schedule.set_for(step_index + 1, pipeline.num_timesteps)
            if previewed and time.monotonic() - last_preview[0] >= PREVIEW_INTERVAL_S:
                last_preview[0] = time.monotonic()
                try:
                    latents = callback_kwargs["latents"]
                    for job_id, index in previewed.items():
                        preview_sink(job_id, preview_jpeg_base64(latents[index], family, *size))
                except Exception:  # a preview is a nicety: it never fails the job
                    logger.warning("making a preview failed; the job goes on without it", exc_info=True)
            on_step(step_index + 1, pipeline.num_timesteps)
            return callback_kwargs

        # Embedding names become the tokens they were loaded as; other families' names are dropped.
        prompts = [rewrite_prompt(job.prompt, job.embeddings, job.foreign_embeddings) for job in jobs]
        negatives = [rewrite_prompt(job.negative_prompt, job.embeddings, job.foreign_embeddings) for job in jobs]
        # Emphasis, BREAK or more than 75 tokens: A1111's chunked, weighted encoding (pipelines/prompts.py);
        # otherwise diffusers' own, so that a plain prompt gives the pixels it always did.
        own_encoding = family.prompt_encoding == "a1111-clip" and any(
            needs_own_encoding(pipe, text) for text in prompts + negatives
        )
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
        size = (arguments["width"], arguments["height"])  # this call's (packed latents' previews need it)
        if family.guidance == "distilled":  # FLUX.1: the guidance embedding, and true CFG only above 1
            arguments.update(guidance_scale=first.distilled_cfg_scale, true_cfg_scale=first.cfg_scale)
            if first.cfg_scale <= 1:
                arguments.pop("negative_prompt")
        if hasattr(pipe, "controlnet"):  # each job's maps, at this call's size
            control_warnings: list[str] = []
            arguments.update(control_arguments(pipe, jobs, hires_pass, arguments["width"], arguments["height"],
                                               control_warnings))  # fmt: skip
            for job in jobs:
                job.warnings.extend(w for w in control_warnings if w not in job.warnings)
        if ip_features is not None:
            guidance = first.cfg_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # as diffusers decides
            arguments.update(ip_features.call_arguments(guidance))
            schedule = ScaleSchedule(pipe, first, ip_features, hires_pass)
            schedule.set_for(0, arguments["num_inference_steps"])
        # Not every pipeline takes every argument (SDXL img2img has no size: the image sets it).
        parameters = _call_parameters(pipe)
        for name in ("clip_skip", "denoising_start", "denoising_end", "width", "height"):
            if name in arguments and name not in parameters:
                arguments.pop(name)
        if first.clip_skip > 1 and "clip_skip" not in parameters:  # FLUX.1's pipelines take none
            for job in jobs:
                job.warnings.append(f"clip_skip is not applied on {family.label} models; it was left out")
                job.clip_skip = 1
        # no_grad, not inference_mode: with model CPU offload the hooks move the weights inside this block, and
        # weights made inference tensors could not be changed in place after it (a LoRA's norm weights)
        with torch.no_grad():
            if is_inpaint_pipeline(pipe):  # a mask, or an inpainting checkpoint
                masks = [job.inpaint for job in jobs]
                arguments.update(inpaint_arguments(pipe, masks, [job.seed for job in jobs], arguments))
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

    def _ti_hashes(self, job: PreparedJob) -> dict[str, str]:
        """The embeddings the job's call used: name -> A1111's short hash."""
        return {item.name: self.embeddings.short_hash(item) for item in job.embeddings}

    def infotext(self, loaded: LoadedModel, job: PreparedJob, more_ti_hashes: dict[str, str] | None = None) -> str:
        """The image's A1111 infotext. `more_ti_hashes`: embeddings another model's call of the job used (the
        refiner's), listed after the job's own in `TI hashes`."""
        return _infotext_of(job, self.infotext_parameters(loaded, job, more_ti_hashes))

    def infotext_parameters(self, loaded: LoadedModel, job: PreparedJob,
                            more_ti_hashes: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
        """The infotext's parameters line as key -> text (the values `parse_infotext` reads back from it)."""
        ti_hashes = self._ti_hashes(job)
        for name, value in (more_ti_hashes or {}).items():
            ti_hashes.setdefault(name, value)
        params = {
            "Steps": job.steps,
            "Sampler": job.sampler.sampler,
            "Schedule type": job.sampler.schedule_label,
            "CFG scale": job.cfg_scale,
            "Distilled CFG Scale": job.distilled_cfg_scale,  # as Forge writes it for FLUX.1
            "Seed": job.seed,
            "Size": f"{job.width}x{job.height}",
            "Model hash": loaded.model_hash,
            "Model": loaded.entry.name,
            "VAE hash": self.vaes.short_hash(job.vae) if job.vae else None,
            "VAE": job.vae.infotext_name if job.vae else None,
            "Denoising strength": job.denoising_strength,
            "Clip skip": job.clip_skip if job.clip_skip >= 2 else None,
            "RNG": "CPU",
            **(job.inpaint.infotext_params() if job.inpaint else {}),
            "Lora hashes": lora_hashes_value(job.loras),
            "TI hashes": ", ".join(f"{name}: {value}" for name, value in ti_hashes.items()) or None,
            "Version": INFOTEXT_VERSION,
        }
        if job.hires is not None:
            params.update({"Hires upscale": f"{job.hires.scale:g}", "Hires steps": job.hires.steps,
                           "Hires upscaler": job.hires.upscaler})  # fmt: skip
        if job.refiner is not None:
            params.update({"Refiner": f"{job.refiner.model.name} [{job.refiner.model_hash}]",
                           "Refiner switch at": job.refiner.switch_at})  # fmt: skip
        for index, module in enumerate(loaded.entry.modules, start=1):  # a single file's modules, as Forge writes
            params[f"Module {index}"] = module.stem
        for index, control in enumerate(job.controls):  # as the ControlNet extension writes its units
            params[f"ControlNet {index}"] = control.infotext()
        return {key: str(value) for key, value in params.items() if value is not None}


def _infotext_of(job: PreparedJob, params: dict[str, str]) -> str:
    """The infotext of a job's image from its parameters line (`ImageEngine.infotext_parameters`)."""
    return build_infotext(prompt_with_lora_tags(job.prompt, job.loras), job.negative_prompt, params)


def _load_embeddings(pipe, jobs: list[PreparedJob]) -> list[tuple]:
    """Loads the embeddings any job of the batch names (once each); one that cannot be loaded into this model
    is dropped from its jobs' prompts with a warning, and they go on. Returns what to unload after the call."""
    wanted = list({item.path: item for job in jobs for item in job.embeddings}.values())
    loaded, skipped = load_into(pipe, wanted)
    for job in jobs:
        for item in [item for item in job.embeddings if item.name in skipped]:
            job.embeddings.remove(item)
            job.foreign_embeddings.append(item)
            job.warnings.append(f"embedding '{item.name}' was skipped: {skipped[item.name]}")
    return loaded


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
