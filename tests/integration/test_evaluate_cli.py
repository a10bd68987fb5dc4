"""`python -m pipeline.evaluate` through the real CLI, on tiny random-weight checkpoints made here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_checkpoints as tiny
from tests.conftest import REPO, cli_env, run_cli, tiny_overrides

# 40 samples per setting: above the tiny feature net's 16 feature dimensions (FID's minimum is 17).
SMALL = ["num_samples=40", "batch_size=20", "sampler.num_steps=3", "grid_per_class=2", "progress=false"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """A runs dir whose default run holds tiny autoencoder, diffusion, classifier, eval feature-net ckpts."""
    runs = tmp_path_factory.mktemp("runs")
    paths = tiny.write_upstream_run(runs / "default" / "fashion_mnist")
    tiny.write_classifier(runs / "default" / "fashion_mnist" / "classifier" / "checkpoints" / "final.ckpt",
                          paths["fingerprint"])  # fmt: skip
    return runs


def evaluate(tiny_data: Path, runs: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("pipeline.evaluate", *tiny_overrides(tiny_data, runs), *SMALL, *extra, **kw)


def eval_dir(runs: Path, sweep: str) -> Path:
    return runs / "default" / "fashion_mnist" / "eval" / sweep


@pytest.fixture(scope="module")
def cfg_sweep(tiny_data, runs) -> subprocess.CompletedProcess:
    """A CFG sweep over s in {1, 3}: eval/cfg/ (shared by the tests below)."""
    return evaluate(tiny_data, runs, "guidance.scales=[1,3]")


def test_cfg_sweep_writes_every_artifact_and_rerun_skips(tiny_data, runs, cfg_sweep):
    sweep = eval_dir(runs, "cfg")
    for name in ("cfg_s1", "cfg_s3"):
        with np.load(sweep / name / "samples.npz") as f:  # guided-diffusion's layout
            assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (40, 32, 32, 1)
            assert f["arr_1"].tolist() == [i % 10 for i in range(40)]
        assert (sweep / name / "grid.png").read_bytes().startswith(PNG)
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        for key in ("fid", "is_mean", "precision", "recall", "class_accuracy"):
            assert np.isfinite(metrics[key]), key
        # What the numbers were computed with; sFID is n/a for the domain feature net (no spatial features).
        assert metrics["sfid"] is None and metrics["feature_net"] == "domain_feature_net"
        assert len(metrics["feature_weights_sha256"]) == 64 and metrics["reference"] == "split test (256 images)"
        assert metrics["is_convention"] == "10 splits of 4 samples (torch-fidelity, Salimans et al.)"
        assert metrics["num_samples"] == 40 and metrics["seeds"] == "0..39 (sample i: sample_seed + i)"
    rows = json.loads((sweep / "results.json").read_text())
    assert [(r["setting"], r["cfg_scale"]) for r in rows] == [("cfg_s1", 1.0), ("cfg_s3", 3.0)]
    assert (sweep / "results.csv").read_text().splitlines()[0].startswith("setting,guidance,cfg_scale")
    for plot in ("fid", "inception_score", "precision_recall", "fid_vs_is", "class_accuracy"):
        assert (sweep / "plots" / f"{plot}.png").read_bytes().startswith(PNG), plot
    report = (sweep / "report.md").read_text()
    assert (
        "](plots/fid.png)" in report and "](cfg_s3/grid.png)" in report and "DDIMSampler, 3 steps" in report
    )
    assert "| feature_net | domain_feature_net |" in report and "| is_convention | 10 splits" in report
    assert "report: " in cfg_sweep.stdout and "cfg_s3" in cfg_sweep.stdout.split("report: ")[0]
    assert not list(sweep.rglob("*.tmp")) and not list(sweep.rglob("parts"))

    finished = {p: p.stat().st_mtime_ns for p in sweep.glob("cfg_s*/*")}
    again = evaluate(tiny_data, runs, "guidance.scales=[1,3]")
    assert again.stdout.count("skipped (done with this config)") == 2
    assert finished == {p: p.stat().st_mtime_ns for p in sweep.glob("cfg_s*/*")}


def test_report_only_logs_to_wandb_offline(tiny_data, runs, cfg_sweep, ended_wandb_service, monkeypatch):
    monkeypatch.setenv("WANDB_SERVICE", ended_wandb_service)  # the caller's W&B service, ended: not used
    evaluate(tiny_data, runs, "report_only=true", "logger=wandb")
    offline = list((runs / "default" / "fashion_mnist" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    blob = b"".join(p.read_bytes() for p in offline[0].glob("*.wandb"))
    for key in (b"eval/results", b"eval/plots/fid", b"eval/grids/cfg_s3", b"evaluate"):
        assert key in blob, key


def test_classifier_and_both_sweeps(tiny_data, runs):
    # Two runs: guidance/classifier.yaml has no classifier-free `scales` (it reads none) for a multirun to set.
    run_cli("pipeline.evaluate", *tiny_overrides(tiny_data, runs), *SMALL, "guidance=classifier",
            "guidance.classifier_scales=[0,2]")  # fmt: skip
    run_cli("pipeline.evaluate", *tiny_overrides(tiny_data, runs), *SMALL, "guidance=both",
            "guidance.scales=[2]", "guidance.classifier_scales=[0,2]")  # fmt: skip
    rows = json.loads((eval_dir(runs, "classifier") / "results.json").read_text())
    assert [(r["setting"], r["cfg_scale"], r["cls_scale"]) for r in rows] == [
        ("cls_s0", None, 0),
        ("cls_s2", None, 2),
    ]
    rows = json.loads((eval_dir(runs, "both") / "results.json").read_text())
    assert [r["setting"] for r in rows] == ["both_s2_c0", "both_s2_c2"]
    assert all(0 <= r["class_accuracy"] <= 1 for r in rows)


def test_sweep_index_and_hydra_multirun(tiny_data, runs):
    evaluate(tiny_data, runs, "sweep_name=array", "sweep_index=1")
    sweep = eval_dir(runs, "array")
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["cfg_s1.5"]
    out = run_cli("pipeline.evaluate", "-m", *tiny_overrides(tiny_data, runs), *SMALL, "sweep_name=array",
                  "sweep_index=0,2")  # fmt: skip
    assert "#0 : " in out.stdout and "#1 : " in out.stdout  # Hydra's multirun job lines
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["cfg_s1", "cfg_s1.5", "cfg_s2"]
    rows = json.loads((sweep / "results.json").read_text())
    assert [r["setting"] for r in rows] == ["cfg_s1", "cfg_s1.5", "cfg_s2"]  # the last job merged all three


def test_two_ranks_split_the_samples_and_match_one_process(tiny_data, runs, cfg_sweep):
    common = [*tiny_overrides(tiny_data, runs), *SMALL, "guidance.scales=[3]", "batch_size=10"]
    procs = []
    for rank in (1, 0):
        env = cli_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.evaluate", *common, "sweep_name=two_ranks"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-4000:]
    assert "cfg_s3: sampled" in outputs[0][0] and "report:" not in outputs[0][0]  # rank 1 only samples
    # The single-process sweep (batch 20) drew the same samples: the noise of sample i comes from its own
    # seed whatever the batch (bit for bit: tests/unit/test_sweep.py's batch-independence test records every
    # draw), but float rounding of the U-Net and decoder depends on the batch a sample is computed in and on
    # the CPU's kernels (AVX2 and AVX512 differ), so a decoded pixel may land one uint8 level away. What
    # holds on every CPU: no pixel off by more than one level, and at most 0.1% of them.
    two, one = (
        np.load(eval_dir(runs, name) / "cfg_s3" / "samples.npz")["arr_0"].astype(int)
        for name in ("two_ranks", "cfg")
    )
    assert two.shape == one.shape == (40, 32, 32, 1)
    diff = np.abs(two - one)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())
    assert len({two[i].tobytes() for i in range(40)}) == 40  # each sample is its own draw, not one repeated
    fids = [json.loads((eval_dir(runs, name) / "cfg_s3" / "metrics.json").read_text())["fid"]
            for name in ("two_ranks", "cfg")]  # fmt: skip
    assert fids[0] == pytest.approx(fids[1], rel=1e-3, abs=1e-6)


def test_bad_input_exits_before_sampling(tiny_data, runs):
    proc = evaluate(tiny_data, runs, "sweep_name=bad", "guidance.scales=[]", check=False)
    assert proc.returncode != 0 and "guidance.scales is empty" in proc.stderr + proc.stdout
    assert not eval_dir(runs, "bad").exists() or not list(eval_dir(runs, "bad").glob("cfg_*"))
    proc = evaluate(tiny_data, runs, "sweep_name=bad_dtype", "sampling_dtype=int8", check=False)
    assert proc.returncode != 0 and "sampling_dtype='int8'" in proc.stderr and "'auto'" in proc.stderr
    assert not eval_dir(runs, "bad_dtype").exists() or not list(eval_dir(runs, "bad_dtype").glob("cfg_*"))


def test_auto_sampling_dtype_is_resolved_for_this_machine_and_recorded(tiny_data, runs):
    """sampling_dtype=auto (the CPU demo's): bf16 autocast where this CPU computes bf16 natively, else fp32;
    the setting's results row and hash record the resolved dtype, not "auto"."""
    from pipeline.resolvers import cpu_has_native_bf16

    evaluate(tiny_data, runs, "sweep_name=auto_dtype", "guidance.scales=[3]", "sampling_dtype=auto")
    row = json.loads((eval_dir(runs, "auto_dtype") / "cfg_s3" / "metrics.json").read_text())
    assert row["dtype"] == ("bf16" if cpu_has_native_bf16() else "fp32")
