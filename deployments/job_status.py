"""A job's files and its status as clients read it: the images and inputs in the output storage, and the
projection of a `JobRecord` onto the status fields (`GET /queue/{id}`, the final event, the webhook body)."""

import asyncio

from deployments.job_records import JobRecord, image_fields
from pipelines.control_plan import CONTROL_MAP, unit_image_name, unit_images
from pipelines.errors import JobNotFinishedError, UnknownJobError
from pipelines.images import decode_base64_bytes, encode_base64, image_extension
from pipelines.schemas import JobState
from pipelines.storage import MissingImageError, OutputStorage

INPUT_FIELDS = ("image", "mask")  # img2img's input images: stored in the output storage, not in the job record


def input_images(request) -> dict[str, str]:
    """A request's input images as sent (base64), by the name they are stored under: img2img's `image` and
    `mask`, each ControlNet unit's `image`."""
    found = {name: getattr(request, name) for name in INPUT_FIELDS if getattr(request, name, None)}
    for index, unit in enumerate(getattr(request, "controlnet", None) or []):
        for position, image in enumerate(unit_images(unit)):
            found[unit_image_name(index, position)] = image
    return found


def input_field(name: str) -> str:
    """The request field an input image's stored name stands for (`controlnet.0.image` -> `controlnet[0].image`,
    `controlnet.0.image.2` -> `controlnet[0].image[2]`)."""
    parts = name.split(".")
    if parts[0] != "controlnet":
        return name
    return f"controlnet[{parts[1]}].image" + (f"[{parts[3]}]" if len(parts) > 3 else "")


def without_inputs(payload: dict) -> dict:
    """A request's payload as its job record keeps it: the input images left out (they are stored apart)."""
    record = {key: value for key, value in payload.items() if key not in INPUT_FIELDS}
    if payload.get("controlnet"):
        record["controlnet"] = [{**unit, "image": None} for unit in payload["controlnet"]]
    return record


def payload_with_inputs(payload: dict, inputs: dict[str, str]) -> dict:
    """A record's payload with its input images (base64, `read_inputs`) back in their places."""
    merged = {**payload, **{name: value for name, value in inputs.items() if name in INPUT_FIELDS}}
    units = [dict(unit) for unit in payload.get("controlnet") or []]
    for index, unit in enumerate(units):
        images = []
        while (name := unit_image_name(index, len(images))) in inputs:
            images.append(inputs[name])
        if images:  # an IP-Adapter unit's several reference images come back as the list they were sent as
            unit["image"] = images[0] if len(images) == 1 else images
    if units:
        merged["controlnet"] = units
    return merged


class JobFiles:
    """A job's images (written by the generators) and input images (written at submission), by the locations
    its record keeps."""

    def __init__(self, storage: OutputStorage):
        self.storage = storage

    # Inputs ------------------------------------------------------------------------------------------------
    def store_inputs(self, job_id: str, files: dict[str, bytes]) -> dict[str, str]:
        """Writes a job's input images (img2img `image`, `mask`, the ControlNet units' images and maps: name ->
        the file's bytes) once; their locations."""
        stored: dict[str, str] = {}
        try:
            for name, data in files.items():
                stored[name] = self.storage.save_input(job_id, name, image_extension(data), data)
        except BaseException:
            self.delete_inputs(stored)
            raise
        return stored

    def delete_inputs(self, inputs: dict[str, str]) -> None:
        for location in inputs.values():
            self.storage.delete(location)

    def read_inputs(self, inputs: dict[str, str]) -> dict[str, str]:
        """A job's stored input images, as the base64 its payload had (MissingImageError when one is gone)."""
        map_suffix = CONTROL_MAP.format(index="")[len("controlnet.") :]  # ".map": a unit's map, not an input
        return {name: encode_base64(self.storage.read(location)) for name, location in inputs.items()
                if not name.endswith(map_suffix)}  # fmt: skip

    def read_maps(self, inputs: dict[str, str]) -> dict[str, bytes]:
        """A job's stored ControlNet maps (name -> PNG bytes), those still in the storage."""
        map_suffix = CONTROL_MAP.format(index="")[len("controlnet.") :]
        maps = {}
        for name, location in inputs.items():
            if name.endswith(map_suffix):
                try:
                    maps[name] = self.storage.read(location)
                except MissingImageError:  # made again from the unit's image
                    continue
        return maps

    def control_maps(self, job: JobRecord) -> list[str | None]:
        """Each ControlNet unit's map as the ControlNet saw it (PNG, base64), in unit order; None for one gone
        from the storage."""
        maps: list[str | None] = []
        for index in range(len(job.payload.get("controlnet") or [])):
            location = (job.inputs or {}).get(CONTROL_MAP.format(index=index))
            try:
                maps.append(encode_base64(self.storage.read(location)) if location else None)
            except MissingImageError:
                maps.append(None)
        return maps

    # Outputs -----------------------------------------------------------------------------------------------
    async def with_image_bytes(self, result: dict) -> tuple[dict, list[str]]:
        """A finished job's result with its images (base64) read from the output storage, where the record keeps
        only their locations (records written before the storage held their bytes inline), and a warning for
        each image no longer there (then `images` is left out). An unreachable storage is a StorageError."""
        result = image_fields(result)
        if result.get("images") or not result.get("output_paths"):
            return result, []
        staged = result.get("staged_paths") or [None] * len(result["output_paths"])
        pairs = zip(result["output_paths"], staged, strict=True)
        found = await asyncio.gather(*(self._read(path, staged_path) for path, staged_path in pairs))
        missing = [f"image {path} is no longer in the output storage" for path, data in
                   zip(result["output_paths"], found, strict=True) if data is None]  # fmt: skip
        if not missing:
            result["images"] = [encode_base64(data) for data in found]
            result["image"] = result["images"][0]
        return result, missing

    async def _read(self, path: str, staged: str | None = None) -> bytes | None:
        try:
            return await asyncio.to_thread(self.storage.read_recorded, path, staged)
        except MissingImageError:
            return None

    async def image(self, job: JobRecord, index: int) -> tuple[bytes, str]:
        """One image file of a finished job and its file type. JobNotFinishedError before it is done (or when it
        ended without images), UnknownJobError for an index beyond its images, MissingImageError for a file no
        longer in the storage."""
        if job.state != JobState.done or not job.result:
            raise JobNotFinishedError(f"job {job.job_id} is {job.state}: it has no image" +
                                      ("" if job.ended else " yet"))  # fmt: skip
        result = image_fields(job.result)
        paths, inline = result.get("output_paths") or [], result.get("images") or []
        count = max(len(paths), len(inline))
        if index >= count:
            raise UnknownJobError(f"job {job.job_id} has {count} image(s); index {index} is beyond them")
        if index < len(inline):  # a record from before the output storage: the bytes are in the record
            data = decode_base64_bytes(inline[index], "image")
        else:
            staged = (result.get("staged_paths") or [None] * count)[index]
            data = await asyncio.to_thread(self.storage.read_recorded, paths[index], staged)
        return data, result.get("file_type") or "png"

    # The status --------------------------------------------------------------------------------------------
    async def status(self, job: JobRecord, with_images: bool, with_inputs: bool = False) -> dict:
        """The record as the status fields clients read; `with_images`: the images' bytes (base64), else
        `image_url` (where `GET /queue/{id}/image` serves them) in their place; `with_inputs`: the payload with
        its input images read back (they are never part of the status otherwise)."""
        fields = {
            "status": "error" if job.state == JobState.error else "success",
            "job_id": job.job_id,
            "progress": job.progress,
            "current_phase": job.phase,
            "state": job.state.value,
            "error": job.error,
            "warnings": job.warnings,
            "batch_size": job.batch_size,
            "attempts": job.attempts,
            "priority": job.priority,
        }
        if job.webhook:
            fields["webhook"] = job.webhook
        if job.preview and not job.ended:
            fields["preview"] = job.preview
        if job.state == JobState.done and job.result:
            if with_images:
                result, missing = await self.with_image_bytes(job.result)
            else:
                result, missing = image_fields(job.result), []
                for inline in ("image", "images"):
                    result.pop(inline, None)
            fields["image_url"] = f"/queue/{job.job_id}/image"
            result.pop("staged_paths", None)  # where the attempt wrote them first: the service's own business
            result.pop("parameters", None)  # the infotext's, structured (the A1111 door's `info`); `infotext` has them
            # Records written before inputs were stored apart still hold them in the payload: left out too.
            fields.update({**result, "payload": without_inputs(job.payload)})
            if with_images and job.payload.get("controlnet"):
                fields["controlnet_maps"] = await asyncio.to_thread(self.control_maps, job)
            fields["warnings"] = job.warnings + missing
        if with_inputs:  # an input gone from the storage: MissingImageError (404); unreachable: StorageError
            fields["payload"] = payload_with_inputs(job.payload, await asyncio.to_thread(self.read_inputs, job.inputs))
        return fields
