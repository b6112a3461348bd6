"""The parts of a transformer model's single file, built from their weights: the VAE and the text encoders, read
from separate module files (pipelines/modules.py) or from the checkpoint itself, with the configs of the model's
`.configs/<name>/` folder (FLUX.1's and SD 3.5's single-file loaders share them).

The parts are built on the meta device and their weights assigned from the files, so no network is initialised
for nothing or held twice in memory.
"""

from pathlib import Path

import torch

from pipelines.errors import ModelLoadError
from pipelines.state_dicts import read_state_dict


def refuse_scaled_fp8(state: dict, source: str) -> None:
    """ComfyUI's "scaled fp8" files keep a scale per weight that plain loading would drop (wrong images, no
    error): refused, naming the file."""
    if "scaled_fp8" in state or any(key.endswith(".scale_weight") for key in state):
        raise ModelLoadError(f"{source} is a 'scaled fp8' file, which this service does not read; use the fp16 "
                             "or plain fp8 (e4m3fn) file", field="model")  # fmt: skip


def read_module(path: Path) -> dict[str, torch.Tensor]:
    """A module file's tensors (not a scaled-fp8 one)."""
    state = read_state_dict(path)
    refuse_scaled_fp8(state, path.name)
    return state


def assigned(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """`model` (on the meta device) with `state`'s tensors; tied weights (T5's embeddings) are tied again."""
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if still_meta or unexpected:
        problem = f"missing {still_meta[0]}" if still_meta else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"{what}: its weights do not fit the model's config ({problem})", field="model")
    return model.eval()


def text_encoder_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's tensors under the model's own names: CLIP files come with and without `text_model.`
    (transformers 5 dropped that level in CLIPTextModel) and some hold OpenCLIP's bare, transposed
    `text_projection`; T5 files hold the embeddings as `shared.weight` or only as `encoder.embed_tokens.weight`."""
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state = {**state, "shared.weight": state["encoder.embed_tokens.weight"]}
    if "text_projection" in state and "text_projection.weight" not in state:
        state = {**state, "text_projection.weight": state["text_projection"].T.contiguous()}
    names = set(model.state_dict())
    fitted = {}
    for key, tensor in state.items():
        for candidate in (key, key.removeprefix("text_model."), f"text_model.{key}"):
            if candidate in names:
                fitted[candidate] = tensor
                break
    return fitted


def vae(configs: Path, ldm_state: dict[str, torch.Tensor], what: str):
    """The VAE of `configs/vae` with weights in the original (`ae.safetensors`, `first_stage_model.`) or
    diffusers layout."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        model = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(configs / "vae"))
    state = ldm_state if "decoder.up_blocks.0.resnets.0.conv1.weight" in ldm_state else (
        convert_ldm_vae_checkpoint(ldm_state, dict(model.config)))  # fmt: skip
    return assigned(model, state, what)


def clip(configs: Path, subfolder: str, state: dict[str, torch.Tensor], what: str, with_projection: bool = False,
         identity_projection: bool = False):  # fmt: skip
    """A CLIP text encoder of `configs/<subfolder>` with `state`'s weights (`with_projection`: with its pooled
    output's projection, as SD 3 takes CLIP-G's; `identity_projection`: with an identity there, as SD 3 takes
    CLIP-L's pooled output unprojected, which is why `clip_l.safetensors` holds no projection)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(configs / subfolder, local_files_only=True)
    model_class = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    with torch.device("meta"):
        model = model_class(config)
    fitted = text_encoder_state(state, model)
    if identity_projection:
        fitted["text_projection.weight"] = torch.eye(config.hidden_size)  # cast with the rest
    model = assigned(model, fitted, what)
    # Its position ids are a buffer no file holds (not saved): made again where the meta device left none.
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    if embeddings.position_ids.is_meta:
        positions = torch.arange(config.max_position_embeddings).expand((1, -1))
        embeddings.register_buffer("position_ids", positions, persistent=False)
    return model


def t5(configs: Path, subfolder: str, state: dict[str, torch.Tensor], what: str):
    """A T5 encoder of `configs/<subfolder>` with `state`'s weights."""
    import transformers

    with torch.device("meta"):
        model = transformers.T5EncoderModel(
            transformers.AutoConfig.from_pretrained(configs / subfolder, local_files_only=True)
        )
    return assigned(model, text_encoder_state(state, model), what)


def to_dtype(modules, dtype: torch.dtype) -> None:
    """The parts in `dtype`; a T5's feed-forward output overflows in fp16, so those layers stay in fp32, as
    `from_pretrained` keeps them."""
    for module in modules:
        module.to(dtype=dtype)
        keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
        if dtype == torch.float16 and keep:
            for name, layer in module.named_modules():
                if name.endswith(keep):
                    layer.to(dtype=torch.float32)


def missing_configs(configs: Path, names) -> list[str]:
    return [name for name in names if not (configs / name).exists()]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A single file's tensors (not a scaled-fp8 one), and whether they are GGUF-quantized: a `.gguf` file stays
    quantized as it is (Q8_0, Q4_0, ...) through diffusers' GGUF support, its layers dequantizing on the fly."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    quantized = path.suffix.lower() == ".gguf"
    if quantized:  # diffusers' own reader, called directly: its file-type check is case-sensitive (".GGUF")
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        tensors = load_gguf_checkpoint(str(path))
    else:
        tensors = load_single_file_checkpoint(str(path), local_files_only=True)
    refuse_scaled_fp8(tensors, path.name)
    return tensors, quantized


def configs_of(entry, family_label: str, files) -> Path:
    """The single file's `.configs/<name>/` folder (its model's diffusers folder without weights: configs and
    tokenizers), with `files` in it; a load error naming what is missing."""
    configs = entry.config_dir
    if configs is None:
        raise ModelLoadError(
            f"could not load model '{entry.name}': this {family_label} single file needs its diffusers configs and "
            f"tokenizers in {entry.path.parent / '.configs' / entry.name}/ (the model's diffusers folder without "
            "its weights)", field="model",
        )  # fmt: skip
    if absent := missing_configs(configs, files):
        raise ModelLoadError(f"could not load model '{entry.name}': {configs}/ lacks {', '.join(absent)} (the "
                             f"{family_label} diffusers folder's configs and tokenizers, without weights)",
                             field="model")  # fmt: skip
    return configs


def transformer(model_class, converted: dict[str, torch.Tensor], configs: Path, quantized: bool,
                dtype: torch.dtype, what: str, variants: str):  # fmt: skip
    """The transformer of `configs/transformer` from its tensors in diffusers' names, through diffusers' own
    single-file loader; tensors of another variant than the configs describe are a load error naming the
    difference (`variants`: the family's, for the message)."""
    import diffusers

    with torch.device("meta"):
        expected = set(model_class.from_config(model_class.load_config(configs / "transformer")).state_dict())
    if set(converted) != expected:
        extra, missing = sorted(set(converted) - expected), sorted(expected - set(converted))
        problems = ([f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(extra)} not in the configs (e.g. {extra[0]})"] if extra else [])  # fmt: skip
        raise ModelLoadError(f"{what} does not match its configs in {configs}/transformer: {', '.join(problems)}; "
                             f"the configs must be those of the same {variants}", field="model")  # fmt: skip
    options = {"quantization_config": diffusers.GGUFQuantizationConfig(compute_dtype=dtype)} if quantized else {}
    return model_class.from_single_file(
        converted, config=str(configs), subfolder="transformer", torch_dtype=dtype, local_files_only=True, **options,
    ).eval()  # fmt: skip
