"""A generator replica's settings: its batching (`user_config`, changeable on a running deployment) and its
torch thread count."""

import math
import os

import ray
from pydantic import BaseModel, ConfigDict, Field


class BatchingConfig(BaseModel):
    """A generator deployment's `user_config` (it can be changed on a running deployment).

    The batch limits are a memory question on a GPU: a batch's activations grow with its total pixels, so a
    batch is capped both in jobs and in output pixels (hires fix: the final size). Each family's defaults
    (below) fit a 24 GB GPU in half precision with VAE slicing; raise them on larger GPUs after measuring with
    bench/gpu_bench.py.
    """

    model_config = ConfigDict(extra="forbid")

    # How long an idle replica waits for batch-mates after a job arrives; 0 turns batching off. Jobs that
    # arrive while a batch runs join the next batch without any added wait.
    batch_wait_ms: float = Field(100.0, ge=0, le=1000)
    max_batch_size: int = Field(8, ge=1, le=64)
    max_batch_pixels: int = Field(8 * 512 * 512, ge=64 * 64)


def torch_thread_count(configured: int | None) -> int:
    """torch's CPU threads for this replica (Ray sets OMP_NUM_THREADS=1 in replicas with num_cpus <= 1, which
    would leave torch on one core). A positive number is taken as is; None: the CPUs this replica asked Ray
    for, rounded up; negative numbers count the machine's cores as joblib's n_jobs does: -1 every core,
    -2 every core but one (what the CPU-only local layout uses: the HTTP side and the job store need a core,
    or torch's threads stall at every operation whenever they run)."""
    if configured is not None and configured > 0:
        return configured
    if configured is not None and configured < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores + 1 + configured)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(cpus))
