"""A FLUX.1 single-file transformer (Black Forest Labs' `flux1-dev.safetensors`) with its separate modules (the
VAE and the two text encoders, pipelines/modules.py) as a diffusers FluxPipeline.

The configs and tokenizers come from the model's `.configs/<name>/` folder (a diffusers FLUX.1 folder without
weights), as for SD single files offline: the module files hold weights only. The transformer goes through
diffusers' single-file loader (GGUF files through its GGUF support); the modules through
pipelines/single_file_parts.py.
"""

from pathlib import Path

import torch

from pipelines import single_file_parts as parts
from pipelines.catalog import ModelEntry
from pipelines.flux_layout import bfl_to_diffusers

CONFIG_FILES = (
    "model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
    "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer", "tokenizer_2",
)  # fmt: skip


def load_transformer(path: Path, configs: Path, dtype: torch.dtype):
    """The transformer of a BFL-layout file (or GGUF), its tensors put in diffusers' names by
    pipelines/flux_layout.py."""
    import diffusers

    tensors, quantized = parts.read_checkpoint(path)
    return parts.transformer(diffusers.FluxTransformer2DModel, bfl_to_diffusers(tensors), configs, quantized, dtype,
                             path.name, "FLUX.1 variant (dev or schnell)")  # fmt: skip


def load_flux_single_file(entry: ModelEntry, dtype: torch.dtype):
    import diffusers
    import transformers

    configs = parts.configs_of(entry, "FLUX.1", CONFIG_FILES)
    vae_file, clip_file, t5_file = entry.modules
    transformer = load_transformer(entry.path, configs, dtype)
    vae = parts.vae(configs, parts.read_module(vae_file), vae_file.name)
    clip = parts.clip(configs, "text_encoder", parts.read_module(clip_file), clip_file.name)
    t5 = parts.t5(configs, "text_encoder_2", parts.read_module(t5_file), t5_file.name)
    tokenizers = [transformers.AutoTokenizer.from_pretrained(configs / name, local_files_only=True)
                  for name in ("tokenizer", "tokenizer_2")]  # fmt: skip
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        vae=vae, text_encoder=clip, tokenizer=tokenizers[0], text_encoder_2=t5, tokenizer_2=tokenizers[1],
        transformer=transformer, image_encoder=None, feature_extractor=None,
    )  # fmt: skip
    parts.to_dtype((vae, clip, t5), dtype)  # the transformer is in `dtype` already (a quantized one cannot be cast)
    return pipe
