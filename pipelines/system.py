"""Health figures: CPU, memory, disk, GPU."""

import os
import shutil
import time
from pathlib import Path

import psutil

from pipelines.settings import VERSION
from pipelines.storage import OutputStorage


def gpu_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"cuda_available": False, "device_name": "cpu"}
    info: dict = {"cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        device = torch.cuda.current_device()
        info.update(
            cuda_version=torch.version.cuda,
            gpu_count=torch.cuda.device_count(),
            current_device=device,
            device_name=torch.cuda.get_device_name(device),
            memory_allocated_gb=round(torch.cuda.memory_allocated(device) / 2**30, 2),
            memory_reserved_gb=round(torch.cuda.memory_reserved(device) / 2**30, 2),
        )
    else:
        info["device_name"] = "cpu"
    info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return info


def health_report(models_dir: Path, loras_dir: Path, outputs_dir: Path, outputs: OutputStorage, model_count: int,
                  lora_count: int, active_jobs: int, queue_dir: str, gpu: dict | None = None) -> dict:  # fmt: skip
    """The seed's HealthResponse; `status` is "warning" when memory or disk run low or the output storage
    cannot be written. `outputs_dir` is the local folder (the job database by default), `outputs` where the
    images go (that folder, or a URL). `gpu` is the figures of the process that holds the GPU (a generator
    replica), this process's own when not given."""
    memory = psutil.virtual_memory()
    outputs_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(outputs_dir)
    warnings = []
    if memory.percent > 90:
        warnings.append(f"memory is {memory.percent:.0f}% used")
    available = outputs.available()
    if not available:
        warnings.append(f"the output storage {outputs.location} cannot be written")
    # Free space where the images go: a local folder's disk; unknown (None) for object storage.
    free_gb = shutil.disk_usage(outputs.root).free / 2**30 if outputs.is_local and available else None
    if free_gb is not None and free_gb < 2:
        warnings.append(f"only {free_gb:.1f} GB free for outputs in {outputs.location}")
    if model_count == 0:
        warnings.append(f"no models in {models_dir}; run 'make demo-models'")
    return {
        "status": "warning" if warnings else "healthy",
        "timestamp": time.time(),
        "version": VERSION,
        "system": {
            "cpu_count": os.cpu_count() or 1,
            "memory_total_gb": round(memory.total / 2**30, 2),
            "memory_available_gb": round(memory.available / 2**30, 2),
            "memory_percent": memory.percent,
            "disk_usage_percent": round(100 * disk.used / disk.total, 1),
        },
        "gpu": gpu if gpu is not None else gpu_info(),
        "models": {"count": model_count, "directory": str(models_dir)},
        "loras": {"count": lora_count, "directory": str(loras_dir)},
        "queue": {"active_jobs": active_jobs, "directory": queue_dir},
        "outputs": {
            "available": available,
            "free_space_gb": round(free_gb, 2) if free_gb is not None else None,
            "directory": outputs.location,
        },  # fmt: skip
        "warnings": warnings,
    }
