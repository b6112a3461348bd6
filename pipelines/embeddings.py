"""Textual-inversion embeddings (A1111's `embeddings/` folder): used by writing their name in a prompt.

Formats: A1111's `.pt` (`string_to_param["*"]`), `.safetensors` with `emb_params`, SDXL files with `clip_l`
and `clip_g`, and diffusers' one-tensor files. The family comes from the file: `clip_l` + `clip_g` is SDXL,
one tensor 1024 wide is SD 2.x, any other single tensor SD1.5 (768 wide in real models). A job loads the
embeddings its prompts name into the model's tokenizers and text encoders through diffusers' textual-inversion
loader, and unloads them after the call, so an embedding's name never changes another job's prompt. The name
of an installed embedding of another family is removed from the prompt with a warning (never read as text).

The family is read from the tensors' shapes without torch (`read_shapes`): the ingress lists embeddings and
checks prompts with this module, and must not load torch. Only loading vectors into a model imports it.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import tensor_shapes
from pipelines.catalog import FileFactsCache, sha256_of_file
from pipelines.devices import offload_paused
from pipelines.families import family_of
from pipelines.names import scan_named_files
from pipelines.settings import Settings

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
logger = logging.getLogger(__name__)
SD2_WIDTH = 1024  # OpenCLIP-H: SD 2.x, which this service does not run

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EmbeddingFile:
    name: str  # the word that calls it in a prompt: the file name without extension
    path: Path
    family: str  # sd15, sdxl, sd2 or unknown


def read_vectors(path: Path) -> dict[str, torch.Tensor]:
    """The embedding's vectors: {"clip_l": ..., "clip_g": ...} for SDXL files, else {"clip_l": ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    return _vectors_of(state, path)


def _vectors_of(state: dict, path: Path) -> dict:
    """The embedding's vectors in a loaded file's dict (A1111's, diffusers' or SDXL's layout)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path.name}: not a textual-inversion embedding")
    if "clip_l" in state and "clip_g" in state:
        return {"clip_l": state["clip_l"], "clip_g": state["clip_g"]}
    if "string_to_param" in state:
        return {"clip_l": state["string_to_param"]["*"]}
    if "emb_params" in state:
        return {"clip_l": state["emb_params"]}
    tensors = [value for value in state.values() if hasattr(value, "shape")]
    if len(tensors) == 1:
        return {"clip_l": tensors[0]}
    raise ValueError(f"{path.name}: not a textual-inversion embedding (no string_to_param, emb_params or clip_l)")


def read_shapes(path: Path) -> dict:
    """The file's vectors' shapes (the layout `read_vectors` returns), read without torch where the format
    allows, else with torch (pipelines/tensor_shapes.py)."""
    state = tensor_shapes.read(path)
    return read_vectors(path) if state is None else _vectors_of(state, path)


def _family(path: Path) -> str:
    try:
        vectors = read_shapes(path)
    except Exception:  # any unreadable file (truncated, pickled classes, not an embedding) is listed as unknown
        return "unknown"
    if "clip_g" in vectors:
        return "sdxl"
    tensor = vectors["clip_l"]
    if tensor.ndim not in (1, 2):
        return "unknown"
    return "sd2" if tensor.shape[-1] == SD2_WIDTH else "sd15"


class EmbeddingLibrary:
    def __init__(self, settings: Settings, facts: FileFactsCache | None = None):
        self.folder = settings.embeddings_dir
        self.allow_external_links = settings.allow_external_links
        self.facts = facts or FileFactsCache(settings.cache_dir / "file_facts.json")
        self._lock = threading.Lock()

    def available(self) -> list[EmbeddingFile]:
        """The embeddings, one per name (a prompt word calls one file: a second file with the same name, in
        another format or subfolder, is skipped with a log line)."""
        found: dict[str, EmbeddingFile] = {}
        for name, path in scan_named_files(self.folder, EMBEDDING_SUFFIXES, self.allow_external_links):
            word = Path(name).name
            if word.lower() in found:
                logger.warning("embedding %s skipped: %s has the same name", path, found[word.lower()].path)
                continue
            found[word.lower()] = EmbeddingFile(word, path, self.facts.get(path, "embedding_family", _family))
        return list(found.values())

    def short_hash(self, embedding: EmbeddingFile) -> str:
        """A1111's `TI hashes` value for it: the first 12 hex digits of the file's sha256."""
        return self.facts.get(embedding.path.resolve(), "sha256", sha256_of_file)[:12]

    def named_in(self, texts: list[str], family: str) -> tuple[list[EmbeddingFile], list[EmbeddingFile]]:
        """The installed embeddings the texts name (as whole words, any case, as A1111 matches them): those
        of `family` and those of another family."""
        wanted = family_of(family).embedding_family
        usable, foreign = [], []
        for embedding in self.available():
            pattern = name_pattern(embedding.name)
            if any(pattern.search(text) for text in texts):
                (usable if embedding.family == wanted else foreign).append(embedding)
        return usable, foreign


def name_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def token_of(embedding: EmbeddingFile) -> str:
    """The token an embedding is loaded as (diffusers adds `<token>_1`, ... for more vectors)."""
    return f"<ti-{embedding.name.lower()}>"


def rewrite_prompt(text: str, usable: list[EmbeddingFile], foreign: list[EmbeddingFile]) -> str:
    """The prompt as the tokenizer must see it: embedding names as their tokens; other families' removed."""
    for embedding in usable:
        text = name_pattern(embedding.name).sub(token_of(embedding), text)
    for embedding in foreign:
        text = name_pattern(embedding.name).sub("", text)
    return text


def load_into(pipe, embeddings: list[EmbeddingFile]) -> tuple[list[tuple], dict[str, str]]:
    """Loads the embeddings into the pipeline's tokenizers and text encoders. Returns what to unload, and the
    embeddings that could not be loaded (unreadable, or vectors of another width than the text encoder's) with
    the reason: their jobs go on without them."""
    loaded: list[tuple] = []
    skipped: dict[str, str] = {}
    for embedding in embeddings:
        try:
            vectors = read_vectors(embedding.path)
            plan = []
            for key, tokenizer_name, encoder_name in (("clip_l", "tokenizer", "text_encoder"),
                                                      ("clip_g", "tokenizer_2", "text_encoder_2")):  # fmt: skip
                tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
                if key not in vectors or tokenizer is None or encoder is None:
                    continue
                tensor = vectors[key].reshape(-1, vectors[key].shape[-1])
                width = encoder.get_input_embeddings().embedding_dim
                if tensor.shape[-1] != width:
                    raise ValueError(f"its vectors are {tensor.shape[-1]} wide; this model's text encoder's {width}")
                plan.append((tensor, tokenizer, encoder))
        except Exception as error:  # a user's file: any failure skips it, with the reason
            skipped[embedding.name] = str(error)[:200]
            continue
        try:
            for tensor, tokenizer, encoder in plan:
                with offload_paused(pipe):
                    pipe.load_textual_inversion(tensor, token=token_of(embedding), tokenizer=tokenizer,
                                                text_encoder=encoder)  # fmt: skip
                loaded.append((token_of(embedding), tokenizer, encoder, len(tensor)))
        except BaseException:  # nothing of this call stays in the model when it fails midway
            unload_from(pipe, loaded)
            raise
    return loaded, skipped


def unload_from(pipe, loaded: list[tuple]) -> None:
    """Removes the loaded tokens and vectors again; each one on its own, so one failure leaves no other behind."""
    for token, tokenizer, encoder, count in loaded:
        tokens = [token] + [f"{token}_{index}" for index in range(1, count)]
        try:
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tokenizer, text_encoder=encoder)
        except Exception:
            logger.exception("unloading embedding token %s failed", token)
