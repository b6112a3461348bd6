"""An SD 3 / 3.5 transformer from diffusers' names (`transformer_blocks.N.attn.to_q`) into Stability's single-file
layout (`joint_blocks.N.x_block.attn.qkv`), for the demo's `sd3.5_large.safetensors`-shaped file.

Reading such files is diffusers' own converter's job (`convert_sd3_transformer_checkpoint_to_diffusers`, which
reads every width from the tensors); this is its inverse, checked against it in tests/unit/test_sd3_single_file.py
with QK norm and dual attention (SD 3.5 Medium's MMDiT-X) layers.
"""

import torch

# diffusers module -> Stability module (their `.weight` and `.bias`), at the top and per joint block.
TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}  # fmt: skip
BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}  # fmt: skip
BLOCK_FUSED = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv",
}  # fmt: skip
BLOCK_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}  # fmt: skip


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Stability's final modulations are (shift, scale); diffusers' (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_sai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in Stability's names (without the `model.diffusion_model.` prefix)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}

    def copy(source: str, target: str, change=lambda tensor: tensor) -> None:
        for suffix in (".weight", ".bias"):
            if source + suffix in state:
                out[target + suffix] = change(state[source + suffix]).contiguous()

    for source, target in TOP.items():
        copy(source, target)
    copy("norm_out.linear", "final_layer.adaLN_modulation.1", _swap_halves)
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")}
    last = max(blocks)
    for index in sorted(blocks):
        source, target = f"transformer_blocks.{index}.", f"joint_blocks.{index}."
        for name, stability in BLOCK.items():
            copy(source + name, target + stability)
        # The last block's context branch is pre-only (no output): its modulation is (shift, scale) there too.
        copy(source + "norm1_context.linear", target + "context_block.adaLN_modulation.1",
             _swap_halves if index == last else (lambda tensor: tensor))  # fmt: skip
        for names, stability in BLOCK_FUSED.items():
            for suffix in (".weight", ".bias"):
                if source + names[0] + suffix in state:
                    fused = torch.cat([state[source + name + suffix] for name in names], dim=0)
                    out[target + stability + suffix] = fused
        for name, stability in BLOCK_NORMS.items():
            if source + name + ".weight" in state:
                out[target + stability + ".weight"] = state[source + name + ".weight"]
    return out
