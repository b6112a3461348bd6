"""Where a model part runs, and diffusers' model CPU offload (speed option `cpu_offload`) kept right around what
changes a model. Without torch at import: the listing modules that import this run in the ingress."""

import contextlib


def execution_device(module):
    """Where `module` runs: the device of its weights, or with model CPU offload (speed option `cpu_offload`)
    the device its hook moves it to for each call (its weights wait on the CPU in between)."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def is_offloaded(pipe) -> bool:
    """Whether the pipeline's parts have model CPU offload hooks (diffusers' `enable_model_cpu_offload`)."""
    return getattr(pipe, "_offload_device", None) is not None and bool(getattr(pipe, "_all_hooks", None))


@contextlib.contextmanager
def offload_paused(pipe):
    """Model CPU offload's hooks off while the block changes the model (loads LoRA, IP-Adapter or embedding
    weights), and on again for the pipeline's device after it. diffusers' loaders do this themselves but put the
    hooks back for another device: the LoRA and IP-Adapter loaders for the default accelerator (an error on a
    CPU-only host), the textual-inversion loader for the text encoder's device, which between calls is the CPU
    (every later job would then run on the CPU)."""
    if not is_offloaded(pipe):
        yield
        return
    device = pipe._offload_device
    pipe.remove_all_hooks()
    try:
        yield
    finally:
        pipe.enable_model_cpu_offload(device=device)


def reset_offload(pipe) -> None:
    """Every part of an offloaded pipeline back on the CPU and hooked afresh (what diffusers does after a call
    that returns); nothing for a pipeline without offload."""
    if is_offloaded(pipe):
        pipe.enable_model_cpu_offload(device=pipe._offload_device)
