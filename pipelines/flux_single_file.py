"""A FLUX.1 single-file transformer (Black Forest Labs' `flux1-dev.safetensors`) with its separate modules (the
VAE and the two text encoders, pipelines/modules.py) as a diffusers FluxPipeline.

The configs and tokenizers come from the model's `.configs/<name>/` folder (a diffusers FLUX.1 folder without
weights), as for SD single files offline: the module files hold weights only. The transformer goes through
diffusers' single-file loader (GGUF files through its GGUF support); the modules are built on the meta device and
their weights assigned from the files, so no network is held twice in memory.
"""

from pathlib import Path

import torch

from pipelines.catalog import ModelEntry
from pipelines.errors import ModelLoadError
from pipelines.flux_layout import bfl_to_diffusers
from pipelines.state_dicts import read_state_dict


def _assigned(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """`model` (on the meta device) with `state`'s tensors; tied weights (T5's embeddings) are tied again."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if still_meta or unexpected:
        problem = f"missing {still_meta[0]}" if still_meta else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"{what}: its weights do not fit the model's config ({problem})", field="model")
    return model.eval()


CONFIG_FILES = (
    "model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
    "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer", "tokenizer_2",
)  # fmt: skip


def _refuse_scaled_fp8(state: dict, path: Path) -> None:
    """ComfyUI's "scaled fp8" files keep a scale per weight that plain loading would drop (wrong images, no
    error): refused, naming the file."""
    if "scaled_fp8" in state or any(key.endswith(".scale_weight") for key in state):
        raise ModelLoadError(f"{path.name} is a 'scaled fp8' file, which this service does not read; use the fp16 "
                             "or plain fp8 (e4m3fn) file", field="model")  # fmt: skip


def _text_encoder_state(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder file's tensors under the model's own names: CLIP files come with and without
    `text_model.` (transformers 5 dropped that level); T5 files hold the embeddings as `shared.weight` or only as
    `encoder.embed_tokens.weight`."""
    state = read_state_dict(path)
    _refuse_scaled_fp8(state, path)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    names = set(model.state_dict())
    fitted = {}
    for key, tensor in state.items():
        for candidate in (key, key.removeprefix("text_model."), f"text_model.{key}"):
            if candidate in names:
                fitted[candidate] = tensor
                break
    return fitted


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
    _refuse_scaled_fp8(tensors, path)
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
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    configs = entry.config_dir
    if configs is None:
        raise ModelLoadError(
            f"could not load model '{entry.name}': a FLUX.1 single file needs its diffusers configs and tokenizers "
            f"in {entry.path.parent / '.configs' / entry.name}/ (a FLUX.1 diffusers folder without its weights)",
            field="model",
        )
    if absent := [name for name in CONFIG_FILES if not (configs / name).exists()]:
        raise ModelLoadError(f"could not load model '{entry.name}': {configs}/ lacks {', '.join(absent)} (a FLUX.1 "
                             "diffusers folder's configs and tokenizers, without weights)", field="model")  # fmt: skip
    vae_file, clip_file, t5_file = entry.modules
    transformer = load_transformer(entry.path, configs, dtype)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(configs / "vae"))
        t5 = transformers.T5EncoderModel(
            transformers.AutoConfig.from_pretrained(configs / "text_encoder_2", local_files_only=True)
        )
    # CLIP-L (123 M parameters) is built for real: its position ids are a buffer no file holds.
    clip = transformers.CLIPTextModel(
        transformers.AutoConfig.from_pretrained(configs / "text_encoder", local_files_only=True)
    )
    ldm_vae = read_state_dict(vae_file)
    _refuse_scaled_fp8(ldm_vae, vae_file)
    vae_state = ldm_vae if "decoder.up_blocks.0.resnets.0.conv1.weight" in ldm_vae else (
        convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config)))  # fmt: skip
    vae = _assigned(vae, vae_state, vae_file.name)
    clip_state = _text_encoder_state(clip_file, clip)
    clip.load_state_dict(clip_state, strict=False)
    if missing := sorted(set(clip.state_dict()) - set(clip_state) - {"embeddings.position_ids"}):
        raise ModelLoadError(f"{clip_file.name}: its weights do not fit the model's config (missing {missing[0]})",
                             field="model")  # fmt: skip
    clip.eval()
    t5 = _assigned(t5, _text_encoder_state(t5_file, t5), t5_file.name)
    tokenizers = [transformers.AutoTokenizer.from_pretrained(configs / name, local_files_only=True)
                  for name in ("tokenizer", "tokenizer_2")]  # fmt: skip
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        vae=vae, text_encoder=clip, tokenizer=tokenizers[0], text_encoder_2=t5, tokenizer_2=tokenizers[1],
        transformer=transformer, image_encoder=None, feature_extractor=None,
    )  # fmt: skip
    for module in (vae, clip, t5):  # the transformer is in `dtype` already (and a quantized one cannot be cast)
        module.to(dtype=dtype)
    if dtype == torch.float16:  # T5's feed-forward output overflows in fp16: kept in fp32, as from_pretrained does
        for name, module in t5.named_modules():
            if name.endswith(tuple(t5._keep_in_fp32_modules or ())):
                module.to(dtype=torch.float32)
    return pipe
