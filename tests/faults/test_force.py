"""`force=true` retrains a finished stage from step 0; its old checkpoints and DONE are kept aside."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from tests.conftest import run_cli, tiny_overrides

STAGE = Path("default/fashion_mnist/feature_net_eval")
ARGS = ["stage=feature_net", "debug=limit"]  # 6 real steps, a checkpoint every 2


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_force_retrains_from_step_zero_and_keeps_the_old_state(tiny_data, tmp_path):
    stage = tmp_path / STAGE
    run_cli("pipeline.train", *ARGS, *tiny_overrides(tiny_data, tmp_path))
    done = json.loads((stage / "DONE").read_text())
    old = {name: _sha(stage / "checkpoints" / name) for name in ("last.ckpt", "final.ckpt")}
    old["DONE"], old["metrics.json"] = _sha(stage / "DONE"), _sha(stage / "metrics.json")

    out = run_cli("pipeline.train", *ARGS, *tiny_overrides(tiny_data, tmp_path), "force=true")
    assert "resuming from" not in out.stdout, out.stdout[-2000:]
    assert "force=true; its checkpoints, DONE and metrics moved to" in out.stdout
    # trained again from step 0: the CSV log of this run starts at the first step
    rows = list(csv.DictReader(open(stage / "csv" / "metrics.csv")))
    steps = sorted(int(r["step"]) for r in rows if r.get("train/loss"))
    assert steps and steps[0] == 0 and steps[-1] == 5, steps
    assert json.loads((stage / "DONE").read_text())["global_step"] == 6
    # the old state is kept aside, byte for byte, DONE included
    aside = stage / f"checkpoints.superseded-{done['config_hash'][:12]}"
    assert {name: _sha(aside / name) for name in old} == old
    # a plain re-run skips the freshly trained stage
    again = run_cli("pipeline.train", *ARGS, *tiny_overrides(tiny_data, tmp_path))
    assert "skipping" in again.stdout
