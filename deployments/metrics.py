"""The service's metrics: job outcomes, queue depth, phase and load times, multiplexing, batches, webhooks.

They go through Ray's metrics API (`ray.util.metrics`), so every node exports them next to Ray Serve's own on its
metrics port (Prometheus names get Ray's `ray_` prefix: `ray_diffusion_api_jobs_finished_total`, ...). The
job-store gauges (jobs by state and family, the same for the whole service) are also served by the ingress at
`GET /metrics` (`job_store_metrics`), for a scrape that needs no Ray service discovery.
"""

import functools
import time
from typing import get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from ray.util.metrics import Counter, Gauge, Histogram

from pipelines.catalog import Family
from pipelines.schemas import JobState

SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
# Ray reports a histogram's sum from its buckets' midpoints: bucket (k - 0.5, k + 0.5] makes a batch of k images
# count exactly k (up to 16), so sum / count is the true mean.
BATCH_BUCKETS = [size + 0.5 for size in range(17)] + [24.5, 32.5, 64.5]
JOB_STATES = tuple(state.value for state in JobState)
FAMILIES = get_args(Family)


class ServiceMetrics:
    """Created once per process, on first use (a metric belongs to the Ray worker that records it)."""

    def __init__(self):
        self.jobs_finished = Counter(
            "diffusion_api_jobs_finished", "Jobs that ended, by end state and model family",
            tag_keys=("family", "state"),
        )  # fmt: skip
        self.queue_depth = Gauge(
            "diffusion_api_queue_depth", "Jobs queued or running, per model family (the whole service)",
            tag_keys=("family", "state"),
        )  # fmt: skip
        self.job_seconds = Histogram(
            "diffusion_api_job_seconds", "Seconds from submission to the end, by model family and end state",
            boundaries=SECONDS_BUCKETS, tag_keys=("family", "state"),
        )  # fmt: skip
        self.phase_seconds = Histogram(
            "diffusion_api_phase_seconds", "Seconds a batch spent in each phase (queued on its generator, "
            "generation, initial generation, upscaling, hires pass, refining)",
            boundaries=SECONDS_BUCKETS, tag_keys=("family", "phase"),
        )  # fmt: skip
        self.model_load_seconds = Histogram(
            "diffusion_api_model_load_seconds", "Seconds to load a model onto a generator replica",
            boundaries=SECONDS_BUCKETS, tag_keys=("family",),
        )  # fmt: skip
        self.multiplex = Counter(
            "diffusion_api_multiplex_requests", "Jobs whose model was already loaded on their replica (hit) or "
            "had to be loaded (miss)", tag_keys=("family", "outcome"),
        )  # fmt: skip
        self.batch_size = Histogram(
            "diffusion_api_batch_size", "Images per diffusers call", boundaries=BATCH_BUCKETS, tag_keys=("family",)
        )
        self.webhooks = Counter(
            "diffusion_api_webhooks", "Webhook deliveries by outcome (delivered, failed)", tag_keys=("status",)
        )


@functools.cache
def service_metrics() -> ServiceMetrics:
    return ServiceMetrics()


def job_store_metrics(usage: list[tuple[str, str, str, int, int]]) -> bytes:
    """`GET /metrics`: the job store's counts, (family, state, owner, jobs, images) rows, as Prometheus text, by
    the API key's name (never the key; empty with keys off). Every state of every family is given for every
    key that has jobs (0 where there are none), so a series does not vanish when its jobs end."""
    registry = CollectorRegistry(auto_describe=False)
    labels = ["state", "family", "key"]
    jobs = GaugeMetricFamily("diffusion_api_jobs", "Jobs in the job store by state, model family and API key "
                             "(ended jobs until retention prunes them)", labels=labels)  # fmt: skip
    images = GaugeMetricFamily("diffusion_api_images", "Images of the jobs in the job store by state, model family "
                               "and API key: queued and processing are the images waiting or being made, done the "
                               "images made (until retention prunes them)", labels=labels)  # fmt: skip
    found = {(family, state, owner): (count, made) for family, state, owner, count, made in usage}
    families = sorted({*FAMILIES, *(family for family, _, _ in found if family)})
    owners = sorted({owner for _, _, owner in found}) or [""]
    for family in families:
        for state in JOB_STATES:
            for owner in owners:
                count, made = found.get((family, state, owner), (0, 0))
                jobs.add_metric([state, family, owner], count)
                images.add_metric([state, family, owner], made)

    class Collector:
        def collect(self):
            yield jobs
            yield images

    registry.register(Collector())
    return generate_latest(registry)


class PhaseTimer:
    """Times a batch's phases as its progress reports name them: each phase's seconds are recorded when the
    next one starts, and the last one's at `stop()`."""

    def __init__(self, family: str):
        self.family = family
        self.phase: str | None = None
        self.since = 0.0

    def enter(self, phase: str) -> None:
        if phase != self.phase:
            self.stop()
            self.phase, self.since = phase, time.monotonic()

    def stop(self) -> None:
        if self.phase is not None:
            observe_phase(self.family, self.phase, time.monotonic() - self.since)
            self.phase = None


def observe_phase(family: str, phase: str, seconds: float) -> None:
    service_metrics().phase_seconds.observe(seconds, tags={"family": family, "phase": phase})
