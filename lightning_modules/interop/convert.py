"""Our autoencoder, U-Net and noise schedule <-> Hugging Face diffusers' AutoencoderKL,
UNet2DConditionModel (the U-Net converters are in convert_unet.py, the scheduler configs in schedulers.py). Pure
torch: diffusers is not imported here; this module holds the shared renaming machinery and the autoencoder.

Layouts. Our U-Net is CompVis latent-diffusion's ``openaimodel.UNetModel`` layout (numbered
``input_blocks`` / ``output_blocks`` of ResBlocks and SpatialTransformers) and our KL autoencoder LDM's
``Encoder`` / ``Decoder`` in flat ``nn.Sequential`` lists; diffusers groups the same layers per resolution
level (``down_blocks.i.resnets.j``, ``down_blocks.i.attentions.j``, ``mid_block``, ``up_blocks.i``). The
layers themselves compute the same functions (diffusers' own LDM conversion script,
``scripts/convert_original_stable_diffusion_to_diffusers.py``, maps the same two layouts), so the
converters rename parameters; the one change of shape is the autoencoder's middle attention, whose fused
1x1-conv ``qkv`` (3C, C, 1, 1) is diffusers' three (C, C) linear maps ``to_q``, ``to_k``, ``to_v`` (its
``proj_out`` conv is ``to_out.0``). Splitting and concatenating copy values, so ours -> diffusers -> ours
gives back the very same tensors.

What has no diffusers equivalent is refused by name (`UnsupportedByDiffusers`), never exported wrongly:
GroupNorm group counts that differ between layers (by default ours pick a count per width, diffusers' one
``norm_num_groups`` for the whole network; our autoencoder's ``norm_num_groups`` option gives every layer one
count, which maps to diffusers' key), a first level wider than the stem (``channel_mult[0] != 1``),
ADM's resampling ResBlocks (``resblock_updown``), a U-Net without cross-attention (``context_dim=None``)
and a cosine schedule with another offset than diffusers' s = 0.008.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.nets.autoencoder import AutoencoderKL, norm_groups

__all__ = [
    "UnsupportedByDiffusers",
    "autoencoder_config",
    "autoencoder_from_diffusers",
    "autoencoder_hparams_from_config",
    "autoencoder_to_diffusers",
]



class UnsupportedByDiffusers(ValueError):
    """An option of ours (or of a diffusers config) that the other side cannot represent."""


# --- shared bookkeeping ----------------------------------------------------------------------------------

# Parameter renames inside one block, ours -> diffusers (a name not listed is the same on both sides).
_RESNET_UNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_VAE = {"skip": "conv_shortcut"}
_DOWN_UNET = {"op": "conv"}
_VAE_ATTN = {"norm": "group_norm", "proj_out": "to_out.0"}
_RENAMES = {"same": {}, "resnet_unet": _RESNET_UNET, "resnet_vae": _RESNET_VAE, "down_unet": _DOWN_UNET,
            "vae_attn": _VAE_ATTN}  # fmt: skip

Entry = tuple[str, str, str]  # (our module prefix, diffusers module prefix, kind of block)


def _split(key: str, prefixes: Iterable[str]) -> tuple[str, str] | None:
    """(prefix, rest) for the longest of `prefixes` that `key` starts with (as whole dotted components)."""
    best = None
    for prefix in prefixes:
        if key.startswith(prefix + ".") and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else (best, key[len(best) + 1 :])


def _rename(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _convert(
    state: Mapping[str, Tensor], entries: list[Entry], to_diffusers: bool, what: str
) -> dict[str, Tensor]:
    """Rename every key of `state` through `entries`; refuse keys no entry covers."""
    src = {e[0 if to_diffusers else 1]: e for e in entries}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}  # diffusers -> ours: the VAE attention's to_q/k/v, per prefix
    unknown = []
    for key, value in state.items():
        found = _split(key, src)
        if found is None:
            unknown.append(key)
            continue
        prefix, rest = found
        ours, theirs, kind = src[prefix]
        table = _RENAMES[kind]
        if to_diffusers:
            if kind == "vae_attn":
                out.update(_split_qkv(theirs, rest, value))
                continue
            out[f"{theirs}.{_rename(rest, table)}"] = value
        else:
            if kind == "vae_attn" and rest.split(".")[0] in ("to_q", "to_k", "to_v"):
                fused.setdefault(ours, {})[rest] = value
                continue
            inverse = {v: k for k, v in table.items()}
            name = _rename(rest, inverse)
            if kind == "vae_attn" and name == "proj_out.weight":
                value = value[..., None, None]  # (C, C) linear -> (C, C, 1, 1) conv
            out[f"{ours}.{name}"] = value
    if unknown:
        side = "ours" if to_diffusers else "diffusers'"
        raise UnsupportedByDiffusers(
            f"{what}: {len(unknown)} parameter(s) of {side} have no counterpart, e.g. {unknown[:5]}"
        )
    for ours, parts in fused.items():
        out.update(_fuse_qkv(ours, parts, what))
    return out


def _split_qkv(theirs: str, rest: str, value: Tensor) -> dict[str, Tensor]:
    """One tensor of our VAE attention -> diffusers' names (qkv split in three; 1x1 convs as linears)."""
    param = rest.split(".")[-1]
    if rest.startswith("qkv."):
        q, k, v = value.chunk(3, dim=0)
        flat = (lambda t: t.flatten(1)) if param == "weight" else (lambda t: t)
        return {f"{theirs}.to_{n}.{param}": flat(t).clone() for n, t in zip("qkv", (q, k, v))}
    name = _rename(rest, _VAE_ATTN)
    if name.startswith("to_out.0.") and param == "weight":
        value = value.flatten(1)
    return {f"{theirs}.{name}": value}


def _fuse_qkv(ours: str, parts: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    out = {}
    for param in ("weight", "bias"):
        names = [f"to_{n}.{param}" for n in "qkv"]
        missing = [n for n in names if n not in parts]
        if missing:
            raise UnsupportedByDiffusers(f"{what}: the attention at {ours} lacks {missing}")
        fused = torch.cat([parts[n] for n in names], dim=0)
        out[f"{ours}.qkv.{param}"] = fused[..., None, None] if param == "weight" else fused
    return out


def _group_counts(module: nn.Module) -> dict[int, list[int]]:
    """GroupNorm group count -> the channel counts normalised with it."""
    counts: dict[int, list[int]] = {}
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            counts.setdefault(m.num_groups, []).append(m.num_channels)
    return counts


def _single_group_count(module: nn.Module, what: str, fix: str) -> int:
    """The one GroupNorm group count of `module`; several are refused, the error ending with `fix`."""
    counts = _group_counts(module)
    if len(counts) != 1:
        detail = ", ".join(f"{g} groups for {sorted(set(c))} channels" for g, c in sorted(counts.items()))
        raise UnsupportedByDiffusers(
            f"{what}: its GroupNorms use different group counts ({detail}); diffusers uses one "
            f"norm_num_groups for every layer. {fix}"
        )
    return next(iter(counts))


# --- autoencoder ---------------------------------------------------------------------------------------


def _check_autoencoder(hp: Mapping[str, Any]) -> None:
    if int(hp["ch_mult"][0]) != 1:
        raise UnsupportedByDiffusers(
            f"autoencoder ch_mult={list(hp['ch_mult'])}: diffusers' AutoencoderKL has no stem narrower than its "
            "first level (its conv_in outputs block_out_channels[0]); use ch_mult starting with 1"
        )


def _uniform_groups_fix(module: nn.Module) -> str:
    """How to retrain an autoencoder whose layers normalise with different group counts so that it exports."""
    widths = sorted({c for cs in _group_counts(module).values() for c in cs})
    groups = norm_groups(math.gcd(*widths))
    return (
        f"Retrain the autoencoder stage with model.autoencoder.norm_num_groups={groups} (one count for every "
        f"layer; it divides all the widths {widths})"
    )


def autoencoder_config(ae: AutoencoderKL, *, sample_size: int, scaling_factor: float) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` constructor arguments for our autoencoder (the config.json of ``vae/``).

    scaling_factor: the latent scale factor (1 / std of the latents) the diffusion model was trained with.
    """
    hp = ae.hparams()
    _check_autoencoder(hp)
    levels = len(hp["ch_mult"])
    return {
        "in_channels": int(hp["in_channels"]),
        "out_channels": int(hp["out_channels"]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(hp["ch"]) * int(m) for m in hp["ch_mult"]],
        "layers_per_block": int(hp["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(hp["z_channels"]),
        "norm_num_groups": _single_group_count(ae, "autoencoder", _uniform_groups_fix(ae)),
        "sample_size": int(sample_size),
        "scaling_factor": float(scaling_factor),
        "force_upcast": False,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": bool(hp["attn_mid"]),
    }


def autoencoder_hparams_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our AutoencoderKL arguments (dropout left out) for a diffusers AutoencoderKL config; refuses what
    ours cannot build (other block types, activations, no quant convs, a shift factor).

    `norm_num_groups` is among them only where our per-width rule (`norm_groups`) would give some layer
    another count than the config's (diffusers' default 32), as `AutoencoderKL.hparams()` has it only when set.
    """
    checks = {
        "down_block_types": lambda v: set(v) == {"DownEncoderBlock2D"},
        "up_block_types": lambda v: set(v) == {"UpDecoderBlock2D"},
        "act_fn": lambda v: v == "silu",
        "use_quant_conv": lambda v: v in (None, True),
        "use_post_quant_conv": lambda v: v in (None, True),
        "shift_factor": lambda v: v in (None, 0, 0.0),
    }
    _refuse_config(config, checks, "diffusers AutoencoderKL")
    widths = [int(c) for c in config["block_out_channels"]]
    if any(w % widths[0] for w in widths):
        raise UnsupportedByDiffusers(
            f"diffusers AutoencoderKL block_out_channels={widths}: ours are multiples of the first (ch * ch_mult)"
        )
    groups = int(config.get("norm_num_groups", 32))
    uniform = {} if all(norm_groups(w) == groups for w in widths) else {"norm_num_groups": groups}
    return {
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "ch": widths[0],
        "ch_mult": [w // widths[0] for w in widths],
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "z_channels": int(config.get("latent_channels", 4)),
        "attn_mid": bool(config.get("mid_block_add_attention", True)),
        **uniform,
    }


def _refuse_config(config: Mapping[str, Any], checks: Mapping[str, Callable[[Any], bool]], what: str) -> None:
    bad = [f"{k}={config.get(k)!r}" for k, ok in checks.items() if k in config and not ok(config[k])]
    if bad:
        raise UnsupportedByDiffusers(f"{what}: no equivalent in our networks for {', '.join(bad)}")


def _autoencoder_entries(hp: Mapping[str, Any]) -> list[Entry]:
    levels, nrb = len(hp["ch_mult"]), int(hp["num_res_blocks"])
    e: list[Entry] = [("encoder.conv_in", "encoder.conv_in", "same")]
    j = 0
    for i in range(levels):
        for r in range(nrb):
            e.append((f"encoder.down.{j}", f"encoder.down_blocks.{i}.resnets.{r}", "resnet_vae"))
            j += 1
        if i != levels - 1:
            e.append((f"encoder.down.{j}", f"encoder.down_blocks.{i}.downsamplers.0", "same"))
            j += 1
    for side in ("encoder", "decoder"):
        e += [(f"{side}.mid.0", f"{side}.mid_block.resnets.0", "resnet_vae"),
              (f"{side}.mid.1", f"{side}.mid_block.attentions.0", "vae_attn"),
              (f"{side}.mid.2", f"{side}.mid_block.resnets.1", "resnet_vae")]  # fmt: skip
    e += [("encoder.out.0", "encoder.conv_norm_out", "same"), ("encoder.out.2", "encoder.conv_out", "same"),
          ("encoder.quant_conv", "quant_conv", "same"), ("decoder.post_quant_conv", "post_quant_conv", "same"),
          ("decoder.conv_in", "decoder.conv_in", "same"), ("decoder.norm_out", "decoder.conv_norm_out", "same"),
          ("decoder.conv_out", "decoder.conv_out", "same")]  # fmt: skip
    j = 0
    for b, level in enumerate(reversed(range(levels))):
        for r in range(nrb + 1):
            e.append((f"decoder.up.{j}", f"decoder.up_blocks.{b}.resnets.{r}", "resnet_vae"))
            j += 1
        if level != 0:
            e.append((f"decoder.up.{j}", f"decoder.up_blocks.{b}.upsamplers.0", "same"))
            j += 1
    return e


def autoencoder_to_diffusers(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our AutoencoderKL state dict -> diffusers AutoencoderKL's (same values; the attention's qkv split)."""
    _check_autoencoder(hparams)
    return _convert(state, _autoencoder_entries(hparams), True, "autoencoder")


def autoencoder_from_diffusers(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> ours (built with `hparams`)."""
    _check_autoencoder(hparams)
    return _convert(state, _autoencoder_entries(hparams), False, "diffusers AutoencoderKL")
