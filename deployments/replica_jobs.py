"""What a generator replica keeps of the jobs it runs: each image waiting in (or running in) a batch, the
finished images of each job until all are in, and Serve's multiplexed cache entries for the engine's models."""

import time
import weakref
from dataclasses import dataclass, field

from deployments.job_records import PER_IMAGE_FIELDS, JobOrder
from pipelines.generate import ImageEngine
from pipelines.models import LoadedModel
from pipelines.prepare import PreparedJob
from pipelines.storage import OutputStorage


class ModelHandle:
    """What Serve's multiplexed cache holds for a checkpoint: a weak reference to the engine's load of it, never
    the pipeline. The engine's LRU cache is the one owner of pipelines, with the one budget (MODELS_PER_REPLICA).

    Why this design: Serve routes by the model ids of its own multiplexed cache, and offers no public way to
    be told that the engine evicted one. So Serve's cache, with the engine's budget and every load on the
    replica going through it (the warm-up's are put into it at start), picks what to evict; evicting calls
    `__del__` (Serve's hook for freeing a model), which releases that very pipeline in the engine before the
    next one loads. What Serve routes by is then what is in memory, and no pipeline outlives its eviction in
    a second cache. The engine's own LRU eviction only acts on loads outside Serve's cache; a handle whose
    model it let go loads it again (`current`, `reload`). Python calling `__del__` again when it collects the
    handle is harmless: the engine releases only this load of the model, never a later one.
    """

    def __init__(self, engine: ImageEngine, loaded: LoadedModel):
        self.engine = engine
        self.name = loaded.entry.name
        self._loaded = weakref.ref(loaded)

    def current(self) -> LoadedModel | None:
        """The engine's load of the model; None when the engine let it go on its own (a load outside Serve's
        cache made room): `reload` then."""
        loaded = self._loaded()
        return loaded if loaded is not None and self.engine.holds(loaded) else None

    def reload(self) -> LoadedModel:
        """Loads the model into the engine again (blocking: call it off the event loop)."""
        loaded = self.engine.load(self.name)
        self._loaded = weakref.ref(loaded)
        return loaded

    def __del__(self) -> None:
        loaded = self._loaded()
        if loaded is not None:
            self.engine.release(loaded)


@dataclass
class QueuedJob:
    """One image of a request (`batch_size` x `n_iter` images: `job.image_index` of `job.image_count`) waiting
    in, or running as part of, a batch. It names its model rather than holding the loaded pipeline, so a model
    evicted while the job waits is not kept in memory beside its successor."""

    order: JobOrder  # the whole job, as the ingress prepared it
    job: PreparedJob  # this image's part of it
    model: str
    token: str  # this attempt's own: its files are staged under names no other attempt of the job uses
    arrived: float = field(default_factory=time.monotonic)  # when it reached this replica (queue-time metric)

    @property
    def job_id(self) -> str:
        return self.order.job_id

    @property
    def key(self) -> tuple[str, int]:
        return self.job_id, self.job.image_index


@dataclass
class CollectedImages:
    """The finished images of one job, gathered across the batches they run in; the job is recorded as done
    once all of them are in."""

    count: int
    records: dict[int, dict] = field(default_factory=dict)  # image index -> saved image record
    seconds: float = 0.0  # time in the diffusers calls that made them
    settled: int = 0  # images whose batch has given them an outcome (made, failed, cancelled or skipped)
    recorded: bool = False  # the job store has the job as done with these images

    @property
    def complete(self) -> bool:
        return len(self.records) == self.count

    def result(self) -> tuple[dict, list[str]]:
        """The job's result record (lists of every image's fields; `image` & co. are read from their first
        items) and the warnings its images' runs added."""
        records = [self.records[index] for index in range(self.count)]
        first = records[0]
        warnings = list(dict.fromkeys(w for record in records for w in record["warnings"]))
        per_image = (*PER_IMAGE_FIELDS, "staged_path", "warnings", "data")
        result = {key: value for key, value in first.items() if key not in per_image}
        result.update({plural: [record[single] for record in records]
                       for single, plural in PER_IMAGE_FIELDS.items() if single in first})  # fmt: skip
        result["staged_paths"] = [record["staged_path"] for record in records]
        result["generation_time_sec"] = round(self.seconds, 3)
        result["batch_size"] = max(record["batch_size"] for record in records)
        return result, warnings

    def staged(self) -> dict[str, str]:
        """This attempt's staged files: staged name -> final name."""
        return {record["staged_path"]: record["output_path"] for record in self.records.values()}

    def discard_files(self, storage: OutputStorage) -> None:
        """Deletes this attempt's staged files (never a final name: those may be another attempt's)."""
        for staged in self.staged():
            storage.delete(staged)
        self.records.clear()

    def promote_files(self, storage: OutputStorage) -> None:
        """Moves this attempt's staged files to their final names: the job store recorded this attempt's result."""
        for staged, final in self.staged().items():
            storage.promote(staged, final)
