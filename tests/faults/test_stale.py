"""Faults that used to give stale or clobbered results (issue 13, item 6), injected through the real CLIs:
a changed reference split (FID reference statistics reused), a duplicated sweep setting (two tasks of one
Slurm array sharing a folder)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests import tiny_checkpoints as tiny
from tests.conftest import REPO, run_cli, tiny_overrides

# 40 samples per setting: above the tiny feature net's 16 feature dimensions (FID's minimum is 17).
SMALL = ["num_samples=40", "batch_size=20", "sampler.num_steps=2", "grid_per_class=2", "progress=false"]
RUN = Path("default") / "fashion_mnist"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    tiny.write_upstream_run(runs / RUN)
    return runs


def _metrics(runs: Path, sweep: str, setting: str) -> dict:
    return json.loads((runs / RUN / "eval" / sweep / setting / "metrics.json").read_text())


def test_changed_reference_split_computes_new_statistics_and_rescores(tiny_data, runs):
    common = [*tiny_overrides(tiny_data, runs), *SMALL, "guidance.scales=[3]", "sweep_name=ref"]
    cache = tiny_data / "fashion_mnist" / "fid_stats"
    run_cli("pipeline.evaluate", *common, "reference.split=test")
    on_test = _metrics(runs, "ref", "cfg_s3")
    test_files = sorted(cache.glob("ref_*.npz"))
    assert len(test_files) == 1

    out = run_cli("pipeline.evaluate", *common, "reference.split=val")
    assert "skipped (done with this config)" not in out.stdout  # the scores were against the test split
    val_files = sorted(set(cache.glob("ref_*.npz")) - set(test_files))
    assert len(val_files) == 1, sorted(cache.iterdir())  # new statistics, the test split's kept
    assert test_files[0].name.startswith("ref_test_") and val_files[0].name.startswith("ref_val_")
    with np.load(val_files[0]) as f:
        assert int(f["n"]) == 64  # the tiny val split, not the 256 test images
    on_val = _metrics(runs, "ref", "cfg_s3")
    assert on_val["fid"] != on_test["fid"] and on_val["config_hash"] != on_test["config_hash"]
    assert on_val["samples_hash"] == on_test["samples_hash"]  # same samples, only scored again

    # Back to the test split: its cached statistics are reused and give the first score again.
    mtime = test_files[0].stat().st_mtime_ns
    run_cli("pipeline.evaluate", *common, "reference.split=test")
    assert test_files[0].stat().st_mtime_ns == mtime
    assert _metrics(runs, "ref", "cfg_s3")["fid"] == pytest.approx(on_test["fid"], rel=1e-9)


def test_duplicated_scale_is_refused_before_anything_is_written(tiny_data, runs):
    proc = run_cli("pipeline.evaluate", *tiny_overrides(tiny_data, runs), *SMALL, "guidance.scales=[1,3,3.0]",
                   "sweep_name=dup", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "duplicated sweep setting: cfg_s3 (cfg_scale=3.0" in proc.stderr and "2 times" in proc.stderr
    assert not (runs / RUN / "eval" / "dup").exists() or not any((runs / RUN / "eval" / "dup").rglob("*.npz"))


def test_duplicated_scale_is_refused_by_pipeline_run_before_any_stage_runs(tiny_data, runs):
    proc = run_cli("pipeline.run", "stages=[evaluate]", "guidance.scales=[3,1,3]", *SMALL,
                   *tiny_overrides(tiny_data, runs), check=False)  # fmt: skip
    assert proc.returncode != 0 and "duplicated sweep setting: cfg_s3" in proc.stderr, proc.stdout[-2000:]
    assert ": running" not in proc.stdout  # refused while planning, not by the evaluate step


def _fake_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose `sbatch` only records its command line (and answers a job id): nothing is submitted."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_duplicated_scale_under_the_slurm_array_is_refused_before_sbatch(tiny_data, runs, tmp_path, monkeypatch):
    path, calls = _fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", path["PATH"])
    proc = run_cli("pipeline.run", "stages=[evaluate]", "launcher=slurm", "launcher.wait=false",
                   "guidance.scales=[1,3,3]", *SMALL, *tiny_overrides(tiny_data, runs), check=False)  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "duplicated sweep setting: cfg_s3" in proc.stderr
    assert not calls.exists(), calls.read_text()  # no array job (or any job) was submitted
    # The same fake sbatch does receive a valid sweep, as an array of 2 tasks: the refusal above is the check.
    ok = run_cli("pipeline.run", "stages=[evaluate]", "launcher=slurm", "launcher.wait=false",
                 "guidance.scales=[1,3]", *SMALL, *tiny_overrides(tiny_data, runs))  # fmt: skip
    assert "--array=0-1" in calls.read_text() and "submitted array job 4242 (2 sweep settings" in ok.stdout


def test_submit_chain_checks_every_sweep_before_the_first_sbatch(tmp_path, monkeypatch):
    """Called directly (not through pipeline.run's own check), the chain refuses before submitting the
    training step that comes before the sweep."""
    from pipeline import slurm_chain
    from pipeline.run import Step

    submitted: list = []
    monkeypatch.setattr(slurm_chain, "submit", lambda argv: submitted.append(argv) or "1")
    launcher = {"log_dir": str(tmp_path / "logs"), "partition": None, "account": None, "qos": None,
                "time": "1:00:00", "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "gpus_per_node": 0,
                "extra": [], "venv": None, "eval_array": True, "wait": False}  # fmt: skip
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"launcher": launcher})
    steps = [Step("diffusion", "pipeline.train", "train", ["stage=diffusion"], True),
             Step("evaluate", "pipeline.evaluate", "evaluate", [], False, ["guidance.scales=[2,2]"])]  # fmt: skip
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            with pytest.raises(ValueError, match=r"duplicated sweep setting: cfg_s2 .* 2 times"):
                slurm_chain.submit_chain(steps, cfg, lambda step: (False, "not run yet"))
    finally:
        GlobalHydra.instance().clear()
    assert submitted == []
