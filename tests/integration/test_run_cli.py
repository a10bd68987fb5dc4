"""pipeline.run: the stage DAG locally, skip/resume/re-run semantics, SIGKILL of the orchestrator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from core.processes import child_pids
from tests.conftest import REPO, cli_env, processes_running, run_cli, tiny_overrides

RUN = "default/fashion_mnist"


def test_unknown_stage_and_unknown_override_are_errors(tiny_data, tmp_path):
    out = run_cli("pipeline.run", "stages=[nope]", *tiny_overrides(tiny_data, tmp_path), check=False)
    assert out.returncode != 0 and "unknown ['nope']" in out.stderr
    out = run_cli("pipeline.run", "stages=[feature_net_eval]", "trainer.max_stepz=3",
                  *tiny_overrides(tiny_data, tmp_path), check=False)  # fmt: skip
    assert out.returncode != 0 and "trainer.max_stepz=3" in out.stderr


def test_skip_and_rerun_on_config_change(tiny_data, tmp_path):
    args = ["stages=[feature_net_perceptual,feature_net_eval]", "debug=fdr", *tiny_overrides(tiny_data, tmp_path)]
    first = run_cli("pipeline.run", *args)
    assert "feature_net_perceptual: running (not run yet)" in first.stdout
    again = run_cli("pipeline.run", *args)
    assert "feature_net_perceptual: done" in again.stdout and "feature_net_eval: done" in again.stdout
    changed = run_cli("pipeline.run", *args, "stage.module.max_shift=1")
    assert "feature_net_perceptual: running (config changed)" in changed.stdout
    assert (tmp_path / RUN / "logs" / "feature_net_eval.log").exists()


def test_sigkill_during_a_stage_then_restart_completes_without_redoing(tiny_data, tmp_path):
    common = ["debug=limit", "trainer.max_steps=150", "data.train_batches_per_epoch=1000",
              "stage.checkpoint_every_n_steps=5", *tiny_overrides(tiny_data, tmp_path)]  # fmt: skip
    run_cli("pipeline.run", "stages=[feature_net_perceptual]", *common)  # the first stage finishes
    args = ["stages=[feature_net_perceptual,feature_net_eval]", *common]
    perceptual_done = (tmp_path / RUN / "feature_net_perceptual" / "DONE").read_text()
    last = tmp_path / RUN / "feature_net_eval" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists()
    children = child_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the stage dies with the orchestrator, no orphan keeps training (a quiet stage too: tests/unit/test_processes.py)
    assert children and processes_running(children, within=10) == []
    assert not (tmp_path / RUN / "feature_net_eval" / "DONE").exists()
    out = run_cli("pipeline.run", *args)
    assert "feature_net_perceptual: done" in out.stdout
    assert "feature_net_eval: running (resuming)" in out.stdout and "resuming from" in out.stdout
    assert (tmp_path / RUN / "feature_net_perceptual" / "DONE").read_text() == perceptual_done
    assert json.loads((tmp_path / RUN / "feature_net_eval" / "DONE").read_text())["global_step"] == 150
