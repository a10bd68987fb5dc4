"""pipeline.run launcher=slurm on the real local Slurm cluster: an afterok chain of DDP stages under srun,
and preemption (USR1 -> checkpoint -> requeue -> resume, same W&B run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime

import pytest

from pipeline import slurm
from tests import tiny_checkpoints as tiny
from tests.conftest import cli_env, run_cli, tiny_overrides
from tests.integration.test_local_slurm import cluster  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.slurm
RUN = "default/fashion_mnist"
SLURM = ["launcher=slurm", "launcher.ntasks_per_node=2", "launcher.cpus_per_task=1", "trainer=ddp_cpu"]


def test_evaluation_sweep_is_an_array_job_then_a_report_job(cluster, tiny_data, tmp_path):  # noqa: F811
    run = tmp_path / RUN
    tiny.write_upstream_run(run)
    out = run_cli("pipeline.run", "stages=[evaluate]", "launcher=slurm", "launcher.wait=true",
                  "launcher.cpus_per_task=1", "guidance.scales=[1,3]", "num_samples=40", "batch_size=20",
                  "sampler.num_steps=3", "grid_per_class=2", "progress=false",
                  *tiny_overrides(tiny_data, tmp_path), timeout=900)  # fmt: skip
    array = re.search(r"evaluate: submitted array job (\d+) \(2 sweep settings", out.stdout)
    report = re.search(r"evaluate_report: submitted job (\d+)", out.stdout)
    assert array and report, out.stdout[-3000:]
    logs = sorted((run / "logs").glob(f"evaluate-{array.group(1)}_*.out"))
    assert len(logs) == 2, [p.name for p in (run / "logs").iterdir()]
    # afterok on the whole array: the report job started only after both tasks had finished their logs.
    report_log = (run / "logs" / f"evaluate_report-{report.group(1)}.out").read_text()
    started = datetime.fromisoformat(re.match(r"\[([^\]]+)\] job", report_log).group(1)).timestamp()
    assert all(p.stat().st_mtime <= started + 1.0 for p in logs), (started, [p.stat().st_mtime for p in logs])
    texts = [p.read_text() for p in logs]  # task i (sweep_index=i) evaluated setting i, and only that one
    assert [("cfg_s1: sampled" in t, "cfg_s3: sampled" in t) for t in texts] == [(True, False), (False, True)]
    sweep = run / "eval" / "cfg"
    for setting in ("cfg_s1", "cfg_s3"):  # each written by its own array task
        assert json.loads((sweep / setting / "metrics.json").read_text())["num_samples"] == 40
    rows = json.loads((sweep / "results.json").read_text())  # merged by the report job
    assert [r["setting"] for r in rows] == ["cfg_s1", "cfg_s3"] and (sweep / "report.md").exists()


def test_chain_runs_in_order_with_ddp_under_srun(cluster, tiny_data, tmp_path):  # noqa: F811
    out = run_cli("pipeline.run", "stages=[feature_net_perceptual,feature_net_eval]", "debug=fdr",
                  "launcher.wait=true", *SLURM, *tiny_overrides(tiny_data, tmp_path), timeout=900)  # fmt: skip
    ids = re.findall(r"submitted job (\d+)", out.stdout)
    assert len(ids) == 2
    second = subprocess.run(["scontrol", "show", "job", "-o", ids[1]], capture_output=True, text=True).stdout
    assert f"afterok:{ids[0]}" in second or "Dependency=(null)" in second  # satisfied deps are cleared
    run = tmp_path / RUN
    done = [json.loads((run / s / "DONE").read_text()) for s in ("feature_net_perceptual", "feature_net_eval")]
    assert all(d["stage"] == "feature_net" for d in done)
    logs = {p.name: p.read_text() for p in (run / "logs").glob("*.out")}
    first_log = next(v for k, v in logs.items() if k.startswith("feature_net_perceptual"))
    second_log = next(v for k, v in logs.items() if k.startswith("feature_net_eval"))
    assert "GLOBAL_RANK: 1" in first_log and "MEMBER: 2/2" in first_log  # Lightning DDP over srun's 2 tasks
    start2 = (run / "feature_net_eval" / "STARTED").stat().st_mtime
    assert (run / "feature_net_perceptual" / "DONE").stat().st_mtime <= start2
    assert "Traceback" not in second_log


@pytest.fixture
def caller_wandb_service(tmp_path_factory):
    """WANDB_SERVICE of a live process that used W&B (a notebook that submits the pipeline): its service
    would hold the stream of a job killed by the requeue, and the requeued job found its run ID "in use"."""
    pytest.importorskip("wandb")
    code = ("import os, sys, wandb; wandb.init(mode='offline', dir=sys.argv[1], project='caller').finish(); "
            "print(os.environ['WANDB_SERVICE'], flush=True); sys.stdin.read()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path_factory.mktemp("caller"))], env=cli_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()  # the caller ends
        proc.wait(timeout=120)


def test_usr1_preemption_requeues_and_resumes_same_wandb_run(cluster, tiny_data, tmp_path, caller_wandb_service,  # noqa: F811
                                                             monkeypatch):  # fmt: skip
    monkeypatch.setenv("WANDB_SERVICE", caller_wandb_service)
    # enough steps that training is still running when the signal arrives, even on a slow machine
    args = ["stages=[feature_net_eval]", "debug=limit", "trainer.max_steps=300", "data.train_batches_per_epoch=1000",
            "stage.checkpoint_every_n_steps=5", "requeue_check_every_n_steps=5", *SLURM,
            f"paths.data_dir={tiny_data}", f"paths.runs_dir={tmp_path}", "logger=wandb"]  # fmt: skip
    out = run_cli("pipeline.run", *args)
    job = re.findall(r"submitted job (\d+)", out.stdout)[0]
    last = tmp_path / RUN / "feature_net_eval" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert last.exists(), "the job wrote no checkpoint"
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    logs = tmp_path / RUN / "logs"
    try:
        states = slurm.wait_for(job, timeout=600)
    except TimeoutError as error:  # say where the job stands, not only that it is late
        tails = {p.name: p.read_text()[-3000:] for p in sorted(logs.glob(f"*-{job}.*"))}
        subprocess.run(["scancel", job], check=False)
        raise AssertionError(f"{error}; job logs: {tails}") from error
    assert states[job] == "COMPLETED"
    log = next(logs.glob(f"feature_net_eval-{job}.out")).read_text()
    assert "restart 1" in log, log[-3000:]
    # all ranks stopped at one step after the checkpoint (no save inside the signal handler), rank 0 requeued,
    # and the requeued job resumed from that checkpoint
    assert "[preemption] signal" in log and "requeueing Slurm job" in log and "hpc_ckpt_1.ckpt" in log, log[-3000:]
    assert "resuming from" in log and "Traceback" not in log, log[-3000:]
    done = json.loads((tmp_path / RUN / "feature_net_eval" / "DONE").read_text())
    assert done["global_step"] == 300
    runs = list((tmp_path / RUN / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1, runs
