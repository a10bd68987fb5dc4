"""lightning_modules.artifacts: writers and loaders round-trip, unsafe pickles and unknown conditioners are
refused before anything in the file runs, hyper-parameters are saved weights-only loadable."""

from __future__ import annotations

import builtins
import pickle
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eval.features import DomainFeatures
from lightning_modules import artifacts as art
from lightning_modules.artifacts import (
    CONDITIONERS,
    StageMismatchError,
    UnsafeCheckpointError,
    build_conditioner,
    check_eval_feature_net,
    conditioner_spec,
    load_autoencoder,
    load_classifier,
    load_diffusion,
    load_diffusion_upstream,
    load_feature_net,
    load_stage_checkpoint,
    save_artifact,
    state_fingerprint,
)
from lightning_modules.base import StageModule
from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.classifier import NoisyLatentClassifier
from lightning_modules.nets.conditioners import ClassConditioner
from lightning_modules.nets.feature_net import FeatureNet
from lightning_modules.nets.unet import UNet
from tests import tiny_checkpoints as tiny


def same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    return state_fingerprint(sa) == state_fingerprint(sb)


# --- writers -> loaders ----------------------------------------------------------------------------


def test_feature_net_round_trip_and_role_check(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet(in_channels=1, num_classes=3, widths=(4, 8)).eval()
    with torch.no_grad():  # BatchNorm running statistics are part of the artifact
        net.stages[0][1].running_mean += 0.5
    path = save_artifact(tmp_path / "fn.ckpt", "feature_net", art.feature_net_artifacts(net, "perceptual"))
    loaded = load_feature_net(path, role="perceptual", user="the test")
    assert loaded.hparams() == net.hparams() and not loaded.training and same_weights(loaded, net)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x)["logits"], net(x)["logits"])
    assert same_weights(load_feature_net(path), net)  # no role asked: any role
    with pytest.raises(StageMismatchError, match="fn.ckpt is the feature net of role 'perceptual', but the test "
                                                 "needs role 'eval'"):  # fmt: skip
        load_feature_net(path, role="eval", user="the test")
    with pytest.raises(ValueError, match="role must be one of"):
        art.feature_net_artifacts(net, "other")


def test_feature_net_loaders_agree(tmp_path):
    """The three former feature-net loaders are one: autoencoder, eval features and the loader itself."""
    from lightning_modules.autoencoder import domain_perceptual

    path = tiny.write_feature_net(tmp_path / "p.ckpt", role="perceptual")
    reference = load_feature_net(path)
    assert same_weights(DomainFeatures(path).net, reference)
    assert same_weights(domain_perceptual(str(path)).net, reference)
    with pytest.raises(StageMismatchError, match="needs role 'perceptual'"):
        domain_perceptual(str(tiny.write_feature_net(tmp_path / "e.ckpt", role="eval")))


def test_autoencoder_round_trip(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL(**tiny.AE_HPARAMS)
    written = art.autoencoder_artifacts(ae, 0.25, [1, 32, 32], [4, 8, 8])
    path = save_artifact(tmp_path / "ae.ckpt", "autoencoder", written)
    loaded, scale, fingerprint = load_autoencoder(path)
    assert scale == 0.25 and fingerprint == state_fingerprint(ae.state_dict()) and same_weights(loaded, ae)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # before on_train_end the scale factor is unknown: intermediate checkpoints lack it and are refused
    partial = art.autoencoder_artifacts(ae)
    assert "latent_scale_factor" not in partial and "image_shape" not in partial
    with pytest.raises(StageMismatchError, match=r"lacks \['latent_scale_factor'\]"):
        load_autoencoder(save_artifact(tmp_path / "mid.ckpt", "autoencoder", partial))


def test_diffusion_and_classifier_round_trip(tmp_path):
    ae_path, fingerprint = tiny.write_autoencoder(tmp_path / "ae.ckpt")
    torch.manual_seed(1)
    unet = UNet(**tiny.UNET_HPARAMS)
    cond = ClassConditioner(num_classes=10, embed_dim=16)
    ema_cond = ClassConditioner(num_classes=10, embed_dim=16)  # stands in for the conditioner's EMA copy
    schedule = NoiseSchedule.from_dict(tiny.TINY_SCHEDULE)
    written = art.diffusion_artifacts(unet, cond, ema_cond, schedule, "v", (4, 8, 8), ae_path, fingerprint, 0.5, 10)
    path = save_artifact(tmp_path / "diff.ckpt", "diffusion", written)
    bundle = load_diffusion(path)
    assert same_weights(bundle.unet, unet) and same_weights(bundle.conditioner, ema_cond)
    assert not same_weights(bundle.conditioner, cond)
    assert (bundle.schedule, bundle.prediction_type, bundle.latent_shape, bundle.num_classes) == (
        schedule, "v", (4, 8, 8), 10)  # fmt: skip
    assert bundle.autoencoder_fingerprint == fingerprint and bundle.scale_factor == 0.5

    clf = NoisyLatentClassifier(**tiny.CLASSIFIER_HPARAMS)
    written = art.classifier_artifacts(clf, True, schedule, [4, 8, 8], ae_path, fingerprint, path, 0.5, 10)
    clf_path = save_artifact(tmp_path / "clf.ckpt", "classifier", written)
    loaded = load_classifier(clf_path, diffusion=bundle)
    assert same_weights(loaded, clf) and loaded.hparams() == clf.hparams()
    assert load_diffusion_upstream(path, ae_path, fingerprint, 10) == {
        "schedule": schedule.to_dict(), "latent_shape": [4, 8, 8]}  # fmt: skip
    with pytest.raises(StageMismatchError, match="data has 7 classes but diffusion checkpoint"):
        load_diffusion_upstream(path, ae_path, fingerprint, 7)
    other, other_fp = tiny.write_autoencoder(tmp_path / "other.ckpt", seed=3)
    with pytest.raises(StageMismatchError, match=f"{other.name} \\(weights {other_fp[:12]}\\) is not the one"):
        load_diffusion(path, other)


def test_save_artifact_refuses_an_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'vae'"):
        save_artifact(tmp_path / "x.ckpt", "vae", {})


# --- unsafe pickles are refused, nothing in them runs ----------------------------------------------


class CreatesFile:
    """Unpickling this calls open(path, "w"): it creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _malicious_files(tmp_path: Path, stage: str, marker: Path) -> list[Path]:
    """A checkpoint that looks like stage `stage`'s plus a payload, in torch's zip format, its legacy format
    and as a bare pickle."""
    ckpt = {"stage": stage, "hyper_parameters": {"x": CreatesFile(marker)}}
    paths = [tmp_path / f"{stage}_zip.ckpt", tmp_path / f"{stage}_legacy.ckpt", tmp_path / f"{stage}_raw.ckpt"]
    torch.save(ckpt, paths[0])
    torch.save(ckpt, paths[1], _use_new_zipfile_serialization=False)
    with open(paths[2], "wb") as f:
        pickle.dump(ckpt, f)
    return paths


LOADERS = {
    "feature_net": [load_feature_net, DomainFeatures, lambda p: check_eval_feature_net(p, None),
                    lambda p: load_feature_net(p, role="perceptual")],
    "autoencoder": [load_autoencoder],
    "diffusion": [load_diffusion, lambda p: load_diffusion_upstream(p, "ae.ckpt", "0" * 64, 10)],
    "classifier": [load_classifier],
}  # fmt: skip


@pytest.mark.parametrize("stage", list(LOADERS))
def test_malicious_pickle_is_refused_by_every_loader(tmp_path, stage):
    marker = tmp_path / "pwned"
    for path in _malicious_files(tmp_path, stage, marker):
        for loader in [*LOADERS[stage], lambda p: load_stage_checkpoint(p, stage)]:
            with pytest.raises(UnsafeCheckpointError, match=f"{path.name} cannot be loaded with .*weights_only=True"):
                loader(path)
            assert not marker.exists(), f"{loader} executed the payload of {path.name}"
    # the payload is real: the full unpickler would have run it
    torch.load(tmp_path / f"{stage}_zip.ckpt", weights_only=False)
    assert marker.exists()


def test_unsafe_message_says_what_to_do(tmp_path):
    path = _malicious_files(tmp_path, "autoencoder", tmp_path / "m")[0]
    with pytest.raises(UnsafeCheckpointError) as err:
        load_autoencoder(path)
    assert "re-running the stage" in str(err.value) and "force=true" in str(err.value)


# --- the conditioner allowlist ---------------------------------------------------------------------


def test_conditioner_allowlist():
    assert set(CONDITIONERS) == {"lightning_modules.nets.conditioners.ClassConditioner",
                                 "lightning_modules.nets.conditioners.TextConditioner"}  # fmt: skip
    spec = conditioner_spec(ClassConditioner(10, embed_dim=8))
    assert same_weights(build_conditioner(spec), {k: v for k, v in spec["state_dict"].items()})
    assert "tabnanny" not in sys.modules
    for target in ("tabnanny.check", "lightning_modules.nets.unet.UNet", "ClassConditioner"):
        with pytest.raises(StageMismatchError, match=f"conditioner '{target}' is not a known conditioner class; "
                                                     "allowed: .*ClassConditioner.*TextConditioner"):  # fmt: skip
            build_conditioner({**spec, "target": target})
    assert "tabnanny" not in sys.modules  # the named module was never imported


def test_unknown_conditioner_is_refused_when_saved_and_when_loaded(tmp_path):
    class MyConditioner(ClassConditioner):
        pass

    with pytest.raises(StageMismatchError, match="MyConditioner' is not a known conditioner class"):
        conditioner_spec(MyConditioner(10, embed_dim=8))
    path = tiny.write_diffusion(tmp_path / "d.ckpt", *tiny.write_autoencoder(tmp_path / "ae.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["conditioner"]["target"] = "os.system"
    torch.save(ckpt, path)
    with pytest.raises(StageMismatchError, match="'os.system' is not a known conditioner class"):
        load_diffusion(path)


# --- hyper-parameters are saved as plain containers ------------------------------------------------


def test_hyper_parameters_are_saved_weights_only_loadable(tmp_path):
    class Tiny(StageModule):
        stage_name = "feature_net"

        def __init__(self, scales, nested) -> None:
            super().__init__()
            self.save_hyperparameters()

    module = Tiny(OmegaConf.create([1.0, 3.0]), OmegaConf.create({"a": {"b": [1, 2]}}))
    checkpoint = {"hyper_parameters": dict(module.hparams), "hparams_type": type(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert "hparams_type" not in checkpoint
    assert checkpoint["hyper_parameters"] == {"scales": [1.0, 3.0], "nested": {"a": {"b": [1, 2]}}}
    torch.save(checkpoint, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["stage"] == "feature_net"
