"""What a submission is recorded with, apart from the job itself: its Idempotency-Key fingerprint, its batch key
and priority in the fair queue, the 429 for a limit the store found reached, and `GET /queue`'s cursors."""

import hashlib
import json

from pydantic import BaseModel

from deployments.job_records import JobListing, KeyLimits, Refusal
from pipelines.errors import LimitReachedError
from pipelines.prepare import PreparedJob
from pipelines.schemas import GenerationRequest


def request_fingerprint(origin: str, kind: str, request: BaseModel) -> str:
    """What identifies a submission for its Idempotency-Key: the door and the door's request as the client sent
    it (every field, the defaults it left out included, unknown fields too), hashed."""
    text = json.dumps([origin, kind, request.model_dump(mode="json")], sort_keys=True, separators=(",", ":"),
                      default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def batch_key_text(model: str, job: PreparedJob) -> str:
    """The job's batch key as the fair queue compares it (equal: the jobs can share one diffusers call)."""
    return hashlib.sha256(repr((model, job.batch_key())).encode()).hexdigest()[:24]


def refusal_error(refusal: Refusal, family: str) -> LimitReachedError:
    """The 429 for a limit the store found reached, naming it and its value."""
    if refusal.limit == "max_queued_images":
        message = (f"this API key already has {refusal.current} image(s) queued or running and may have at most "
                   f"{refusal.value} (max_queued_images); retry in {refusal.retry_after_s} s")  # fmt: skip
    elif refusal.limit == "requests_per_minute":
        message = (f"this API key may submit {refusal.value} job(s) per minute (requests_per_minute); the next "
                   f"one is allowed in {refusal.retry_after_s} s")  # fmt: skip
    else:
        message = (f"the {family} generators already have {refusal.current} jobs queued or running, the most the "
                   f"service takes (max_queued_jobs {refusal.value}); retry in {refusal.retry_after_s} s")  # fmt: skip
    return LimitReachedError(message, limit=refusal.limit, retry_after_s=refusal.retry_after_s)


def capped_priority(request: GenerationRequest, limits: KeyLimits) -> tuple[int, list[str]]:
    """The job's priority within the key's `priority` setting, and a warning when it was lowered."""
    if limits.max_priority is None or request.priority <= limits.max_priority:
        return request.priority, []
    return limits.max_priority, [f"priority {request.priority} lowered to {limits.max_priority}, the highest this "
                                 f"API key may ask for (its 'priority' setting)"]  # fmt: skip


def make_cursor(last: JobListing) -> str:
    """A `GET /queue` cursor: where the page ended, `<created>_<job_id>` of its last job (the creation time in
    full precision, so the next page starts exactly after it). Any string of that form is a position."""
    return f"{last.created!r}_{last.job_id}"


def read_cursor(cursor: str | None) -> tuple[float, str] | None:
    if cursor is None:
        return None
    created, _, job_id = cursor.partition("_")  # the route's pattern has checked the form
    return float(created), job_id
