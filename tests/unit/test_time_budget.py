"""time_budget.minutes: the step scale chosen from a probe against the reference, recorded and reused, and
the stage configs' step counts that follow it (pipeline/time_budget.py)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from core.machine import cpu_description, cpu_info
from pipeline.builders import stage_hash
from pipeline.run import CONF, accepted, apply_time_budget, plan
from pipeline.time_budget import RECORD, choose_scale, decide, describe, scaled_steps

REF = {"machine": "ref", "probe_ms": 100.0, "fixed_minutes": 5.0, "training_minutes": 20.0}


def test_scaled_steps_rounds_and_keeps_at_least_one():
    assert scaled_steps(1500, 1.0) == 1500 and scaled_steps(1500, "0.5") == 750
    assert scaled_steps(1100, 0.33) == 363 and scaled_steps(3, 0.01) == 1
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="step_scale must be a positive number"):
            scaled_steps(10, bad)


def test_choose_scale_fits_the_budget_and_is_capped():
    same = choose_scale(25, 1.0, 5, 20, 0.25)  # exactly the reference machine: everything fits at scale 1
    assert (same.scale, same.fits) == (1.0, True) and same.predicted_minutes == pytest.approx(25)
    fast = choose_scale(25, 0.5, 5, 20, 0.25)  # a faster machine never trains more than configured
    assert fast.scale == 1.0 and fast.predicted_minutes == pytest.approx(12.5)
    slow = choose_scale(20, 2.0, 5, 20, 0.25)  # 2 * (5 + s * 20) <= 20 -> s = 0.25
    assert slow.scale == pytest.approx(0.25) and slow.fits and slow.predicted_minutes <= 20 + 1e-9
    mid = choose_scale(20, 1.3, 5, 20, 0.1)  # floored to two decimals, so the prediction stays inside
    assert mid.scale == pytest.approx(0.51) and mid.predicted_minutes <= 20
    hopeless = choose_scale(20, 5.0, 5, 20, 0.25)  # the fixed part alone is over budget
    assert hopeless.scale == 0.25 and not hopeless.fits and hopeless.predicted_minutes == pytest.approx(50)
    with pytest.raises(ValueError, match="min_scale"):
        choose_scale(20, 1.0, 5, 20, 0.0)


def _cfg(tmp_path, **budget):
    return OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run")},
                             "time_budget": {"minutes": 20, "min_scale": 0.25, "recalibrate": False,
                                             "reference": REF, **budget}})  # fmt: skip


def test_decide_records_and_reuses_the_measured_scale(tmp_path):
    calls = []

    def measure(precision):
        calls.append(precision)
        return 130.0  # 1.3x the reference's probe

    rec = decide(_cfg(tmp_path), "32-true", measure)
    assert rec["step_scale"] == pytest.approx(0.51) and rec["ratio"] == pytest.approx(1.3) and not rec["reused"]
    saved = json.loads((tmp_path / "run" / RECORD).read_text())
    assert saved["step_scale"] == rec["step_scale"] and saved["precision"] == "32-true" and saved["machine"]
    # A second run of the same directory (resume, or a later stage) keeps the scale: no second probe.
    again = decide(_cfg(tmp_path), "32-true", lambda p: 1000.0)
    assert again["reused"] and again["step_scale"] == rec["step_scale"] and calls == ["32-true"]
    # A different budget, or recalibrate=true, measures again.
    assert decide(_cfg(tmp_path, minutes=30), "32-true", measure)["step_scale"] == 0.9
    assert decide(_cfg(tmp_path, minutes=30, recalibrate=True), "32-true", lambda p: 200.0)["step_scale"] == 0.5
    assert decide(OmegaConf.create({"paths": {"run_dir": str(tmp_path)}, "time_budget": {"minutes": None}}),
                  "32-true") is None  # fmt: skip


def test_a_budget_without_reference_figures_names_the_missing_keys(tmp_path):
    with pytest.raises(ValueError, match=r"time_budget.reference lacks \['probe_ms'"):
        decide(_cfg(tmp_path, reference={"fixed_minutes": 1.0, "training_minutes": 2.0}), "32-true", lambda p: 1.0)


def _compose(root: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="t"):
        return compose(config_name=root, overrides=overrides)


@pytest.mark.parametrize("stage,keys,full", [
    ("stage=feature_net", ["trainer.max_steps"], [1500]),
    ("stage=autoencoder", ["trainer.max_steps", "stage.module.loss.disc_start", "stage.module.total_steps"],
     [1500, 1100, 1500]),
    ("stage=diffusion", ["trainer.max_steps", "stage.module.total_steps"], [1500, 1500]),
    ("stage=classifier", ["trainer.max_steps"], [300]),
])  # fmt: skip
def test_stage_step_counts_follow_step_scale(tmp_path, stage, keys, full):
    base = ["experiment=fashion_mnist_quick", stage, f"paths.root_dir={tmp_path}"]
    one, half = _compose("train", base), _compose("train", [*base, "step_scale=0.5"])
    assert [OmegaConf.select(one, k) for k in keys] == full  # scale 1: the numbers as written
    assert [OmegaConf.select(half, k) for k in keys] == [round(n * 0.5) for n in full]
    assert stage_hash(one) != stage_hash(half)


def test_pipeline_run_passes_the_scale_to_training_steps_only(tmp_path, monkeypatch):
    import pipeline.time_budget as tb

    argv = ["experiment=fashion_mnist_quick", f"paths.root_dir={tmp_path}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        cfg = compose(config_name="run", overrides=accepted("run", [], argv))
        OmegaConf.resolve(cfg)
        ref = cfg.time_budget.reference
        monkeypatch.setattr(tb, "probe_ms", lambda precision: 1.25 * ref.probe_ms)  # 1.25x the reference's time
        steps = plan(cfg, argv)
        record = apply_time_budget(cfg, steps, argv)
        assert record["step_scale"] == choose_scale(20, 1.25, ref.fixed_minutes, ref.training_minutes,
                                                    cfg.time_budget.min_scale).scale
        scale = f"step_scale={record['step_scale']:g}"
        assert {s.name for s in steps if scale in s.overrides} == {
            "feature_net_perceptual", "feature_net_eval", "autoencoder", "diffusion", "classifier"}
        assert all(scale not in s.overrides for s in steps if s.root != "train")
        # The user's own step_scale wins: no probe, nothing added.
        argv2 = [*argv, "step_scale=0.3"]
        steps2 = plan(cfg, argv2)
        assert apply_time_budget(cfg, steps2, argv2) is None
        assert all(s.overrides.count("step_scale=0.3") == (s.root == "train") for s in steps2)


def test_cpu_description_reads_model_and_simd_flags():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
    info = cpu_info(text)
    assert info["model"] == "AMD EPYC 7B13" and info["simd"] == ["sse4_2", "avx", "avx2", "fma"]
    assert "AMD EPYC 7B13" in cpu_description(text, {}) and "avx512" not in cpu_description(text, {})


def test_cpu_description_names_kernel_caps():
    """A figure measured with AVX2 kernels emulated on an AVX512-BF16 CPU must not read as that CPU's own."""
    text = "model name\t: AMD EPYC\nflags\t\t: sse4_2 avx avx2 fma avx512f avx512_bf16\n"
    capped = cpu_description(text, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped.endswith("avx512_bf16; kernels capped: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)")
    assert "capped" not in cpu_description(text, {"ONEDNN_MAX_CPU_ISA": " "})


def test_the_over_budget_warning_says_by_how_much(tmp_path):
    """20.4 predicted minutes against 20 must not read "about 20 minutes, over the 20-minute budget"."""
    rec = decide(_cfg(tmp_path, min_scale=0.8), "32-true", lambda p: 100.0 * 20.4 / 21.0)  # 21 min at 0.8 on REF
    assert not rec["fits"] and rec["step_scale"] == 0.8 and rec["predicted_minutes"] == pytest.approx(20.4)
    text = describe(rec)
    assert "20.4 minutes, over the 20-minute budget" in text, text
