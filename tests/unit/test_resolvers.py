"""`${auto_precision:...}`: bf16 autocast only where the hardware computes bf16 natively; resolved into the
config (and so into the stage hash) before training, overridable from the command line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import pipeline  # noqa: F401  (registers the resolvers)
from core.io import config_hash
from pipeline import resolvers


@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_precision_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda: native)
    assert resolvers.auto_precision("cpu") == expected
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "precision": "${auto_precision:${trainer.accelerator}}"}})
    assert cfg.trainer.precision == expected


@pytest.mark.parametrize("cuda,bf16,expected", [(True, True, "bf16-mixed"), (True, False, "32-true"),
                                                 (False, False, "32-true")])  # fmt: skip
def test_gpu_precision_follows_cuda_bf16(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolvers.auto_precision("gpu") == expected == resolvers.auto_precision("cuda")


def test_unknown_accelerator_keeps_float32():
    assert resolvers.auto_precision("mps") == "32-true"


def test_x86_check_reads_the_cpu_flags(monkeypatch):
    # a cap in the caller's environment (ONEDNN_MAX_CPU_ISA=AVX2 make test) is the next test's case, not this one's
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(resolvers.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolvers.cpu_has_native_bf16() is expected


def test_a_onednn_isa_cap_below_bf16_means_float32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only machine's kernels on an AVX512 one) emulates bf16: float32."""
    monkeypatch.setattr(resolvers.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for cap, expected in [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True),
                          ("", True)]:  # fmt: skip
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert resolvers.cpu_has_native_bf16() is expected, cap
        assert resolvers.auto_precision("cpu") == ("bf16-mixed" if expected else "32-true")


def test_resolved_precision_is_in_the_stage_hash(monkeypatch):
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "precision": "${auto_precision:${trainer.accelerator}}"}})
    hashes = []
    for native in (True, False):
        monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda v=native: v)
        hashes.append(config_hash(cfg))
    assert hashes[0] != hashes[1]  # a checkpoint of one precision is never resumed in the other


@pytest.mark.parametrize("accelerator,precision,cuda,expected", [
    ("cpu", "32-true", False, True), ("cpu", "bf16-mixed", False, True), ("auto", "32-true", False, True),
    ("cpu", "16-mixed", False, None),  # fp16 AMP's scaler cannot unscale inside a fused step (Lightning)
    ("gpu", "bf16-mixed", True, None), ("auto", "bf16-mixed", True, None),
])  # fmt: skip
def test_fused_adam_on_cpu_only(monkeypatch, accelerator, precision, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolvers.fused_adam(accelerator, precision) is expected


def test_stage_optimisers_are_fused_on_cpu_and_build():
    """Every stage optimiser resolves `fused` and constructs with it (torch's fused Adam(W) on CPU)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from pipeline.run import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="t"):
        for stage in ("feature_net", "autoencoder", "diffusion", "classifier"):
            cfg = compose(config_name="train", overrides=[f"stage={stage}", "trainer.accelerator=cpu"])
            for key in ("optimizer", "disc_optimizer"):
                if key in cfg.stage.module:
                    assert cfg.stage.module[key].fused is True, (stage, key)
                    opt = instantiate(cfg.stage.module[key])([torch.nn.Parameter(torch.zeros(3))])
                    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_sampling_dtype_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda: native)
    assert resolvers.sampling_dtype("auto", "cpu") == expected
    for given in ("fp32", "bf16", "fp16"):  # explicit values are kept on any machine
        assert resolvers.sampling_dtype(given, "cpu") == given


@pytest.mark.parametrize("bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_sampling_dtype_on_cuda_follows_its_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda: not bf16)  # the CPU's answer must not leak in
    assert resolvers.sampling_dtype("auto", "cuda:1") == expected


def test_unknown_sampling_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match=r"sampling_dtype='int8'.*'auto'"):
        resolvers.sampling_dtype("int8", "cpu")
