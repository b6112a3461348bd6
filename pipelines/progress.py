"""A job's progress as one figure across its phases (first pass, upscaling, hires pass, refiner), and the
callback types the engine reports through. A cancelled job is stopped here, at its next step."""

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipelines.errors import JobCancelledError

if TYPE_CHECKING:
    from pipelines.prepare import PreparedJob

ProgressCallback = Callable[[int, int, str], None]  # (done, total, phase): overall progress across phases
# (the jobs of the running call, done, total, phase): a batch's progress, for the jobs it concerns
BatchProgressCallback = Callable[[list["PreparedJob"], int, int, str], None]


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
