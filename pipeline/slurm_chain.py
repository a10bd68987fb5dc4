"""`pipeline.run launcher=slurm`: the stage DAG as a chain of sbatch jobs (afterok dependencies)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from pipeline.slurm import sbatch_command, submit, wait_for

REPO = Path(__file__).resolve().parents[1]


def stage_sbatch_argv(step, launcher: DictConfig, log_dir: Path, dependency: list[str]) -> list[str]:
    """sbatch argv for one step: distributed steps get one task per device on every node."""
    ntasks = int(launcher.ntasks_per_node) if step.distributed else 1
    nodes = int(launcher.nodes) if step.distributed else 1
    env = [f"GLDM_ENTRY={step.entry}", f"GLDM_ROOT={Path.cwd()}"]
    venv = launcher.get("venv") or (sys.prefix if sys.prefix != sys.base_prefix else None)
    if venv:
        env.append(f"GLDM_VENV={venv}")
    return sbatch_command(
        str(REPO / "slurm" / "stage.sbatch"),
        job_name=f"gldm-{step.name}",
        nodes=nodes,
        ntasks_per_node=ntasks,
        cpus_per_task=int(launcher.cpus_per_task),
        gres=f"gpu:{launcher.gpus_per_node}" if launcher.gpus_per_node and step.distributed else None,
        time=str(launcher.time),
        partition=launcher.partition,
        account=launcher.account,
        qos=launcher.qos,
        output=str(log_dir / f"{step.name}-%j.out"),
        dependency=dependency or None,
        extra=[f"--export=ALL,{','.join(env)}", *launcher.extra],
        args=step.argv,
    )


def submit_chain(steps: list, cfg: DictConfig, status: Callable) -> list[str]:
    """Submit every step that is not done (and everything downstream of one that is not)."""
    launcher = cfg.launcher
    log_dir = Path(launcher.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    rerun_upstream = False
    for step in steps:
        done, reason = status(step)
        if done and not rerun_upstream:
            print(f"[run] {step.name}: {reason}, skipping", flush=True)
            continue
        rerun_upstream = True
        job = submit(stage_sbatch_argv(step, launcher, log_dir, ids[-1:]))
        ids.append(job)
        print(f"[run] {step.name}: submitted job {job} ({reason}); log {log_dir / f'{step.name}-{job}.out'}", flush=True)
    if ids and launcher.wait:
        states = wait_for(ids, timeout=float(launcher.wait_timeout_s))
        print("[run] " + ", ".join(f"{j}: {s}" for j, s in states.items()), flush=True)
        failed = {j: s for j, s in states.items() if s != "COMPLETED"}
        if failed:
            raise SystemExit(f"[run] jobs did not complete: {failed}; logs in {log_dir}")
    return ids
