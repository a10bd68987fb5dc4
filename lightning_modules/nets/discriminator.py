"""PatchGAN discriminator (Isola et al. 2017, pix2pix; taming-transformers `NLayerDiscriminator`).

Normalisation must behave under DDP. The default, GroupNorm, keeps no running statistics, so every
rank computes the same function regardless of its local batch. "batch" (BatchNorm, as pix2pix/taming)
is allowed for parity with those recipes; its statistics are per-rank unless the LightningModule
converts it with `nn.SyncBatchNorm.convert_sync_batchnorm` (Lightning: `Trainer(sync_batchnorm=True)`)
under DDP, which is the LightningModule's job, not this module's.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.nets.autoencoder import norm_groups

NORMS = ("group", "batch", "none")
KERNEL, PAD = 4, 1


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(norm_groups(channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _init_weights(module: nn.Module) -> None:
    """pix2pix init: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 1, H', W') real/fake logits, one per overlapping patch.

    n_layers stride-2 4x4 convs, then a stride-1 4x4 conv and a 4x4 conv to one channel, LeakyReLU(0.2)
    between them; widths ndf * min(2 ** i, 8). H' = floor(H / 2 ** n_layers) - 2 (the same for W).

    Args:
        in_channels: image channels.
        ndf: width of the first layer.
        n_layers: number of stride-2 convs (3 gives pix2pix's 70x70 receptive field).
        norm: "group" (default, DDP-safe), "batch" or "none"; see the module docstring.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.n_layers = n_layers
        # A conv followed by an affine norm needs no bias of its own.
        bias = norm == "none"
        widths = [ndf * min(2**i, 8) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, KERNEL, 2, PAD), nn.LeakyReLU(0.2)]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], KERNEL, stride, PAD, bias=bias),
                _norm_layer(norm, widths[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, KERNEL, 1, PAD))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def output_size(self, size: int) -> int:
        """Logit-map side for an input side `size`: n_layers halvings, then two 4x4/pad-1 convs (-1 each)."""
        return (size >> self.n_layers) - 2

    def forward(self, x: Tensor) -> Tensor:
        if min(self.output_size(x.shape[-2]), self.output_size(x.shape[-1])) < 1:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small for a PatchDiscriminator with "
                f"n_layers={self.n_layers}; lower n_layers"
            )
        return self.main(x)
