"""Writing a generator replica's images and recording its jobs' outcomes in the job store.

A job's images may run in several batches; each is encoded with its infotext and staged under this attempt's
own name as it is made, and the job is recorded as done (one store transaction for every job a batch
completes) once all are in: then, and only then, its files get their final names. A job that fails, or is
cancelled, part-way has its staged files discarded; another attempt's files are never touched.
"""

import asyncio
import logging

from deployments.job_client import JobsClient
from deployments.replica_jobs import CollectedImages, QueuedJob
from pipelines.errors import DiffusionAPIError, JobCancelledError
from pipelines.generate import GenerationResult
from pipelines.infotext import encode_image
from pipelines.schemas import JobState
from pipelines.storage import OutputStorage, StorageError

logger = logging.getLogger("ray.serve")
COMPLETE_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # a store outage of about a minute is waited out


class ImageRecorder:
    def __init__(self, jobs: JobsClient, storage: OutputStorage):
        self.jobs = jobs
        self.storage = storage
        self.collected: dict[str, CollectedImages] = {}  # job id -> its finished images, until all are in
        self.discarding: set[asyncio.Task] = set()

    def save(self, queued: QueuedJob, result: GenerationResult) -> dict | BaseException:
        """Encodes one image with its infotext and writes it to the output storage (in the worker thread, off
        the event loop): the job's first image is `<job id>.<ext>`, the others `<job id>-<index>.<ext>`.
        Returns its record (the image's location, not its bytes: those stay out of the job database), with
        the warnings the run added; with the bytes too (`data`, never recorded) when the order asks to have its
        images returned. A job whose image cannot be written ends in error alone; its batch-mates keep theirs."""
        order = queued.order
        try:
            data = encode_image(result.image, order.file_type, result.infotext, order.jpeg_quality)
            staged, final = self.storage.stage(queued.job_id, queued.job.image_index, order.file_type, data,
                                               queued.token)  # fmt: skip
        except (OSError, StorageError) as error:
            logger.exception("job %s: writing its image failed", queued.job_id)
            return DiffusionAPIError(f"the image could not be written: {error}")
        return {
            "output_path": final,
            "staged_path": staged,
            "width": result.width,
            "height": result.height,
            "file_type": order.file_type,
            "jpeg_quality": order.jpeg_quality,
            "generation_time_sec": result.generation_time_sec,
            "memory_before_mb": result.memory_before_mb,
            "memory_after_mb": result.memory_after_mb,
            "seed": result.seed,
            "infotext": result.infotext,
            "batch_size": result.batch_size,
            "parameters": result.parameters,
            "warnings": result.warnings,
            **({"data": data} if order.return_images else {}),  # for the caller waiting on it; not recorded
        }

    async def record(
        self, batch: list[QueuedJob], results: list[dict | BaseException]
    ) -> dict[tuple[str, int], dict | BaseException]:
        """Records each job's outcome: its images are collected until all are in, then the job is done (one
        store transaction for every job the batch completes); a cancelled or failed image ends its job (the
        job's other images are discarded)."""
        outcomes: dict[tuple[str, int], dict | BaseException] = {}
        failures: dict[str, str] = {}
        seconds: dict[str, set[float]] = {}
        for queued, result in zip(batch, results, strict=True):
            if isinstance(result, dict):
                self.collected[queued.job_id].records[queued.job.image_index] = result
                seconds.setdefault(queued.job_id, set()).add(result["generation_time_sec"])
                outcomes[queued.key] = {"job_id": queued.job_id, "output_path": result["output_path"],
                                        **({"data": result["data"]} if "data" in result else {})}  # fmt: skip
            elif isinstance(result, JobCancelledError):
                logger.info("job %s cancelled", queued.job_id)
                outcomes[queued.key] = {"job_id": queued.job_id, "cancelled": True}
            else:
                failures.setdefault(queued.job_id, result.message if isinstance(result, DiffusionAPIError)
                                    else f"{type(result).__name__}: {result}")  # fmt: skip
                outcomes[queued.key] = result
        for job_id, times in seconds.items():
            self.collected[job_id].seconds += sum(times)  # one figure per diffusers call (OOM retries: several)
        finished = [
            job_id
            for job_id in dict.fromkeys(queued.job_id for queued in batch)
            if job_id not in failures and job_id in self.collected and self.collected[job_id].complete
        ]
        if finished:
            results_and_warnings = [self.collected[job_id].result() for job_id in finished]
            outcomes_to_record = [
                (job_id, result, warnings)
                for job_id, (result, warnings) in zip(finished, results_and_warnings, strict=True)
            ]
            completed = await self.complete(outcomes_to_record)
            for job_id, done in zip(finished, completed, strict=True):
                # Not done: cancelled at the very end, or completed by another attempt (its files stand).
                self.collected[job_id].recorded = done
                if done:
                    try:
                        await asyncio.to_thread(self.collected[job_id].promote_files, self.storage)
                    except DiffusionAPIError as error:  # the storage failed the rename: the staged file is named
                        logger.error("job %s: moving its images to their final names failed: %s", job_id,
                                     error.message)  # fmt: skip
        for job_id, message in failures.items():
            await self.jobs.fail(job_id, message)
        return outcomes

    async def complete(self, outcomes: list[tuple[str, dict, list[str]]]) -> list[bool]:
        """Records finished jobs, retried through a store outage of about a minute: a transient error must not
        throw away images that are made. After the last retry, the jobs count as not completed here (their
        leases lapse and they are dispatched again, or they are failed by the stale reaper)."""
        for delay in (*COMPLETE_RETRY_DELAYS_S, None):
            try:
                return await self.jobs.complete_many(outcomes)
            except Exception:
                if delay is None:
                    logger.exception("recording jobs %s as done failed; giving up", [job[0] for job in outcomes])
                    return [False] * len(outcomes)
                logger.warning("recording jobs as done failed; retrying in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def settle(self, batch: list[QueuedJob]) -> None:
        """Counts the batch's images as settled; a job whose images have all settled is forgotten, its files
        discarded unless it was completed (it failed, or was cancelled, part-way)."""
        for queued in batch:
            collected = self.collected.get(queued.job_id)
            if collected is None:
                continue
            collected.settled += 1
            if collected.settled >= collected.count:
                del self.collected[queued.job_id]
                if not collected.recorded:
                    task = asyncio.get_running_loop().create_task(self.discard(queued.job_id, collected))
                    self.discarding.add(task)
                    task.add_done_callback(self.discarding.discard)

    async def discard(self, job_id: str, collected: CollectedImages) -> None:
        """Deletes the staged files of a job this replica did not see completed, unless the job store has
        this very attempt's result after all (the store committed, its answer was lost): then they are moved
        to their final names. Another attempt's files are never touched."""
        try:
            job = await self.jobs.get(job_id)
            recorded = set(((job.result if job else None) or {}).get("staged_paths") or [])
            if job is not None and job.state == JobState.done and recorded & set(collected.staged()):
                await asyncio.to_thread(collected.promote_files, self.storage)
            else:
                await asyncio.to_thread(collected.discard_files, self.storage)
        except Exception:
            logger.exception("discarding the files of job %s failed", job_id)
