"""Perceptual distances: DomainPerceptual, LPIPSVGG (real file loading, no downloads). The feature net's
loader is lightning_modules.artifacts.load_feature_net (tests/unit/test_artifacts.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from lightning_modules.nets.feature_net import FeatureNet
from lightning_modules.nets.perceptual import LPIPSVGG, DomainPerceptual

# LPIPS (richzhang/PerceptualSimilarity, lpips/pretrained_networks.py + lpips.py), written out here
# independently of the module under test: VGG16 conv indices per tap (relu1_2 ... relu5_3), a max-pool
# before every stage but the first, the ScalingLayer constants, and the v0.1 head key names.
VGG_STAGES = ([0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28])
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def images(seed: int, shape=(2, 1, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def numpy_lpips(maps_a: list[torch.Tensor], maps_b: list[torch.Tensor], heads=None) -> np.ndarray:
    """Zhang et al. 2018 eq. 1 in numpy: (B,) distances from per-layer feature maps."""
    total = 0.0
    for i, (a, b) in enumerate(zip(maps_a, maps_b)):
        a, b = a.detach().double().numpy(), b.detach().double().numpy()
        ua = a / (np.sqrt((a**2).sum(axis=1, keepdims=True)) + 1e-10)
        ub = b / (np.sqrt((b**2).sum(axis=1, keepdims=True)) + 1e-10)
        w = np.ones(a.shape[1]) if heads is None else heads[i].double().numpy().reshape(-1)
        total = total + np.einsum("bchw,c->bhw", (ua - ub) ** 2, w).mean(axis=(1, 2))
    return total


# ---- DomainPerceptual -------------------------------------------------------------------------------


@pytest.fixture
def domain():
    torch.manual_seed(0)
    return DomainPerceptual(FeatureNet(in_channels=1, num_classes=10, widths=(8, 16), dropout=0.2))


def test_domain_zero_for_identical(domain):
    x = images(0)
    assert torch.equal(domain(x, x.clone()), torch.zeros(2))


def test_domain_positive_symmetric_and_matches_reference(domain):
    x, y = images(1), images(2)
    d = domain(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, domain(y, x))
    ref = numpy_lpips(domain.net.feature_maps(x), domain.net.feature_maps(y))
    np.testing.assert_allclose(d.detach().numpy(), ref, rtol=1e-5)


def test_domain_grads_reach_inputs_not_net(domain):
    domain.train()
    assert not domain.net.training, "the frozen net must stay in eval mode"
    x, y = images(3).requires_grad_(), images(4)
    domain(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in domain.net.parameters())


def test_domain_float32_under_bf16_autocast(domain):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = domain(images(5), images(6))
    assert d.dtype == torch.float32 and torch.isfinite(d).all()


# ---- LPIPSVGG ----------------------------------------------------------------------------------------


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """Point the hub cache at an empty temp dir and make any download attempt fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "hub" / "checkpoints"


def test_lpips_missing_weights_names_paths(no_download):
    with pytest.raises(FileNotFoundError) as err:
        LPIPSVGG()
    msg = str(err.value)
    assert str(no_download / "vgg16-397923af.pth") in msg and str(no_download / "vgg.pth") in msg
    assert "model.perceptual.vgg_weights_path" in msg and "model.perceptual.lpips_weights_path" in msg


def test_lpips_missing_explicit_path_named(no_download, tmp_path):
    with pytest.raises(FileNotFoundError, match="my_vgg.pth"):
        LPIPSVGG(vgg_weights_path=str(tmp_path / "my_vgg.pth"))


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Random weights in the real files' layouts: torchvision vgg16 `features.*` keys, lpips `lin{i}`."""
    checkpoints = tmp_path_factory.mktemp("weights")
    with torch.device("meta"):
        layout = torchvision.models.vgg16(weights=None).state_dict()
    gen = torch.Generator().manual_seed(0)
    vgg = {
        k: torch.randn(v.shape, generator=gen) * (0.1 if k.endswith("bias") else (2.0 / v[0].numel()) ** 0.5)
        for k, v in layout.items()
        if k.startswith("features.")
    }
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(vgg, checkpoints / "vgg16-397923af.pth")
    torch.save(heads, checkpoints / "vgg.pth")
    return checkpoints, vgg, heads


def link_into(target: Path, source: Path, names=("vgg16-397923af.pth", "vgg.pth")) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).symlink_to(source / name)


def reference_vgg_maps(x: torch.Tensor, vgg: dict) -> list[torch.Tensor]:
    h = (x.expand(-1, 3, -1, -1) - SHIFT) / SCALE
    maps = []
    for stage, convs in enumerate(VGG_STAGES):
        if stage > 0:
            h = F.max_pool2d(h, 2)
        for idx in convs:
            h = F.relu(F.conv2d(h, vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"], padding=1))
        maps.append(h)
    return maps


def test_lpips_loads_real_layout_from_hub_cache(no_download, random_weights):
    source, vgg, heads = random_weights
    link_into(no_download, source)
    lpips = LPIPSVGG()
    x, y = images(8, (2, 3, 16, 16)), images(9, (2, 3, 16, 16))
    assert torch.equal(lpips(x, x.clone()), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, lpips(y, x))
    ref = numpy_lpips(reference_vgg_maps(x, vgg), reference_vgg_maps(y, vgg), list(heads.values()))
    np.testing.assert_allclose(d.detach().numpy(), ref, rtol=1e-4)
    # Grey images are compared as RGB with equal channels.
    g1, g2 = x[:, :1], y[:, :1]
    torch.testing.assert_close(lpips(g1, g2), lpips(g1.expand(-1, 3, -1, -1), g2.expand(-1, 3, -1, -1)))


def test_lpips_frozen_and_explicit_paths(no_download, random_weights):
    source = random_weights[0]
    lpips = LPIPSVGG(
        vgg_weights_path=str(source / "vgg16-397923af.pth"), lpips_weights_path=str(source / "vgg.pth")
    )
    lpips.train()
    assert not lpips.training and all(not p.requires_grad for p in lpips.parameters())
    x = images(10, (1, 3, 16, 16)).requires_grad_()
    lpips(x, images(11, (1, 3, 16, 16))).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_rejects_wrong_head_file(no_download, random_weights):
    link_into(no_download, random_weights[0], names=("vgg16-397923af.pth",))
    torch.save({"something": torch.zeros(1)}, no_download / "vgg.pth")
    with pytest.raises(RuntimeError, match="lin0.model.1.weight"):
        LPIPSVGG()
