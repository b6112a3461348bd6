"""FLUX.1's transformer in Black Forest Labs' key layout (`flux1-dev.safetensors`, `double_blocks.N.img_attn.qkv`)
and in diffusers' (`transformer_blocks.N.attn.to_q`), both ways.

diffusers has the BFL -> diffusers converter, but it takes the transformer's width as FLUX.1's 3072 rather than
from the file, so it cannot read a file of another width (the demo's tiny one); this one reads every width from
the tensors, and is checked against diffusers' on a full-size state dict (tests/unit/test_flux_single_file.py).
The other way round writes the demo's single file.
"""

import torch

from pipelines.families.flux import BFL_PREFIX

# BFL module -> diffusers module (their `.weight` and `.bias`), per double block, per single block, and at the top.
DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}  # fmt: skip
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}  # fmt: skip
SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # `linear1`: q, k, v and the MLP's input
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",  # dev only: schnell has no guidance
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out",
}  # fmt: skip
FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # BFL: shift, scale; diffusers: scale, shift


def _blocks(keys, prefix: str) -> int:
    found = {int(key.split(".")[1]) for key in keys if key.startswith(prefix)}
    return max(found) + 1 if found else 0


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX.1 transformer state dict in diffusers' names (FluxTransformer2DModel's)."""
    state = {key.removeprefix(BFL_PREFIX): tensor for key, tensor in state.items()}
    width = state["img_in.weight"].shape[0]  # the transformer's inner width: 3072 in FLUX.1
    out: dict[str, torch.Tensor] = {}

    def copy(source: str, target: str) -> None:
        for suffix in (".weight", ".bias"):
            if source + suffix in state:
                out[target + suffix] = state[source + suffix]

    for source, target in TOP.items():
        copy(source, target)
    for suffix in (".weight", ".bias"):
        out[FINAL_MODULATION[1] + suffix] = _swap_halves(state[FINAL_MODULATION[0] + suffix])
    for index in range(_blocks(state, "double_blocks.")):
        bfl, ours = f"double_blocks.{index}.", f"transformer_blocks.{index}."
        for source, target in DOUBLE.items():
            copy(bfl + source, ours + target)
        for source, targets in DOUBLE_FUSED.items():
            for suffix in (".weight", ".bias"):
                for target, part in zip(targets, state[bfl + source + suffix].chunk(3, dim=0), strict=True):
                    out[ours + target + suffix] = part
        for source, target in DOUBLE_NORMS.items():
            out[ours + target] = state[bfl + source]
    for index in range(_blocks(state, "single_blocks.")):
        bfl, ours = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
        for source, target in SINGLE.items():
            copy(bfl + source, ours + target)
        for suffix in (".weight", ".bias"):
            fused = state[bfl + "linear1" + suffix]
            sizes = (width, width, width, fused.shape[0] - 3 * width)
            for target, part in zip(SINGLE_FUSED, torch.split(fused, sizes, dim=0), strict=True):
                out[ours + target + suffix] = part
        for source, target in SINGLE_NORMS.items():
            out[ours + target] = state[bfl + source]
    return out


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in Black Forest Labs' layout, as `flux1-dev.safetensors` ships it."""
    out: dict[str, torch.Tensor] = {}

    def copy(source: str, target: str) -> None:
        for suffix in (".weight", ".bias"):
            if source + suffix in state:
                out[target + suffix] = state[source + suffix].contiguous()

    for target, source in TOP.items():
        copy(source, target)
    for suffix in (".weight", ".bias"):
        out[FINAL_MODULATION[0] + suffix] = _swap_halves(state[FINAL_MODULATION[1] + suffix]).contiguous()
    for index in range(_blocks(state, "transformer_blocks.")):
        bfl, ours = f"double_blocks.{index}.", f"transformer_blocks.{index}."
        for target, source in DOUBLE.items():
            copy(ours + source, bfl + target)
        for target, sources in DOUBLE_FUSED.items():
            for suffix in (".weight", ".bias"):
                out[bfl + target + suffix] = torch.cat([state[ours + name + suffix] for name in sources]).contiguous()
        for target, source in DOUBLE_NORMS.items():
            out[bfl + target] = state[ours + source].contiguous()
    for index in range(_blocks(state, "single_transformer_blocks.")):
        bfl, ours = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
        for target, source in SINGLE.items():
            copy(ours + source, bfl + target)
        for suffix in (".weight", ".bias"):
            out[bfl + "linear1" + suffix] = torch.cat([state[ours + name + suffix] for name in SINGLE_FUSED])
        for target, source in SINGLE_NORMS.items():
            out[bfl + target] = state[ours + source].contiguous()
    return out
