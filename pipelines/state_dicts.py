"""Reading a weights file's tensors: `.safetensors`, or a `torch.save` pickle (`.pt`, `.pth`, `.ckpt`, `.bin`)
loaded with `weights_only`, unwrapping a training checkpoint's `state_dict`. One reader for the LoRAs, VAEs and
ControlNets users drop in (engine side: it imports torch)."""

from pathlib import Path


def read_state_dict(path: Path) -> dict:
    """The file's tensors by name (a pickle's top-level object, when it is not a dict, is returned as it is for
    the caller to refuse)."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
