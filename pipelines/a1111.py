"""AUTOMATIC1111's HTTP API (v1.10 shapes) on top of this service's own requests and job records.

A1111 clients (webuiapi, Open WebUI, SillyTavern, LibreChat, ...) send A1111's request bodies and read A1111's
answers. This module translates: an A1111 txt2img/img2img body becomes a native request (the same validation,
queue and engine as `/txt2img`), a finished job becomes A1111's `{images, parameters, info}`, and the listings
take A1111's shapes. No Ray, no FastAPI: the routes in deployments/a1111_routes.py call these functions.

A1111's API is lax where the native one is strict: numbers may arrive as strings (`"hr_scale": "1.0"`),
fields may be null, and fields this service does not know or features it does not have are ignored with a
warning in `info` (clients send their own fields), never refused.
"""

import datetime
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import psutil
from PIL import Image
from pydantic import ValidationError

from pipelines.a1111_controlnet import controlnet_args, native_units
from pipelines.a1111_schemas import (
    PROMPT_FIELDS,
    A1111GenerationRequest,
    A1111Img2ImgRequest,
    A1111Txt2ImgRequest,
    number_from_text,
)
from pipelines.catalog import ModelCatalog, ModelEntry
from pipelines.errors import DiffusionAPIError, InvalidRequestError, UnknownSamplerError
from pipelines.families import family_of
from pipelines.images import decode_base64_bytes, open_image
from pipelines.infotext import parse_infotext, read_infotext
from pipelines.limits import LIMITS
from pipelines.loras import LoraLibrary, find_lora_tags, replace_lora_tags
from pipelines.modules import module_stem
from pipelines.samplers import SAMPLERS, SCHEDULES, resolve_sampler, sampler_key
from pipelines.schemas import Img2ImgRequest, JobState, Txt2ImgRequest
from pipelines.settings import VERSION
from pipelines.upscalers import LATENT_MODES, RESIZE_MODES, UpscalerLibrary

Kind = Literal["txt2img", "img2img"]


class A1111NotFoundError(DiffusionAPIError):
    """What A1111 answers with 404 (an unknown sampler: A1111's `validate_sampler_name`)."""

    status_code = 404


# Fields A1111 itself knows: ignored silently at their defaults (clients send them all), not "unknown".
KNOWN_A1111_FIELDS = frozenset(
    [
        "seed_resize_from_h", "seed_resize_from_w", "do_not_save_samples", "do_not_save_grid", "eta",
        "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings_restore_afterwards",
        "disable_extra_networks", "comments", "firstpass_image", "firstphase_width", "firstphase_height",
        "script_args", "infotext", "force_task_id", "hr_additional_modules", "sampler_index", "image_cfg_scale",
        "mask_round", "initial_noise_multiplier", "latent_mask", "user", "forge_additional_modules",
    ]
)  # fmt: skip
# Where a native field came from, for error messages that name the field the client sent.
_A1111_FIELD_OF = {
    "model": "override_settings.sd_model_checkpoint",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "image": "init_images",
    "vae": "override_settings.sd_vae",
    "hires.scale": "hr_scale",
    "hires.steps": "hr_second_pass_steps",
    "hires.denoising_strength": "denoising_strength",
    "hires.upscaler": "hr_upscaler",
    "scheduler_type": "scheduler",
}


def in_a1111_terms(error: DiffusionAPIError) -> DiffusionAPIError:
    """An error of the native job's checks, naming its field as the A1111 client sent it ("hires.upscaler" is
    `hr_upscaler` here). The message's mention of the field is renamed too where the native name cannot be an
    ordinary word (dotted or snake_case: not "model" or "image")."""
    native = error.field or ""
    a1111_name = _A1111_FIELD_OF.get(native)
    if a1111_name is None:
        return error
    error.field = a1111_name
    if "." in native or "_" in native:
        error.message = re.sub(rf"(?<![\w.]){re.escape(native)}(?!\w|\.\w)", a1111_name, error.message)
        error.args = (error.message,)
    return error


@dataclass
class MappedRequest:
    """An A1111 request as a native one, with what was ignored or adapted on the way."""

    kind: Kind
    native: Txt2ImgRequest | Img2ImgRequest
    warnings: list[str] = field(default_factory=list)
    save_detected_maps: list[bool] = field(default_factory=list)  # per ControlNet unit: its map after the images


def _is_set(value: Any) -> bool:
    return value not in (None, "", "None", "none", "Use same checkpoint", "Use same sampler", "Use same scheduler")


def _snapped_size(value: int, name: str, warnings: list[str], multiple: int = 8) -> int:
    """A1111 accepts any size and works on multiples of 8 (16 for FLUX.1 and SD 3.5: the model family's
    `sizes_multiple_of`); so do we, saying so."""
    snapped = max(LIMITS.min_size, value - value % multiple)
    if snapped != value:
        warnings.append(f"{name} {value} is not a multiple of {multiple} (or below {LIMITS.min_size}); used {snapped}")
    return snapped


def _unsupported_warnings(request: A1111GenerationRequest, kind: Kind) -> list[str]:
    """Features A1111 has and this service does not (yet), when a request asks for them."""
    asked = {
        "restore_faces": bool(request.restore_faces),
        "tiling": bool(request.tiling),
        "styles": bool(request.styles),
        "subseed_strength": bool(request.subseed_strength),
        "script_name": _is_set(request.script_name),
        "alwayson_scripts": bool(controlnet_args(request.alwayson_scripts)[1]),  # ControlNet's is read
    }
    if isinstance(request, A1111Txt2ImgRequest) and request.enable_hr:
        asked["hr_checkpoint_name"] = _is_set(request.hr_checkpoint_name)
        asked["hr_sampler_name"] = _is_set(request.hr_sampler_name) and request.hr_sampler_name != (
            request.sampler_name or request.sampler_index
        )
        asked["hr_scheduler"] = _is_set(request.hr_scheduler) and request.hr_scheduler != request.scheduler
        asked["hr_prompt"] = bool(request.hr_prompt) and request.hr_prompt != request.prompt
        asked["hr_negative_prompt"] = (
            bool(request.hr_negative_prompt) and request.hr_negative_prompt != request.negative_prompt
        )
    if isinstance(request, A1111Img2ImgRequest):
        asked["resize_mode"] = bool(request.resize_mode)
        asked["mask_round"] = (request.model_extra or {}).get("mask_round") is False
        asked["init_images[1:]"] = len(request.init_images or []) > 1
    names = [name for name, on in asked.items() if on]
    if not names:
        return []
    return [f"not supported here, ignored: {', '.join(names)}"]


def unknown_a1111_fields(request: A1111GenerationRequest) -> list[str]:
    return sorted(name for name in request.model_extra or {} if name not in KNOWN_A1111_FIELDS)


def _sampler_and_schedule(request: A1111GenerationRequest) -> tuple[str, str | None]:
    """A1111's `sampler_name or sampler_index` (old names with a schedule suffix too) and `scheduler` (name
    or label), as native values. An unknown sampler is a 404, as in A1111."""
    sampler = (request.sampler_name or request.sampler_index or "Euler").strip()
    schedule = request.scheduler if _is_set(request.scheduler) else None
    try:
        resolved = resolve_sampler(sampler, schedule)
    except UnknownSamplerError as error:
        if error.field == "scheduler_type":
            raise A1111NotFoundError(error.message.replace("scheduler_type", "scheduler"), field="scheduler") from None
        raise A1111NotFoundError(f"Sampler not found: {error.message}", field="sampler_name") from None
    if schedule is None and sampler_key(sampler) is not None:
        return resolved.sampler, None  # no schedule sent, none in the name: the model's family decides
    label_to_key = {spec.label: key for key, spec in SCHEDULES.items()}
    return resolved.sampler, label_to_key.get(resolved.schedule_label)


def without_unknown_loras(prompt: str, loras: LoraLibrary | None, warnings: list[str]) -> str:
    """The prompt without `<lora:...>` tags naming no installed LoRA: A1111 skips those (and goes on), where
    the native API answers 404. The tags are found in one linear scan and looked up against one listing of the
    LoRA folder; at most `LIMITS.max_loras` are looked up (a job uses no more): the ones after are removed,
    with one warning."""
    tags = find_lora_tags(prompt)
    if not tags:
        return prompt
    files = loras.listing() if loras is not None else []
    kept: set[int] = set()  # where the tags that stay start
    for tag in tags[: LIMITS.max_loras]:
        name = tag.name.strip()
        try:
            if loras is not None:
                loras.resolve(name, field="prompt", files=files)
                kept.add(tag.start)
                continue
        except DiffusionAPIError:
            pass
        warnings.append(f"LoRA {name!r} is not installed; its prompt tag was skipped (see GET /sdapi/v1/loras)")
    if len(tags) > LIMITS.max_loras:
        warnings.append(f"{len(tags)} <lora:...> tags in the prompt; at most {LIMITS.max_loras} per job: the last "
                        f"{len(tags) - LIMITS.max_loras} were removed")  # fmt: skip
    return replace_lora_tags(prompt, lambda tag: tag.text if tag.start in kept else "", tags)


def check_prompt_lengths(request: A1111GenerationRequest) -> None:
    """A 422 for a prompt field above `LIMITS.max_prompt_chars`, the native API's bound, before any of the text
    is parsed (A1111's models set none, so without this the A1111 door would parse texts of any length)."""
    for name in PROMPT_FIELDS:
        value = getattr(request, name) if name in type(request).model_fields else None
        if isinstance(value, str) and len(value) > LIMITS.max_prompt_chars:
            raise InvalidRequestError(f"{name}: {len(value)} characters; at most {LIMITS.max_prompt_chars} are "
                                      f"accepted", field=name)  # fmt: skip


def _resolved(name: str | None, catalog: ModelCatalog | None) -> ModelEntry | None:
    """The model the request names, where the translation needs its family or modules; None without a catalog
    or for an unknown model (the submission answers that one with its 404)."""
    if catalog is None:
        return None
    try:
        return catalog.resolve(name)
    except DiffusionAPIError:
        return None


def _checked_modules(modules: Any, entry: ModelEntry | None, place: str = "forge_additional_modules") -> list[str]:
    """Forge's `forge_additional_modules` (file names, stems or paths) against the modules the model runs with:
    each FLUX.1 or SD 3.5 single file runs with one set (configs/models.yaml `modules:`, else one of each kind it
    lacks, installed), so naming another is a 422 saying which it runs with; naming modules for a model that
    carries its own VAE and text encoders is a warning."""
    if not isinstance(modules, list) or not all(isinstance(item, str) for item in modules):
        raise InvalidRequestError(f"{place}: a list of module file names or paths", field=place)
    if entry is None:
        return []  # no catalog here, or an unknown model: the submission answers it
    if not entry.modules:
        return [f"forge_additional_modules ignored: model '{entry.name}' carries its own VAE and text encoders"]
    runs_with = {path.stem for path in entry.modules}
    asked = {module_stem(item) for item in modules}
    if other := sorted(asked - runs_with):
        named = ", ".join(repr(name[:60]) for name in other[:5]) + (" ..." if len(other) > 5 else "")
        raise InvalidRequestError(
            f"{place}: {named} are not the modules model '{entry.name}' runs "
            f"with ({', '.join(sorted(runs_with))}); this service runs each single file with one module set, "
            "chosen in configs/models.yaml under 'modules:' (GET /sdapi/v1/sd-modules lists the installed ones)",
            field=place,
        )
    if unnamed := sorted(runs_with - asked):
        return [f"{place}: model '{entry.name}' runs with its whole module set, {', '.join(unnamed)} too (the set is "
                "chosen per model in configs/models.yaml under 'modules:', not per request)"]  # fmt: skip
    return []


def to_native(
    request: A1111Txt2ImgRequest | A1111Img2ImgRequest, default_model: str | None, loras: LoraLibrary | None = None,
    catalog: ModelCatalog | None = None,
) -> MappedRequest:  # fmt: skip
    """The native request an A1111 body asks for. Raises a DiffusionAPIError (4xx) naming the A1111 field
    for a value the native API refuses (out of its limits). `catalog`: to snap sizes to the model's family."""
    check_prompt_lengths(request)
    kind: Kind = "img2img" if isinstance(request, A1111Img2ImgRequest) else "txt2img"
    warnings = _unsupported_warnings(request, kind)
    unknown = unknown_a1111_fields(request)
    if unknown:
        warnings.append(f"unknown field(s) ignored: {', '.join(repr(name[:60]) for name in unknown[:10])}")
    overrides = request.override_settings or {}
    sampler, schedule = _sampler_and_schedule(request)
    steps = request.steps if request.steps is not None else 50
    entry = _resolved(overrides.get("sd_model_checkpoint") or default_model, catalog)  # resolved once, here
    multiple = family_of(entry.family).sizes_multiple_of if entry is not None else 8
    width = _snapped_size(request.width or 512, "width", warnings, multiple)
    height = _snapped_size(request.height or 512, "height", warnings, multiple)
    native: dict[str, Any] = {
        "prompt": without_unknown_loras(request.prompt or "", loras, warnings),
        "negative_prompt": request.negative_prompt or "",
        "steps": steps,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "scheduler_type": schedule,
        "seed": request.seed if request.seed is not None and request.seed >= 0 else None,
        "batch_size": request.batch_size or 1,
        "n_iter": request.n_iter or 1,
        "fileType": "png",  # A1111's default samples format; its API answers PNG
        "model": overrides.get("sd_model_checkpoint") or default_model,
        "preview": True,  # A1111's live previews are on by default: /progress answers them as current_image
    }
    if "cfg_scale" in request.model_fields_set and request.cfg_scale is not None:  # unsent or null: the family's
        native["cfg_scale"] = request.cfg_scale
    if request.distilled_cfg_scale is not None:
        native["distilled_cfg_scale"] = request.distilled_cfg_scale
    if isinstance(vae := overrides.get("sd_vae"), str) and vae.strip():
        native["vae"] = vae  # "Automatic" and "None" mean the model's own, as in A1111
    in_overrides = "forge_additional_modules" in overrides
    modules = overrides["forge_additional_modules"] if in_overrides else (request.model_extra or {}).get(
        "forge_additional_modules")  # fmt: skip
    if modules:
        place = "override_settings.forge_additional_modules" if in_overrides else "forge_additional_modules"
        warnings += _checked_modules(modules, entry, place)
    try:
        clip_skip = number_from_text(overrides.get("CLIP_stop_at_last_layers"))
    except ValueError as error:
        raise InvalidRequestError(f"override_settings.CLIP_stop_at_last_layers: {error}", field="clip_skip") from None
    if clip_skip is not None:
        native["clip_skip"] = clip_skip
    if _is_set(request.refiner_checkpoint):
        switch_at = request.refiner_switch_at if request.refiner_switch_at is not None else 0.8
        if switch_at >= 1.0:
            warnings.append(f"refiner_switch_at {switch_at:g} leaves the refiner no steps; it was not used")
        else:
            native.update(refiner_checkpoint=request.refiner_checkpoint, refiner_switch_at=switch_at)
    if isinstance(request, A1111Txt2ImgRequest) and request.enable_hr:
        native["hires"] = _hires(request, width, height, steps, warnings)
    save_maps: list[bool] = []
    units, _ = controlnet_args(request.alwayson_scripts)
    if units is not None:
        native["controlnet"], save_maps = native_units(units, warnings)
    if isinstance(request, A1111Img2ImgRequest):
        if not request.init_images:
            raise InvalidRequestError("init_images: img2img needs at least one input image", field="init_images")
        native["image"] = request.init_images[0]
        native["denoising_strength"] = request.denoising_strength if request.denoising_strength is not None else 0.75
        if _is_set(request.mask):
            native.update(_inpainting(request, warnings))
    model = Img2ImgRequest if kind == "img2img" else Txt2ImgRequest
    try:
        return MappedRequest(kind, model.model_validate(native), warnings, save_maps)
    except ValidationError as error:
        raise InvalidRequestError(_validation_message(error), field=None) from None


def _inpainting(request: A1111Img2ImgRequest, warnings: list[str]) -> dict:
    """A1111's mask fields as native ones, with A1111's API defaults (`mask_blur` sets both directions)."""
    default = lambda value, fallback: fallback if value is None else value  # noqa: E731
    blur_x = default(request.mask_blur, default(request.mask_blur_x, 4))
    blur_y = default(request.mask_blur, default(request.mask_blur_y, 4))
    if blur_x != blur_y:
        warnings.append(f"mask_blur_x {blur_x} and mask_blur_y {blur_y} differ; the mask was blurred by "
                        f"{max(blur_x, blur_y)} px in both directions")  # fmt: skip
    return {
        "mask": request.mask,
        "mask_blur": max(blur_x, blur_y),
        "inpainting_fill": default(request.inpainting_fill, 0),
        "inpaint_full_res": default(request.inpaint_full_res, True),
        "inpaint_full_res_padding": default(request.inpaint_full_res_padding, 0),
        "inpainting_mask_invert": bool(request.inpainting_mask_invert),
    }


def _hires(request: A1111Txt2ImgRequest, width: int, height: int, steps: int, warnings: list[str]) -> dict:
    """A1111's hires fix fields as the native `hires` (a scale: a target size becomes the scale that reaches
    it; a different aspect ratio is not cropped to, and the job says so)."""
    scale = request.hr_scale if request.hr_scale is not None else 2.0
    resize_x, resize_y = request.hr_resize_x or 0, request.hr_resize_y or 0
    if resize_x > 0 or resize_y > 0:
        scale = resize_x / width if resize_x > 0 else resize_y / height
        if resize_x > 0 and resize_y > 0 and abs(resize_y / height - scale) > 0.01:
            warnings.append(
                f"hr_resize {resize_x}x{resize_y} has another aspect ratio than {width}x{height}; upscaled "
                f"{scale:.3g}x without cropping"
            )
    upscaler = (request.hr_upscaler or "").strip() or "Latent"  # null: A1111's default latent mode
    if upscaler.lower() == "none":  # A1111's "None" upscaler: a plain Lanczos resize
        upscaler = "Lanczos"
    strength = request.denoising_strength if request.denoising_strength is not None else 0.7
    return {
        "enabled": True,
        "scale": max(1.0, scale),
        "upscaler": upscaler,
        "steps": request.hr_second_pass_steps or steps,
        "denoising_strength": strength,
    }


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        location = _A1111_FIELD_OF.get(location, location)
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)[:2000]


# Answers ----------------------------------------------------------------------------------------------------
def parameters_echo(request: A1111GenerationRequest) -> dict:
    """A1111's `parameters`: the request with its defaults, without the input images (as A1111 does unless
    `include_init_images`)."""
    echo = request.model_dump(mode="json")
    if isinstance(request, A1111Img2ImgRequest) and not request.include_init_images:
        echo["init_images"] = None
        echo["mask"] = None
    return echo


class JobView(Protocol):
    """What the A1111 answers read of a job record (the service's JobRecord has these)."""

    job_id: str
    created: float
    payload: dict


class ActiveJobView(Protocol):
    """What `progress_report` reads of an active job (the service's ActiveJob has these)."""

    job_id: str
    state: JobState
    phase: str
    progress: float
    created: float
    steps: int | None
    preview: str | None


def generation_info(
    request: A1111GenerationRequest, job: JobView, result: dict, warnings: list[str], inpainting_model: bool = False
) -> dict:
    """A1111's `info` (`Processed.js()`) for a finished job, read from its record (the first image's infotext
    parameters as the engine recorded them; parsed from its infotext for records that lack them), plus this
    service's `job_id` and `warnings`. `inpainting_model`: the job ran on an inpainting checkpoint."""
    infotexts: list[str] = result.get("infotexts") or []
    seeds: list[int] = result.get("seeds") or []
    params = result.get("parameters") or (parse_infotext(infotexts[0]) if infotexts else {})
    count = len(seeds)
    native = job.payload
    subseed = request.subseed if request.subseed is not None and request.subseed >= 0 else seeds[0] if seeds else -1
    extra_keys = ("Schedule type", "Distilled CFG Scale", "Hires upscale", "Hires steps", "Hires upscaler",
                  "Lora hashes", "Refiner", "Refiner switch at", "Mask blur", "Mask mode", "Inpaint area",
                  "Masked area padding", "Masked content",
                  *(key for key in params if key.startswith("ControlNet ")))  # fmt: skip
    denoising = params.get("Denoising strength")
    return {
        "prompt": request.prompt or "",
        "all_prompts": [request.prompt or ""] * count,
        "negative_prompt": request.negative_prompt or "",
        "all_negative_prompts": [request.negative_prompt or ""] * count,
        "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds,
        "subseed": subseed,
        "all_subseeds": [subseed + index for index in range(count)],
        "subseed_strength": 0,
        "width": native["width"],
        "height": native["height"],
        "sampler_name": params.get("Sampler", native["sampler_name"]),
        "cfg_scale": native["cfg_scale"],
        "steps": native["steps"],
        "batch_size": native.get("batch_size", 1),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": params.get("Model"),
        "sd_model_hash": params.get("Model hash"),
        "sd_vae_name": params.get("VAE"),
        "sd_vae_hash": params.get("VAE hash"),
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": float(denoising) if denoising else native.get("denoising_strength", 0),
        "extra_generation_params": {key: params[key] for key in extra_keys if key in params},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": datetime.datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "clip_skip": int(params.get("Clip skip", 1)),
        "is_using_inpainting_conditioning": inpainting_model,
        "version": VERSION,
        "job_id": job.job_id,
        "warnings": warnings,
    }


def progress_report(jobs: list[ActiveJobView], now: float, with_image: bool = True) -> dict:
    """A1111's `GET /progress` for the caller's active jobs (oldest first): the first running one's progress
    and its latest preview (`current_image`: a JPEG in base64); `progress == 0 and job_count == 0` when there
    are none (clients wait on that)."""
    running = next((job for job in jobs if job.state == JobState.processing), None)
    fraction = (running.progress / 100.0) if running else 0.0
    steps = (running.steps or 0) if running else 0
    elapsed = now - running.created if running else 0.0
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    first = running or (jobs[0] if jobs else None)
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(max(eta, 0.0), 2),
        "state": {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": f"task({first.job_id})" if first else "",
            "job_count": len(jobs),
            "job_timestamp": datetime.datetime.fromtimestamp(first.created).strftime("%Y%m%d%H%M%S") if first else "0",
            "job_no": 0,
            "sampling_step": int(fraction * steps),
            "sampling_steps": steps,
        },
        "current_image": running.preview if running and with_image else None,
        "textinfo": f"{running.phase} ({running.progress:.0f}%)" if running else None,
    }


# Listings -------------------------------------------------------------------------------------------------
def model_title(catalog: ModelCatalog, entry: ModelEntry) -> str:
    return f"{entry.name} [{catalog.model_hash(entry)}]"


def sd_models(catalog: ModelCatalog) -> list[dict]:
    return [
        {
            "title": model_title(catalog, entry),
            "model_name": entry.name,
            "hash": catalog.model_hash(entry),
            "sha256": catalog.sha256(entry),
            "filename": str(entry.path),
            "config": None,
        }  # fmt: skip
        for entry in catalog.list_models()
    ]


def samplers() -> list[dict]:
    listed = []
    for name, spec in SAMPLERS.items():
        options = {"scheduler": spec.default_schedule} if spec.default_schedule != "automatic" else {}
        listed.append({"name": name, "aliases": list(spec.aliases), "options": options})
    return listed


def schedulers() -> list[dict]:
    return [
        {
            "name": key,
            "label": spec.label,
            "aliases": ["SGMUniform"] if key == "sgm_uniform" else None,
            "default_rho": -1,
            "need_inner_model": False,
        }  # fmt: skip
        for key, spec in SCHEDULES.items()
    ]


def upscalers(library: UpscalerLibrary) -> list[dict]:
    listed = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]
    listed += [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
               for name in RESIZE_MODES]  # fmt: skip
    listed += [{"name": item.name, "model_name": item.name, "model_path": str(item.path), "model_url": None,
                "scale": 4} for item in library.available()]  # fmt: skip
    return listed


def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_MODES]


def loras(library: LoraLibrary) -> list[dict]:
    return [
        {"name": lora.name, "alias": lora.name, "path": str(lora.path), "metadata": {"family": lora.family}}
        for lora in library.available()
    ]


def memory_report() -> dict:
    """A1111's `GET /memory`: the host's RAM, and CUDA figures where this process already runs torch on a GPU
    (the ingress never imports torch: it has no GPU, and importing it would cost ~560 MB)."""
    torch = sys.modules.get("torch")
    memory = psutil.virtual_memory()
    report: dict[str, Any] = {"ram": {"free": memory.available, "used": memory.total - memory.available,
                                      "total": memory.total}}  # fmt: skip
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report["cuda"] = {"system": {"free": free, "used": total - free, "total": total}}
    else:
        report["cuda"] = {"error": "this process has no CUDA device (the generators hold the GPUs)"}
    return report


def options(catalog: ModelCatalog, default: ModelEntry | None) -> dict:
    """A1111's `GET /options`: what this service has of them (no model: null). Clients post the dict back."""
    return {
        "sd_model_checkpoint": model_title(catalog, default) if default else None,
        "sd_checkpoint_hash": catalog.sha256(default) if default else None,
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "enable_pnginfo": True,
        "eta_noise_seed_delta": 0,
        "randn_source": "CPU",
        "sdxl_refiner_low_aesthetic_score": 2.5,
    }


def cmd_flags() -> dict:
    return {"api": True, "nowebui": True, "listen": True, "port": None, "skip_torch_cuda_test": True,
            "ckpt_dir": None, "lora_dir": None, "no_hashing": False}  # fmt: skip


# png-info ------------------------------------------------------------------------------------------------------
_IGNORED_INFO_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                      "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                      "photoshop", "comment"}  # fmt: skip


def png_info(image_base64: str) -> dict:
    """A1111's `POST /png-info`: the image's infotext (any of the five formats), its other text items and
    the infotext parsed as A1111's `parse_generation_parameters` does."""
    if not image_base64 or not image_base64.strip():
        return {"info": "", "items": {}, "parameters": {}}
    image = open_image(decode_base64_bytes(image_base64, field="image"), field="image")
    text = read_infotext(image) or ""
    items = {key: value for key, value in image.info.items()
             if key != "parameters" and key not in _IGNORED_INFO_KEYS and isinstance(value, str)}  # fmt: skip
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


def json_info(info: dict) -> str:
    return json.dumps(info, ensure_ascii=False)


# A model upscaler works on the whole input at its own scale (up to 4x) before the resize to the target size.
MAX_MODEL_UPSCALE_INPUT_PIXELS = LIMITS.max_input_image_pixels // 16


def extras_size(image: Image.Image, resize_mode: int, scale: float, width: int, height: int) -> tuple[int, int]:
    """The size A1111's extras tab makes: by `upscaling_resize` (mode 0) or to `upscaling_resize_w/h` (1)."""
    if resize_mode == 1 and width > 0 and height > 0:
        return width, height
    if scale <= 0:
        raise InvalidRequestError("upscaling_resize must be above 0", field="upscaling_resize")
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))
