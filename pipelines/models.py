"""Loaded models: the device and precision, a checkpoint loaded through diffusers' own loaders, and the
per-model state a job changes and must restore (LoRA adapters, the pipeline for its mode)."""

import contextlib
import logging
import os
import threading
import warnings
from collections import OrderedDict

import psutil
import torch

from pipelines.catalog import Mode, ModelEntry, check_mode_supported
from pipelines.devices import is_offloaded, offload_paused, reset_offload
from pipelines.errors import ModelLoadError
from pipelines.families import family_of
from pipelines.loras import LoraUse, read_lora_state_dict
from pipelines.speed import set_qkv_fused

logger = logging.getLogger(__name__)
# Keeping several LoRA adapters loaded on one model is deliberate (a cache); peft warns about it each time.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)


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


def check_device(device: torch.device) -> None:
    """Raises when the device no longer computes: a GPU that fell off the bus, or a CUDA context broken by an
    earlier fault (CUDA errors are sticky: every later call raises them). A one-element kernel and its result
    read back: microseconds on a healthy device. No device-wide synchronize and no lock; on CUDA it runs on a
    side stream of its own (PyTorch's pool streams do not wait for the default stream), so a running job's
    queued kernels (a large SDXL or hires step) do not delay it."""
    if device.type == "cuda":
        with torch.cuda.stream(_check_stream(device)):
            value = (torch.ones(1, device=device) + 1).item()
    else:
        value = (torch.ones(1, device=device) + 1).item()
    if value != 2:
        raise RuntimeError(f"device {device} computed 1 + 1 = {value}")


_CHECK_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _check_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _CHECK_STREAMS:
        _CHECK_STREAMS[device] = torch.cuda.Stream(device)
    return _CHECK_STREAMS[device]


def memory_mb(device: torch.device) -> float:
    """GPU memory allocated by torch on an accelerator, else this process's resident memory, in MB."""
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return round(psutil.Process().memory_info().rss / 2**20, 1)


class LoadedModel:
    """A checkpoint's pipeline plus the lock that keeps one job at a time on it (jobs set its scheduler)."""

    def __init__(self, entry: ModelEntry, pipe, model_hash: str):
        self.entry = entry
        self.pipe = pipe
        self.model_hash = model_hash
        self.lock = threading.Lock()
        # The model's own scheduler config, read once: every job builds its sampler from this, never from what
        # an earlier job left on the pipeline.
        self.scheduler_config = dict(pipe.scheduler.config)
        self.speed: list[str] = []  # speed options applied at load
        self.qkv_fused = False
        self._unfused = False  # a job's LoRAs unfused the QKV projections (job_scope fuses them again)
        self._img2img = None
        self._inpaint = None
        self.adapters: OrderedDict[str, str] = OrderedDict()  # LoRA adapters kept loaded: name -> file

    @property
    def denoiser(self):
        """The network every step runs: the UNet, or the transformer of a family that has one (FLUX.1)."""
        return self.pipe.unet if hasattr(self.pipe, "unet") else self.pipe.transformer

    MAX_CACHED_ADAPTERS = 4  # adapters kept loaded between jobs; a job with more keeps all of its own

    @contextlib.contextmanager
    def job_scope(self):
        """Everything a job changes on this model is put back when the block ends, however it ends (an error
        included), so no job's settings reach the next caller's images: the scheduler of every pipeline of the
        model, its LoRAs (turned off), the fused QKV projections LoRAs unfuse, VAE tiling, and with model CPU offload
        where its parts are. Hold `lock`."""
        schedulers = {id(pipe): pipe.scheduler for pipe in self._pipelines()}
        base_scheduler = self.pipe.scheduler
        own_vae = self.pipe.vae
        tiling = getattr(own_vae, "use_tiling", None)
        try:
            yield
        finally:
            self.clear_loras()
            for pipe in self._pipelines():  # an img2img pipeline made during the job gets the model's own
                pipe.scheduler = schedulers.get(id(pipe), base_scheduler)
            if tiling is not None and own_vae.use_tiling != tiling:
                own_vae.enable_tiling() if tiling else own_vae.disable_tiling()
            # With model CPU offload, every part back on the CPU and fresh hooks, however the job ended: diffusers
            # offloads only after a call that returns (a cancelled or out-of-memory job left its denoiser on the
            # GPU, or half moved), and not at all after a call of a pipeline made from this one (img2img, ...).
            reset_offload(self.pipe)

    @contextlib.contextmanager
    def ip_adapters_loaded(self, state_dicts: list[dict]):
        """The job's IP-Adapters in the UNet while the block runs (diffusers' `load_ip_adapter`, from the given
        state dicts; the image encoder runs apart), and the UNet exactly as before after it: its attention
        processors (a speed option's or fused QKV's included), its image projection and config, the pipeline's
        feature extractor. Hold `lock`."""
        if not state_dicts:
            yield
            return
        unet = self.pipe.unet
        processors = dict(unet.attn_processors)
        projection, projection_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
        extractor = getattr(self.pipe, "feature_extractor", None)
        try:
            count = len(state_dicts)
            try:
                with offload_paused(self.pipe):
                    self.pipe.load_ip_adapter(state_dicts, subfolder=[None] * count, weight_name=[None] * count,
                                              image_encoder_folder=None)  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # a file of another architecture: layers missing or of other shapes
                message = (
                    f"could not load the IP-Adapter(s) into model '{self.entry.name}': {type(error).__name__}: {error}"
                )
                raise ModelLoadError(message[:1000], field="controlnet") from error
            yield
        finally:
            unet.encoder_hid_proj = projection  # first: a plus adapter's Resampler has attention layers of its own
            unet.config.encoder_hid_dim_type = projection_type
            unet.set_attn_processor(processors)
            if hasattr(self.pipe, "feature_extractor") and self.pipe.feature_extractor is not extractor:
                self.pipe.register_modules(feature_extractor=extractor)

    def _pipelines(self) -> list:
        return [pipe for pipe in (self.pipe, self._img2img, self._inpaint) if pipe is not None]

    def apply_loras(self, uses: list[LoraUse]) -> tuple[list[LoraUse], list[str]]:
        """Loads (or reuses) and activates the job's LoRAs at their scales; returns the ones applied and a
        warning for each that failed to load (skipped). Only adapters other jobs left are evicted to make room,
        never one of this job's. Call inside `job_scope`, which turns them off again. Hold `lock`."""
        warnings = []
        active = []
        wanted = {use.adapter_name for use in uses}
        for use in uses:
            if use.adapter_name not in self.adapters:
                error = self.load_adapter(use, keep=wanted)
                if error is not None:
                    warnings.append(f"LoRA '{use.lora.name}' skipped: it could not be loaded into model "
                                    f"'{self.entry.name}': {error}")  # fmt: skip
                    continue
            self.adapters.move_to_end(use.adapter_name)
            active.append(use)
        if active:
            if self.qkv_fused:  # LoRAs patch the separate q/k/v projections
                set_qkv_fused(self.pipe, False)
                self._unfused = True
            self.pipe.enable_lora()
            self.pipe.set_adapters([u.adapter_name for u in active], adapter_weights=[u.scale for u in active])
        return active, warnings

    def load_adapter(self, use: LoraUse, keep: set[str] | frozenset[str] = frozenset()) -> str | None:
        """Loads one LoRA as a named adapter, evicting the least recently used ones that are not in `keep` (the
        job's own); the error text on failure."""
        self._evict_adapters(self.MAX_CACHED_ADAPTERS - 1, keep)
        try:
            with offload_paused(self.pipe):
                self.pipe.load_lora_weights(read_lora_state_dict(use.lora.path), adapter_name=use.adapter_name)
        except Exception as error:  # size mismatches are RuntimeError; unknown layers are peft errors
            self._forget_adapter(use.adapter_name)
            return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        present = {name for names in self.pipe.get_list_adapters().values() for name in names}
        if use.adapter_name not in present:
            return "no layer of the model matched its weights"
        self.adapters[use.adapter_name] = str(use.lora.path)
        return None

    def _evict_adapters(self, limit: int, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Deletes the least recently used adapters outside `keep` until at most `limit` stay loaded (more stay
        when `keep` alone is more)."""
        for name in [name for name in self.adapters if name not in keep]:  # least recently used first
            if len(self.adapters) <= max(limit, 0):
                break
            del self.adapters[name]
            self._forget_adapter(name)

    def unload_adapter(self, name: str) -> None:
        """Removes one LoRA adapter from the model. Hold `lock`."""
        self.adapters.pop(name, None)
        self._forget_adapter(name)

    def _forget_adapter(self, name: str) -> None:
        present = {adapter for names in self.pipe.get_list_adapters().values() for adapter in names}
        if name in present:
            self.pipe.delete_adapters([name])

    @contextlib.contextmanager
    def vae_swapped(self, vae):
        """Decodes (and encodes) with `vae` instead of the model's own while the block runs, on every pipeline
        of this model (an img2img pipeline made meanwhile included), and puts the model's own back after, so
        no job's choice leaks into the next. Hold `lock`. None: the model's own."""
        if vae is None:
            yield
            return
        own = self.pipe.vae
        self._set_vae(vae)
        try:
            yield
        finally:
            self._set_vae(own)
            if is_offloaded(self.pipe):  # diffusers hooked it into this model's chain after the call: not kept
                from accelerate.hooks import remove_hook_from_module

                remove_hook_from_module(vae)

    def _set_vae(self, vae) -> None:
        for pipe in (self.pipe, self._img2img, self._inpaint):
            if pipe is not None:
                pipe.vae = vae

    def clear_loras(self) -> None:
        """Turns every LoRA off (and fuses QKV again where a job unfused it), so the next job sees the model
        exactly as loaded. Hold `lock`."""
        if self.adapters:
            self.pipe.disable_lora()
        if self._unfused:
            set_qkv_fused(self.pipe, True)
            self._unfused = False

    def pipeline_for(self, mode: Mode, masked: bool = False):
        """The pipeline for a job: an inpainting checkpoint's is its inpainting pipeline whatever the mode (a job
        without a mask repaints everything); an ordinary checkpoint's shares its modules with its txt2img one."""
        check_mode_supported(self.entry, mode)
        if self.entry.inpainting:
            return self.pipe
        family = family_of(self.entry.family)
        if masked:
            if self._inpaint is None:
                self._inpaint = inpainting_class(self.entry.family).from_pipe(self.pipe)
                self._inpaint.set_progress_bar_config(disable=True)
            return self._inpaint
        if mode == "txt2img" or not family.txt2img:  # a family without txt2img loads as its img2img pipeline
            return self.pipe
        if self._img2img is None:
            import diffusers

            self._img2img = getattr(diffusers, family.pipelines.img2img).from_pipe(self.pipe)  # shares the modules
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


def with_controlnet(pipe, family: str, controlnets: list):
    """The job's pipeline with ControlNet: diffusers' ControlNet pipeline of the same kind (txt2img, img2img,
    inpainting) for the model's family, sharing every module of `pipe`; several ControlNets as one
    MultiControlNetModel. Made per call (it costs no memory), so no job's ControlNets stay on the model."""
    import diffusers
    from diffusers.models import MultiControlNetModel

    controlled = family_of(family).pipelines.controlnet.get(type(pipe).__name__)
    if controlled is None:
        raise ModelLoadError(f"ControlNet does not run with a {type(pipe).__name__}", field="controlnet")
    model = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    made = getattr(diffusers, controlled).from_pipe(pipe, controlnet=model)
    made.set_progress_bar_config(disable=True)
    return made


def inpainting_class(family: str):
    """The family's inpainting pipeline class; a 422 for a family that has none."""
    import diffusers

    name = family_of(family).pipelines.inpaint
    if name is None:
        raise ModelLoadError(f"{family_of(family).label} models have no inpainting pipeline", field="mask")
    return getattr(diffusers, name)


def load_pipeline(entry: ModelEntry, device: torch.device, dtype: torch.dtype):
    """Loads a checkpoint with diffusers' own loaders, offline for local folders. An inpainting checkpoint is
    loaded as diffusers' inpainting pipeline (its UNet takes the mask and the masked image too)."""
    import diffusers

    try:
        family = family_of(entry.family)
        if entry.format == "single-file" and family.single_file_loader is not None:
            pipe = family.single_file_loader(entry, dtype)  # a transformer alone, with its module files
        elif entry.format == "single-file":
            cls = getattr(diffusers, family.pipelines.single_file)
            cls = inpainting_class(entry.family) if entry.inpainting else cls
            extra = {"config": str(entry.config_dir), "local_files_only": True} if entry.config_dir else {}
            pipe = cls.from_single_file(str(entry.path), dtype=dtype, **extra)
        else:
            absent = {name: None for name in family.optional_components
                      if not (entry.path / name).is_dir()}  # fmt: skip
            pipe = diffusers.DiffusionPipeline.from_pretrained(entry.path, dtype=dtype, local_files_only=True, **absent)
            if entry.inpainting and not isinstance(pipe, inpainting_class(entry.family)):
                pipe = inpainting_class(entry.family).from_pipe(pipe)  # a folder saved with the txt2img class
    except ModelLoadError:
        raise
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
