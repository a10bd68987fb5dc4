"""Perceptual distances for the autoencoder loss: LPIPS-VGG, or a domain feature net where VGG does not fit.

Both follow LPIPS (Zhang et al. 2018, eq. 1): d(x, x0) = sum_l mean_hw || w_l * (u_l(x) - u_l(x0)) ||^2,
u_l the layer-l feature map unit-normalised along channels. The domain variant has no learned heads
(w_l = 1). Both networks are frozen: they stay in eval mode and their parameters never need gradients,
while gradients still flow to the inputs. Nothing is ever downloaded: weights come from files. The domain
net is passed in built (`lightning_modules.artifacts.load_feature_net` reads the feature_net stage's file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers

from lightning_modules.nets.feature_net import FeatureNet

NORM_EPS = 1e-10
VGG_WEIGHTS_FILE = "vgg16-397923af.pth"
LPIPS_WEIGHTS_FILE = "vgg.pth"
# LPIPS's ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16 `features` index ranges ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG_CHANNELS = (64, 128, 256, 512, 512)


def autocast_off(device: torch.device) -> torch.autocast:
    """Context in which ops run in the dtype of their inputs: for float32 loss maths under AMP."""
    return torch.autocast(device_type=device.type, enabled=False)


def unit_normalize(feat: Tensor) -> Tensor:
    """(B, C, H, W) -> the same, each spatial position's channel vector scaled to unit norm, in float32.

    float32 because under fp16 the eps underflows to 0 and an all-zero ReLU vector gives 0/0 = NaN.
    """
    feat = feat.float()
    return feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


def layer_distance(feat_a: Tensor, feat_b: Tensor, head: nn.Module | None = None) -> Tensor:
    """One LPIPS layer term (Zhang et al. 2018 eq. 1): (B, C, H, W) x 2 -> (B,)."""
    with autocast_off(feat_a.device):
        diff = (unit_normalize(feat_a) - unit_normalize(feat_b)).square()
        if head is not None:
            diff = head(diff)
        return diff.sum(dim=1).mean(dim=(1, 2))


class _Frozen(nn.Module):
    """Base for frozen feature networks: always in eval mode, parameters never require grad."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> _Frozen:
        # Lightning calls .train() on the whole module tree; dropout/batch-norm here must stay off.
        return super().train(False)


class DomainPerceptual(_Frozen):
    """LPIPS-style distance on a trained `FeatureNet`'s feature maps, without learned heads.

    forward(x, y): x, y (B, C, H, W) in [-1, 1] -> (B,) distances.
    """

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net
        self.freeze()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        maps_x, maps_y = self.net.feature_maps(x), self.net.feature_maps(y)
        return sum(layer_distance(a, b) for a, b in zip(maps_x, maps_y, strict=True))


def default_weights_dir() -> Path:
    """`<torch hub dir>/checkpoints`, where torchvision and torch.hub cache downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weight_files(files: dict[str, tuple[str | None, str]]) -> dict[str, Path]:
    """{config_key: (given path or None, default file name)} -> {config_key: existing path}.

    A None path means `default_weights_dir() / default name`. Raises FileNotFoundError naming every
    missing file and the config key that points at it; nothing is downloaded.
    """
    paths = {
        key: Path(given) if given is not None else default_weights_dir() / name
        for key, (given, name) in files.items()
    }
    missing = {key: path for key, path in paths.items() if not path.is_file()}
    if missing:
        lines = "\n".join(
            f"  {path}  (set `{key}=/path/to/{files[key][1]}`)" for key, path in missing.items()
        )
        raise FileNotFoundError(
            "perceptual network weights not found (nothing is downloaded at run time); copy the files to\n"
            f"{lines}\nor point the config keys at existing copies."
        )
    return paths


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class LPIPSVGG(_Frozen):
    """LPIPS with VGG16 (Zhang et al. 2018, the `lpips` package's `LPIPS(net="vgg")`, v0.1 heads).

    forward(x, y): x, y (B, C, H, W) in [-1, 1], C in {1, 3} (grey images are repeated to RGB) -> (B,).

    Args:
        vgg_weights_path: torchvision's `vgg16-397923af.pth` state dict (only `features.*` is used).
            Default: `<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`.
        lpips_weights_path: the `lpips` package's `weights/v0.1/vgg.pth` (keys `lin{i}.model.1.weight`).
            Default: `<torch.hub.get_dir()>/checkpoints/vgg.pth`.
    """

    def __init__(self, vgg_weights_path: str | None = None, lpips_weights_path: str | None = None) -> None:
        super().__init__()
        paths = resolve_weight_files(
            {
                "model.perceptual.vgg_weights_path": (vgg_weights_path, VGG_WEIGHTS_FILE),
                "model.perceptual.lpips_weights_path": (lpips_weights_path, LPIPS_WEIGHTS_FILE),
            }
        )
        vgg_path, lpips_path = paths.values()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        with torch.device("meta"):  # skip a random init that loading overwrites anyway
            features = make_layers(vgg_cfgs["D"], batch_norm=False)
        self._load(features, vgg_path, prefix="features.")
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in VGG_SLICES)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in VGG_CHANNELS)
        self._load_heads(lpips_path)
        self.freeze()

    @staticmethod
    def _load(module: nn.Module, path: Path, prefix: str) -> None:
        state = _strip_prefix(torch.load(path, map_location="cpu", weights_only=True), prefix)
        try:
            module.load_state_dict(state, assign=True)
        except RuntimeError as err:
            raise RuntimeError(f"{path} is not a torchvision vgg16 state dict: {err}") from err

    def _load_heads(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The lpips package wraps each 1x1 conv as Sequential(Dropout, Conv2d): keys lin{i}.model.1.weight.
        keys = [f"lin{i}.model.1.weight" for i in range(len(VGG_CHANNELS))]
        missing = [k for k in keys if k not in state]
        if missing:
            raise RuntimeError(f"{path} is not an lpips vgg.pth: missing keys {missing}")
        with torch.no_grad():
            for head, key in zip(self.heads, keys, strict=True):
                head.weight.copy_(state[key])

    def _features(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        maps = []
        for block in self.slices:
            h = block(h)
            maps.append(h)
        return maps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        pairs = zip(self._features(x), self._features(y), strict=True)
        return sum(layer_distance(a, b, head) for (a, b), head in zip(pairs, self.heads, strict=True))

