"""Rename diffusers state-dict keys to the original (CompVis / A1111) single-file layout.

The demo writes an SD1.5 single-file checkpoint this way, so that diffusers' own single-file loader
(`from_single_file`) is what reads it back. Only the SD1.5 layout is needed: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE) and `cond_stage_model.transformer.text_model.*` (CLIP text encoder).
"""

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int, up_block_has_attention: list[bool]) -> str:
    """One UNet2DConditionModel key -> its `model.diffusion_model.` name."""
    per_block = layers_per_block + 1
    top = _rename_first(key, _UNET_TOP_LEVEL)
    if top != key:
        return top
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer + 1
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_first(rest, _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_first(rest, _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if up_block_has_attention[block] else 1
        return f"output_blocks.{block * per_block + layers_per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"no original-layout name for UNet key {key!r}")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """One AutoencoderKL key -> its `first_stage_model.` name (without the prefix)."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{block}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_first(m[2], _VAE_ATTENTION)}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL as an original-layout VAE state dict (A1111's VAE files, without prefix)."""
    num_up = len(vae.config.up_block_types)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in vae.state_dict().items():
        new_key = vae_key_to_ldm(key, num_up)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        state[new_key] = tensor.contiguous()
    return state


def sd15_single_file_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The whole SD1.5 pipeline as one original-layout state dict."""
    up_has_attention = [hasattr(block, "attentions") for block in unet.up_blocks]
    layers = unet.config.layers_per_block
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        state[UNET_PREFIX + unet_key_to_ldm(key, layers, up_has_attention)] = tensor
    for key, tensor in vae_ldm_state_dict(vae).items():
        state[VAE_PREFIX + key] = tensor
    for key, tensor in text_encoder.state_dict().items():
        state[CLIP_PREFIX + key.removeprefix("text_model.")] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


CONTROLNET_PREFIX = "control_model."


def controlnet_key_to_ldm(key: str, layers_per_block: int) -> str:
    """One ControlNetModel key -> its name in A1111's ControlNet files (without `control_model.`): the UNet
    encoder's names, plus the hint encoder (`input_hint_block`, convolutions at 0, 2, ..., 14) and the zero
    convolutions (`zero_convs.N.0`, `middle_block_out.0`)."""
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(.+)", key):
        return f"input_hint_block.0.{m[1]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", key):
        return f"input_hint_block.14.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_mid_block\.(.+)", key):
        return f"middle_block_out.0.{m[1]}"
    return unet_key_to_ldm(key, layers_per_block, [])


def controlnet_ldm_state_dict(controlnet) -> dict[str, torch.Tensor]:
    """An SD1.5 diffusers ControlNetModel as A1111's single-file layout (`control_model.*`)."""
    layers = controlnet.config.layers_per_block
    return {CONTROLNET_PREFIX + controlnet_key_to_ldm(key, layers): tensor.contiguous()
            for key, tensor in controlnet.state_dict().items()}  # fmt: skip
