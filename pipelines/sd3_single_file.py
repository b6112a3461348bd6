"""An SD 3 / 3.5 single file (Stability's `sd3.5_large.safetensors`: the MMDiT transformer and the VAE, in
Stability's key layout) as a diffusers StableDiffusion3Pipeline, with the text encoders it lacks from module files
(CLIP-L, CLIP-G and, optional as in diffusers, T5-XXL: pipelines/modules.py). CLIP-L's pooled output goes in
unprojected, as in Stability's reference code and diffusers' single-file loader (`clip_l.safetensors` holds no
projection).

Files that carry their text encoders (`sd3_medium_incl_clips_t5xxlfp8.safetensors`, under `text_encoders.`) use
their own; a transformer alone (a GGUF file) takes its VAE from a module file too. The configs and tokenizers come
from the model's `.configs/<name>/` folder (a diffusers SD 3.5 folder without weights). The transformer's layout is
converted by diffusers' own converter, which reads every width from the tensors (a file of the wrong variant for
its configs is a clear error, not a crash later).
"""

import torch

from pipelines import single_file_parts as parts
from pipelines import tensor_shapes
from pipelines.catalog import ModelEntry
from pipelines.errors import ModelLoadError
from pipelines.families.sd3 import SAI_PARTS, SAI_PREFIX
from pipelines.modules import kind_of_file

CONFIG_FILES = (
    "model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
    "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer", "tokenizer_2",
)  # fmt: skip
T5_CONFIG_FILES = ("text_encoder_3/config.json", "tokenizer_3")


def _part(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A part the file carries, under its own names (`text_encoders.clip_l.transformer.` stripped); the VAE keeps
    `first_stage_model.`, which diffusers' VAE converter reads."""
    prefix = SAI_PARTS[kind]
    if kind == "vae":
        return {key: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    prefix += "transformer."
    return {key.removeprefix(prefix): tensor for key, tensor in tensors.items() if key.startswith(prefix)}


def load_transformer(entry: ModelEntry, own: dict[str, torch.Tensor], quantized: bool, dtype: torch.dtype):
    """The transformer from its tensors in Stability's names (without the prefix; the converter pops them)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(own)
    except KeyError as error:  # the converter reads the tensors every SD 3 transformer has
        raise ModelLoadError(f"{entry.path.name} is not a whole SD 3 / 3.5 transformer: it lacks {error}",
                             field="model") from error  # fmt: skip
    return parts.transformer(diffusers.SD3Transformer2DModel, converted, entry.config_dir, quantized, dtype,
                             entry.path.name, "SD 3 / 3.5 variant (Medium, Large or Large Turbo)")  # fmt: skip


def load_sd3_single_file(entry: ModelEntry, dtype: torch.dtype):
    import diffusers
    import transformers

    modules = {kind_of_file(path): path for path in entry.modules}
    keys = tensor_shapes.read(entry.path) or {}  # the header: the configs are checked before 16 GB are read
    carried_kinds = [kind for kind, prefix in SAI_PARTS.items()
                     if kind not in modules and any(key.startswith(prefix) for key in keys)]  # fmt: skip
    with_t5 = "t5" in modules or "t5" in carried_kinds
    configs = parts.configs_of(entry, "SD 3.5", CONFIG_FILES + (T5_CONFIG_FILES if with_t5 else ()))
    tensors, quantized = parts.read_checkpoint(entry.path)
    carried = {kind: _part(tensors, kind) for kind in carried_kinds}
    own = {key.removeprefix(SAI_PREFIX): tensor for key, tensor in tensors.items()
           if not key.startswith(tuple(SAI_PARTS.values()))}  # fmt: skip
    del tensors  # parts a module file replaces are not kept

    def weights(kind: str) -> tuple[dict[str, torch.Tensor], str]:
        """A part's weights: from its module file, else from the file that carries it."""
        if kind in modules:
            return parts.read_module(modules[kind]), modules[kind].name
        return carried.pop(kind), f"{entry.path.name} ({SAI_PARTS[kind]})"

    transformer = load_transformer(entry, own, quantized, dtype)
    vae = parts.vae(configs, *weights("vae"))
    clip_l = parts.clip(configs, "text_encoder", *weights("clip"), with_projection=True, identity_projection=True)
    clip_g = parts.clip(configs, "text_encoder_2", *weights("clip_g"), with_projection=True)
    t5 = parts.t5(configs, "text_encoder_3", *weights("t5")) if with_t5 else None
    tokenizers = [transformers.AutoTokenizer.from_pretrained(configs / name, local_files_only=True)
                  for name in ("tokenizer", "tokenizer_2", "tokenizer_3")[: 3 if with_t5 else 2]]  # fmt: skip
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        vae=vae, text_encoder=clip_l, tokenizer=tokenizers[0], text_encoder_2=clip_g, tokenizer_2=tokenizers[1],
        text_encoder_3=t5, tokenizer_3=tokenizers[2] if with_t5 else None, transformer=transformer,
    )  # fmt: skip
    parts.to_dtype([module for module in (vae, clip_l, clip_g, t5) if module is not None], dtype)
    return pipe
