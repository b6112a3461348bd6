"""Tiny random-weight IP-Adapters and their CLIP image encoder, in the real on-disk formats (h94's IP-Adapter
files: `image_proj.*` + `ip_adapter.*`; a transformers CLIPVisionModelWithProjection folder), for the demo
SD1.5 model, and a tiny depth annotator (a transformers Depth Anything folder). Read back only through the real
loaders (diffusers' `load_ip_adapter`, transformers' `from_pretrained`), as the other demo models
(pipelines/demo.py)."""

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.demo import _sd15_unet

logger = logging.getLogger(__name__)

IP_ADAPTER_SD15_FILE = "ip-adapter_demo_sd15.safetensors"  # plain: the image embedding, 4 tokens
IP_ADAPTER_PLUS_SD15_FILE = "ip-adapter-plus_demo_sd15.bin"  # plus: a Resampler over the hidden states (a .bin)
ENCODER_FOLDER = "clip_h"  # what the `ip-adapter_clip_sd15` / `ip-adapter_clip_h` module looks for
# One head: what a single file of this width is read with (pipelines/ipadapters.py), so the two layouts agree.
ENCODER_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                      image_size=32, patch_size=8, projection_dim=24)  # fmt: skip


def demo_image_encoder(seed: int = 41):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER_CONFIG)).eval()


def _cross_attention_widths(unet) -> list[int]:
    """The width of each cross-attention layer, in the order of `unet.attn_processors` (the order an
    IP-Adapter file numbers them: 1, 3, 5, ...)."""
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            widths.append(unet.get_submodule(name.removesuffix(".processor")).to_k.out_features)
    return widths


def _ip_layers(unet, generator: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    cross = unet.config.cross_attention_dim
    state = {}
    for index, width in enumerate(_cross_attention_widths(unet)):
        for name in ("to_k_ip", "to_v_ip"):
            state[f"{1 + 2 * index}.{name}.weight"] = torch.randn(width, cross, generator=generator) * std
    return state


def plain_ip_adapter(unet, image_width: int, seed: int, tokens: int = 4) -> dict[str, dict]:
    """An IP-Adapter in h94's layout for `unet`: a linear projection of the image embedding to `tokens`
    tokens, and key/value projections for each cross-attention layer. Random, and large enough that a
    reference image visibly changes the picture."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(tokens * cross, image_width, generator=generator) * 0.5,
        "proj.bias": torch.zeros(tokens * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": _ip_layers(unet, generator, std=0.5)}


def plus_ip_adapter(unet, hidden_width: int, seed: int, tokens: int = 4, heads: int = 1) -> dict[str, dict]:
    """An "IP-Adapter plus" in h94's layout: a Resampler (learned latents attending to the encoder's hidden
    states: `latents`, `proj_in`, `layers.N.0` attention and `layers.N.1` feed-forward, `proj_out`,
    `norm_out`), with the 4 layers and 64-wide heads diffusers' loader assumes (the file does not say)."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    inner, width, depth = heads * 64, 32, 4

    def linear(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, generator=generator) / columns**0.5

    image_proj = {
        "latents": torch.randn(1, tokens, width, generator=generator) / width**0.5,
        "proj_in.weight": linear(width, hidden_width), "proj_in.bias": torch.zeros(width),
        "proj_out.weight": linear(cross, width), "proj_out.bias": torch.zeros(cross),
        "norm_out.weight": torch.ones(cross), "norm_out.bias": torch.zeros(cross),
    }  # fmt: skip
    for layer in range(depth):
        attention, feed_forward = f"layers.{layer}.0", f"layers.{layer}.1"
        image_proj.update({
            f"{attention}.norm1.weight": torch.ones(width), f"{attention}.norm1.bias": torch.zeros(width),
            f"{attention}.norm2.weight": torch.ones(width), f"{attention}.norm2.bias": torch.zeros(width),
            f"{attention}.to_q.weight": linear(inner, width), f"{attention}.to_kv.weight": linear(2 * inner, width),
            f"{attention}.to_out.weight": linear(width, inner),
            f"{feed_forward}.0.weight": torch.ones(width), f"{feed_forward}.0.bias": torch.zeros(width),
            f"{feed_forward}.1.weight": linear(4 * width, width), f"{feed_forward}.3.weight": linear(width, 4 * width),
        })  # fmt: skip
    return {"image_proj": image_proj, "ip_adapter": _ip_layers(unet, generator, std=0.5)}


def flat_state_dict(state: dict[str, dict]) -> dict[str, torch.Tensor]:
    """h94's `.safetensors` names: `image_proj.<name>` and `ip_adapter.<name>`."""
    return {
        f"{group}.{name}": tensor.contiguous() for group, tensors in state.items() for name, tensor in tensors.items()
    }


def create_demo_ip_adapters(ipadapter_dir: Path, clip_vision_dir: Path, overwrite: bool = False) -> list[Path]:
    """A tiny plain IP-Adapter (`.safetensors`) and a tiny plus one (`.bin`) for the demo SD1.5 model, and the
    tiny CLIP image encoder both read (`clip_vision/clip_h/`)."""
    ipadapter_dir.mkdir(parents=True, exist_ok=True)
    clip_vision_dir.mkdir(parents=True, exist_ok=True)
    written = []
    encoder_target = clip_vision_dir / ENCODER_FOLDER
    if overwrite or not encoder_target.exists():
        shutil.rmtree(encoder_target, ignore_errors=True)
        demo_image_encoder().save_pretrained(encoder_target, safe_serialization=True)
        written.append(encoder_target)
    targets = {IP_ADAPTER_SD15_FILE: "plain", IP_ADAPTER_PLUS_SD15_FILE: "plus"}
    unet = None
    for file_name, kind in targets.items():
        target = ipadapter_dir / file_name
        if target.exists() and not overwrite:
            continue
        unet = unet or _sd15_unet(15)
        if kind == "plain":
            save_file(flat_state_dict(plain_ip_adapter(unet, ENCODER_CONFIG["projection_dim"], seed=51)), target)
        else:
            torch.save(plus_ip_adapter(unet, ENCODER_CONFIG["hidden_size"], seed=52), target)
        written.append(target)
    for path in written:
        logger.info("wrote %s", path)
    return written


DEPTH_FOLDER = "depth_anything"  # the module `depth_anything` reads annotators/depth_anything/


def demo_depth_model(seed: int = 61):
    """A tiny Depth Anything (a DINOv2 backbone, DPT neck and head) with random weights, and its image
    processor set as Depth Anything's (keep the aspect ratio, multiples of 14, ImageNet normalisation) at 56 px
    instead of 518."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor

    backbone = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                "mlp_ratio": 2, "patch_size": 14, "image_size": 56, "out_indices": [1, 2, 3, 4],
                "reshape_hidden_states": False, "apply_layernorm": True}  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)  # fmt: skip
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  resample=3, **imagenet)  # fmt: skip
    return model, processor


def create_demo_annotators(annotators_dir: Path, overwrite: bool = False) -> list[Path]:
    """A tiny random-weight Depth Anything for the `depth_anything` module, as a transformers folder."""
    target = annotators_dir / DEPTH_FOLDER
    if target.exists() and not overwrite:
        return []
    shutil.rmtree(target, ignore_errors=True)
    model, processor = demo_depth_model()
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    logger.info("wrote %s", target)
    return [target]
