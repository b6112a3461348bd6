"""Where a model part runs. Without torch at import: the listing modules that import this run in the ingress."""


def execution_device(module):
    """Where `module` runs: the device of its weights, or with model CPU offload (speed option `cpu_offload`)
    the device its hook moves it to for each call (its weights wait on the CPU in between)."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device
