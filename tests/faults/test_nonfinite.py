"""NaN in a training loss, through the real CLI (issue 13; `StageModule.finite_or_skip`): the stage stops
before the update with an error naming the step and the term, exits non-zero, writes no DONE and leaves the
last good checkpoint as it was; with `nonfinite_tolerance=K` up to K bad batches are skipped and logged.
The NaN comes from `inject/sitecustomize.py` (test-only): the k-th training forward of the stage's network
returns NaN, so the loss of that batch is NaN."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_DIFFUSION, tiny_overrides
from tests.faults.injection import output, train_with_fault, write_upstream

NETS = {"diffusion": ("lightning_modules.nets.unet:UNet", "diffusion_loss"),
        "classifier": ("lightning_modules.nets.classifier:NoisyLatentClassifier", "cross_entropy"),
        "feature_net": ("lightning_modules.nets.feature_net:FeatureNet", "cross_entropy")}  # fmt: skip
DIRS = {"feature_net": "feature_net_eval"}  # the others: the stage name


def run_with_nan(stage: str, data: Path, runs: Path, *extra: str):
    """debug=limit (6 steps, last.ckpt every 2); the 4th training batch (global step 3) gets a NaN loss."""
    write_upstream(stage, runs / "default" / "fashion_mnist")
    net, _ = NETS[stage]
    small = SMALL_DIFFUSION if stage == "diffusion" else ()
    return train_with_fault(f"stage={stage}", "debug=limit", *small, *extra, *tiny_overrides(data, runs),
                            FAULT_NAN_FORWARD=net, FAULT_NAN_CALL="4")  # fmt: skip


@pytest.mark.parametrize("stage", ["diffusion", "classifier", "feature_net"])
def test_nan_loss_stops_the_stage_naming_step_and_term_and_keeps_the_last_checkpoint(stage, tiny_data, tmp_path):
    proc = run_with_nan(stage, tiny_data, tmp_path)
    assert proc.returncode != 0, output(proc)
    term = NETS[stage][1]
    assert "non-finite loss term(s) at step 3" in proc.stderr and f"'{term}': nan" in proc.stderr, output(proc)
    stage_dir = tmp_path / "default" / "fashion_mnist" / DIRS.get(stage, stage)
    assert not (stage_dir / "DONE").exists()
    assert not (stage_dir / "checkpoints" / "final.ckpt").exists()
    last = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # saved before the bad batch, never overwritten after it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_tolerance_skips_the_bad_batch_logs_it_and_finishes(tiny_data, tmp_path):
    proc = run_with_nan("diffusion", tiny_data, tmp_path, "nonfinite_tolerance=1")
    assert proc.returncode == 0, output(proc)
    assert "non-finite loss term(s) at step 3" in proc.stdout and "batch skipped (1/1 allowed)" in proc.stdout
    stage_dir = tmp_path / "default" / "fashion_mnist" / "diffusion"
    done = json.loads((stage_dir / "DONE").read_text())
    assert done["global_step"] == 6
    rows = list(csv.DictReader(open(stage_dir / "csv" / "metrics.csv")))
    assert {float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")} == {1.0}
    final = torch.load(stage_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())
    assert int(final["state_dict"]["ema.num_updates"]) == 5  # the skipped batch changed nothing, EMA included
