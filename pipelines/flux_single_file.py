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
from pipelines.errors import ModelLoadError
from pipelines.flux_layout import bfl_to_diffusers

CONFIG_FILES = (
    "model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
    "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer", "tokenizer_2",
)  # fmt: skip


def load_transformer(path: Path, configs: Path, dtype: torch.dtype):
    """The transformer of a BFL-layout file through diffusers' own single-file loader, given the tensors already
    in its names (pipelines/flux_layout.py). A `.gguf` file stays quantized as it is (Q8_0, Q4_0, ...) through
    diffusers' GGUF support: its layers dequantize on the fly, in `dtype`."""
    import diffusers
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    quantized = path.suffix.lower() == ".gguf"
    if quantized:  # diffusers' own reader, called directly: its file-type check is case-sensitive (".GGUF")
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        tensors = load_gguf_checkpoint(str(path))
    else:
        tensors = load_single_file_checkpoint(str(path), local_files_only=True)
    parts.refuse_scaled_fp8(tensors, path.name)
    converted = bfl_to_diffusers(tensors)
    config = diffusers.FluxTransformer2DModel.load_config(configs / "transformer")
    with torch.device("meta"):
        expected = set(diffusers.FluxTransformer2DModel.from_config(config).state_dict())
    if set(converted) != expected:  # another variant than the configs describe (schnell vs dev, other depth)
        extra, missing = sorted(set(converted) - expected), sorted(expected - set(converted))
        problems = ([f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(extra)} not in the configs (e.g. {extra[0]})"] if extra else [])  # fmt: skip
        raise ModelLoadError(f"{path.name} does not match its configs in {configs}/transformer: "
                             f"{', '.join(problems)}; the configs must be those of the same FLUX.1 variant (dev or "
                             "schnell)", field="model")  # fmt: skip
    options = {"quantization_config": diffusers.GGUFQuantizationConfig(compute_dtype=dtype)} if quantized else {}
    return diffusers.FluxTransformer2DModel.from_single_file(
        converted, config=str(configs), subfolder="transformer", torch_dtype=dtype, local_files_only=True, **options,
    ).eval()  # fmt: skip


def load_flux_single_file(entry: ModelEntry, dtype: torch.dtype):
    import diffusers
    import transformers

    configs = entry.config_dir
    if configs is None:
        raise ModelLoadError(
            f"could not load model '{entry.name}': a FLUX.1 single file needs its diffusers configs and tokenizers "
            f"in {entry.path.parent / '.configs' / entry.name}/ (a FLUX.1 diffusers folder without its weights)",
            field="model",
        )
    if absent := parts.missing_configs(configs, CONFIG_FILES):
        raise ModelLoadError(f"could not load model '{entry.name}': {configs}/ lacks {', '.join(absent)} (a FLUX.1 "
                             "diffusers folder's configs and tokenizers, without weights)", field="model")  # fmt: skip
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
