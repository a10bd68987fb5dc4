"""Our U-Net (CompVis latent-diffusion's ``openaimodel.UNetModel`` layout) <-> diffusers' UNet2DConditionModel:
config and state-dict converters, with the renaming machinery of convert.py (see its docstring for the layouts
and what is refused). Pure torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_modules.interop.convert import (
    Entry,
    UnsupportedByDiffusers,
    _convert,
    _refuse_config,
    _single_group_count,
)
from lightning_modules.nets.unet import UNet

__all__ = ["unet_config", "unet_from_diffusers", "unet_hparams_from_config", "unet_to_diffusers"]

def _check_unet(hp: Mapping[str, Any]) -> None:
    if int(hp["channel_mult"][0]) != 1:
        raise UnsupportedByDiffusers(
            f"unet channel_mult={list(hp['channel_mult'])}: diffusers' UNet2DConditionModel has no stem narrower "
            "than its first level (its conv_in outputs block_out_channels[0]); use channel_mult starting with 1"
        )
    if hp.get("resblock_updown"):
        raise UnsupportedByDiffusers(
            "unet resblock_updown=true (ADM's resampling ResBlocks): UNet2DConditionModel's cross-attention "
            "blocks resample with convolutions only; train with resblock_updown=false to export"
        )
    if hp.get("context_dim") is None:
        raise UnsupportedByDiffusers(
            "unet context_dim=None (no cross-attention): UNet2DConditionModel needs a cross_attention_dim"
        )


def _attention_levels(hp: Mapping[str, Any]) -> list[bool]:
    return [2**i in [int(r) for r in hp["attention_resolutions"]] for i in range(len(hp["channel_mult"]))]


def unet_config(unet: UNet, *, sample_size: int) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` constructor arguments for our U-Net (the config.json of ``unet/``).

    diffusers' ``attention_head_dim`` holds the number of heads per level (its historical naming).
    """
    hp = unet.hparams()
    _check_unet(hp)
    widths = [int(hp["model_channels"]) * int(m) for m in hp["channel_mult"]]
    attn = _attention_levels(hp)
    head_channels = int(hp["num_head_channels"])
    return {
        "sample_size": int(sample_size),
        "in_channels": int(hp["in_channels"]),
        "out_channels": int(hp["out_channels"]),
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # cos first, as our timestep_embedding
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "only_cross_attention": False,
        "block_out_channels": widths,
        "layers_per_block": int(hp["num_res_blocks"]),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": float(hp.get("dropout", 0.0)),
        "act_fn": "silu",
        "norm_num_groups": _single_group_count(
            unet,
            "unet",
            "Choose widths (model.unet.model_channels / channel_mult) whose every layer gets the same count, "
            "e.g. all multiples of 64 (32 groups each)",
        ),
        "norm_eps": 1e-5,
        "cross_attention_dim": int(hp["context_dim"]),
        "transformer_layers_per_block": int(hp.get("transformer_depth", 1)),
        "attention_head_dim": [max(w // head_channels, 1) for w in widths],
        "use_linear_projection": False,
        "upcast_attention": False,
        "resnet_time_scale_shift": "scale_shift" if hp.get("use_scale_shift_norm", True) else "default",
        "class_embed_type": None,
        "addition_embed_type": None,
        "time_embedding_type": "positional",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
    }


def unet_hparams_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet arguments (dropout and checkpointing left out) for a diffusers UNet2DConditionModel config;
    refuses what ours cannot build, naming the key."""
    checks = {
        "center_input_sample": lambda v: not v,
        "flip_sin_to_cos": lambda v: bool(v),
        "freq_shift": lambda v: v == 0,
        "mid_block_type": lambda v: v == "UNetMidBlock2DCrossAttn",
        "only_cross_attention": lambda v: not v if isinstance(v, bool) else not any(v),
        "downsample_padding": lambda v: v == 1,
        "mid_block_scale_factor": lambda v: v == 1,
        "act_fn": lambda v: v == "silu",
        "norm_eps": lambda v: abs(float(v) - 1e-5) < 1e-12,
        "use_linear_projection": lambda v: not v,
        "upcast_attention": lambda v: not v,
        "class_embed_type": lambda v: v is None,
        "addition_embed_type": lambda v: v is None,
        "num_class_embeds": lambda v: v is None,
        "encoder_hid_dim": lambda v: v is None,
        "time_embedding_type": lambda v: v == "positional",
        "time_embedding_dim": lambda v: v is None,
        "time_cond_proj_dim": lambda v: v is None,
        "timestep_post_act": lambda v: v is None,
        "conv_in_kernel": lambda v: v == 3,
        "conv_out_kernel": lambda v: v == 3,
        "num_attention_heads": lambda v: v is None,
        "attention_type": lambda v: v == "default",
        "resnet_skip_time_act": lambda v: not v,
        "resnet_out_scale_factor": lambda v: v == 1.0,
        "dual_cross_attention": lambda v: not v,
        "reverse_transformer_layers_per_block": lambda v: v is None,
        "mid_block_only_cross_attention": lambda v: not v,
        "cross_attention_norm": lambda v: v is None,
        "resnet_time_scale_shift": lambda v: v in ("default", "scale_shift"),
    }
    _refuse_config(config, checks, "diffusers UNet2DConditionModel")
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if not set(down) <= known or up != expected_up:
        raise UnsupportedByDiffusers(
            f"diffusers UNet2DConditionModel down_block_types={down}, up_block_types={up}: ours mirror "
            f"CrossAttnDownBlock2D/DownBlock2D levels with CrossAttnUpBlock2D/UpBlock2D ({expected_up})"
        )
    widths = [int(c) for c in config["block_out_channels"]]
    if any(w % widths[0] for w in widths):
        raise UnsupportedByDiffusers(
            f"diffusers UNet2DConditionModel block_out_channels={widths}: ours are multiples of the first"
        )
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        value = config.get(key)
        if isinstance(value, (list, tuple)) and len(set(value)) != 1:
            raise UnsupportedByDiffusers(
                f"diffusers UNet2DConditionModel {key}={list(value)}: ours use one value for every level"
            )
    heads = config.get("attention_head_dim", 8)
    heads = [int(heads)] * len(widths) if not isinstance(heads, (list, tuple)) else [int(h) for h in heads]
    head_channels = {w // h for w, h, a in zip(widths, heads, attn) if a} | {widths[-1] // heads[-1]}
    if len(head_channels) != 1 or any(w % h for w, h, a in zip(widths, heads, attn) if a):
        raise UnsupportedByDiffusers(
            f"diffusers UNet2DConditionModel attention_head_dim={heads} with block_out_channels={widths}: ours "
            "use one number of channels per head (num_head_channels) at every level"
        )

    def one(key: str, default: Any) -> int:
        value = config.get(key, default)
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    return {
        "in_channels": int(config.get("in_channels", 4)),
        "out_channels": int(config.get("out_channels", 4)),
        "model_channels": widths[0],
        "channel_mult": [w // widths[0] for w in widths],
        "num_res_blocks": one("layers_per_block", 2),
        "attention_resolutions": [2**i for i, a in enumerate(attn) if a],
        "num_head_channels": head_channels.pop(),
        "context_dim": one("cross_attention_dim", 1280),
        "transformer_depth": one("transformer_layers_per_block", 1),
        "use_scale_shift_norm": config.get("resnet_time_scale_shift", "default") == "scale_shift",
        "resblock_updown": False,
    }


def _unet_entries(hp: Mapping[str, Any]) -> list[Entry]:
    levels, nrb = len(hp["channel_mult"]), int(hp["num_res_blocks"])
    attn = _attention_levels(hp)
    e: list[Entry] = [("time_embed.mlp.0", "time_embedding.linear_1", "same"),
                      ("time_embed.mlp.2", "time_embedding.linear_2", "same"),
                      ("encoder.input_blocks.0.0", "conv_in", "same")]  # fmt: skip
    j = 1
    for i in range(levels):
        for r in range(nrb):
            e.append((f"encoder.input_blocks.{j}.0", f"down_blocks.{i}.resnets.{r}", "resnet_unet"))
            if attn[i]:
                e.append((f"encoder.input_blocks.{j}.1", f"down_blocks.{i}.attentions.{r}", "same"))
            j += 1
        if i != levels - 1:
            e.append((f"encoder.input_blocks.{j}.0", f"down_blocks.{i}.downsamplers.0", "down_unet"))
            j += 1
    e += [("encoder.middle_block.0", "mid_block.resnets.0", "resnet_unet"),
          ("encoder.middle_block.1", "mid_block.attentions.0", "same"),
          ("encoder.middle_block.2", "mid_block.resnets.1", "resnet_unet")]  # fmt: skip
    j = 0
    for b, level in enumerate(reversed(range(levels))):
        for r in range(nrb + 1):
            e.append((f"output_blocks.{j}.0", f"up_blocks.{b}.resnets.{r}", "resnet_unet"))
            n = 1
            if attn[level]:
                e.append((f"output_blocks.{j}.1", f"up_blocks.{b}.attentions.{r}", "same"))
                n = 2
            if level and r == nrb:
                e.append((f"output_blocks.{j}.{n}", f"up_blocks.{b}.upsamplers.0", "same"))
            j += 1
    e += [("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")]
    return e


def unet_to_diffusers(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our UNet state dict -> diffusers UNet2DConditionModel's (the same tensors under diffusers' names)."""
    _check_unet(hparams)
    return _convert(state, _unet_entries(hparams), True, "unet")


def unet_from_diffusers(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel state dict -> ours (built with `hparams`)."""
    _check_unet(hparams)
    return _convert(state, _unet_entries(hparams), False, "diffusers UNet2DConditionModel")
