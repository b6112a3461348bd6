"""The job store's typed records: what `JobStore` returns (frozen dataclasses, states as `JobState`), so no
caller reads a job through dict keys or compares bare state strings."""

from dataclasses import dataclass, field

from pipelines.prepare import PreparedJob
from pipelines.schemas import GenerationRequest, JobState

# What clients watching a job wait on (long polls, event streams): `JobStore.summaries` reads these columns.
SUMMARY_FIELDS = ("state", "phase", "progress", "batch_size", "attempts", "preview")


@dataclass(frozen=True)
class JobRecord:
    """One job as the store holds it (read-only: a change is a store transition, never an edit here)."""

    job_id: str
    kind: str
    state: JobState
    phase: str
    progress: float
    created: float
    updated: float
    payload: dict
    warnings: list[str]
    result: dict | None = None
    error: str | None = None
    batch_size: int | None = None
    attempts: int = 1
    preview: str | None = None
    webhook: dict | None = None
    family: str = ""
    origin: str = ""
    owner: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    started: float | None = None
    images: int = 1  # batch_size x n_iter
    priority: int = 0  # among its owner's waiting jobs (higher first)
    dispatched: float | None = None  # when the fair queue gave it to a generator (None: waiting in the queue)

    @property
    def ended(self) -> bool:
        return self.state.ended

    def summary(self) -> "JobSummary":
        return JobSummary(**{name: getattr(self, name) for name in SUMMARY_FIELDS})


@dataclass(frozen=True)
class JobSummary:
    """What clients watching a job wait on (long polls, event streams), read for many jobs at once."""

    state: JobState
    phase: str
    progress: float
    batch_size: int | None
    attempts: int
    preview: str | None

    def fields(self) -> dict:
        """The summary as status fields (the preview left out: it is an event of its own)."""
        return {"state": self.state.value, "phase": self.phase, "progress": self.progress,
                "batch_size": self.batch_size, "attempts": self.attempts}  # fmt: skip


@dataclass(frozen=True)
class ActiveJob:
    """A queued or running job of one origin (A1111's `progress` reads these)."""

    job_id: str
    state: JobState
    phase: str
    progress: float
    created: float
    steps: int | None
    preview: str | None


@dataclass(frozen=True)
class JobListing:
    """One job of a `GET /queue` listing: what it is and where it stands, without its request or result."""

    job_id: str
    kind: str
    state: JobState
    phase: str
    progress: float
    created: float
    updated: float
    family: str
    origin: str
    owner: str
    images: int
    priority: int
    model: str


@dataclass(frozen=True)
class Orphan:
    """An active job nobody held any more, claimed to be put back in the queue."""

    job_id: str
    family: str


@dataclass(frozen=True)
class ClaimedJob:
    """A waiting job the fair queue gave this replica to dispatch (its record's request, to prepare it again
    where this replica did not take it)."""

    job_id: str
    kind: str
    payload: dict
    family: str
    inputs: dict[str, str]


@dataclass(frozen=True)
class KeyLimits:
    """A key's own limits (the keys file's per-key settings); None: no limit of that kind."""

    max_queued_images: int | None = None  # images (batch_size x n_iter) queued or running at once
    requests_per_minute: int | None = None  # job submissions, a token bucket of this size refilled per minute
    max_priority: int | None = None  # the highest `priority` its jobs may ask for


NO_LIMITS = KeyLimits()


@dataclass(frozen=True)
class Refusal:
    """Why the store did not record a job: the limit reached (`max_queued_jobs`, `max_queued_images`,
    `requests_per_minute`), its configured value, the count it reached, and when a retry may pass."""

    limit: str
    value: int
    current: float
    retry_after_s: int

    def __bool__(self) -> bool:
        return False  # a refusal is not a created job (`if not store.create(...)`)


@dataclass(frozen=True)
class TakenAtOnce:
    """What `create` answers when the job went straight to its family's generators: nobody waited ahead of it
    and they had room, so the fair queue would have given it next anyway (no claim round trip)."""


@dataclass(frozen=True)
class QueuePlace:
    """Where a waiting job stands: jobs ahead of it in its family's fair order, the images they hold, the
    family's recent throughput (images/s, None before any job finished) and its generators' room now (0: no
    replica is up: the job waits for one to start)."""

    position: int
    images_ahead: int
    images_per_s: float | None
    slots: int

    def eta_s(self, own_images: int) -> float | None:
        """Seconds until the job is done, at the family's recent pace (None: no pace measured yet)."""
        if not self.images_per_s:
            return None
        return round((self.images_ahead + own_images) / self.images_per_s, 1)


@dataclass(frozen=True)
class LapsedDelivery:
    """An ended job's webhook nobody is delivering, claimed to be delivered."""

    job_id: str
    callback_url: str | None


@dataclass(frozen=True)
class PriorSubmission:
    """An earlier submission under the same Idempotency-Key: its job, and the fingerprint of its request."""

    job_id: str
    request_hash: str


@dataclass
class JobOrder:
    """A job as the ingress prepared it, handed to a generator replica with the dispatch: the engine's
    `PreparedJob` (its seed, LoRA files, input image, hires fix, refiner, VAE and warnings, decided once), how
    many images it makes and how they are written. The generator runs it as it is: a file changed between
    submission and run cannot make the two sides disagree. A job dispatched again after a restart is prepared
    again from its stored request (with the seed the first preparation fixed)."""

    job_id: str
    job: PreparedJob
    images: int  # batch_size x n_iter
    file_type: str
    jpeg_quality: int
    return_images: bool = False  # the generator sends the encoded images back (a caller waits to answer with them)

    @classmethod
    def of(cls, job_id: str, job: PreparedJob, request: GenerationRequest, return_images: bool = False) -> "JobOrder":
        """The order of a request (either kind) as `job` prepared it."""
        return cls(job_id, job, request.batch_size * request.n_iter, request.file_type, request.jpeg_quality,
                   return_images)  # fmt: skip


PER_IMAGE_FIELDS = {"image": "images", "output_path": "output_paths", "seed": "seeds", "infotext": "infotexts"}


def image_fields(result: dict) -> dict:
    """A result record with both the per-image lists (`images`, `seeds`, ...) and their first items (`image`,
    `seed`, ...): a record holds the lists, one written before multi-image jobs only the single fields."""
    result = dict(result)
    for single, plural in PER_IMAGE_FIELDS.items():
        if result.get(plural):
            result[single] = result[plural][0]
        elif single in result:
            result[plural] = [result[single]]
    return result
