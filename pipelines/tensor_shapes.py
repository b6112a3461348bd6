"""The names and shapes of the tensors in a weights file, read without torch.

The ingress lists LoRAs and embeddings and tells their family from key names and shapes; it must not import
torch (3.5 s and ~560 MB per ingress replica). safetensors files say their shapes in a JSON header (read with
the safetensors library, numpy side). `torch.save` files are a zip holding a pickle: it is read with an
unpickler that knows only the calls that rebuild a tensor from its storage and plain containers, records the
shape and never reads the storage bytes. Anything else (the pre-1.6 pickle format, classes of other libraries)
gives None: the caller then loads the file with torch, engine side.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TensorShape:
    """What is known of a tensor without loading it: enough to tell a family (`shape`, `ndim`)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _StateDict(dict):
    """What an `OrderedDict` (a module's `state_dict()`, with its `_metadata` attribute) is read as."""


class _ShapeUnpickler(pickle.Unpickler):
    """Runs nothing the pickle names: tensor and parameter rebuilds become TensorShapes, storages stay unread,
    any other class is refused."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return lambda storage, offset, size, *rest: TensorShape(tuple(size))
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda tensor, *rest: tensor
        if module == "collections" and name == "OrderedDict":
            return _StateDict
        if module == "torch" and name.endswith("Storage"):
            return None
        raise pickle.UnpicklingError(f"{module}.{name} is not read without torch")

    def persistent_load(self, pid):
        return None  # a storage reference: its bytes are never read


def read(path: Path) -> dict | None:
    """{name: TensorShape} of a `.safetensors` or `.gguf` file or the dict a `torch.save` zip holds (nested
    dicts kept as they are); None when the file is of a kind only torch reads."""
    if path.suffix.lower() == ".gguf":  # llama.cpp's format (GGUF-quantized FLUX.1 transformers): numpy only
        from gguf import GGUFReader

        # GGUF lists a tensor's dimensions innermost first; torch's order is the reverse.
        return {tensor.name: TensorShape(tuple(int(side) for side in reversed(tensor.shape)))
                for tensor in GGUFReader(str(path)).tensors}  # fmt: skip
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as tensors:
            return {key: TensorShape(tuple(tensors.get_slice(key).get_shape())) for key in tensors.keys()}  # noqa: SIM118
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return None
            with archive.open(pickles[0]) as data:
                state = _ShapeUnpickler(data).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, AttributeError, TypeError, EOFError, IndexError):
        return None
    return _plain(state) if isinstance(state, dict) else None


def _plain(state: dict) -> dict:
    return {key: _plain(value) if isinstance(value, dict) else value for key, value in state.items()}


def metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (training hints such as `ss_base_model_version`); {} for other files."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.metadata() or {}
