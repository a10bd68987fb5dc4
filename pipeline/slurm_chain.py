"""`pipeline.run launcher=slurm`: the stage DAG as a chain of sbatch jobs (afterok dependencies).

Training stages are one job each (srun, one task per device). An evaluation step becomes an array job,
task i evaluating sweep setting i (`slurm/eval_array.sbatch`, `sweep_index=i`), followed by a
`report_only=true` job (afterok on the whole array) that merges the settings into results, plots,
`report.md` and W&B. `launcher.eval_array=false` submits the sweep as one job instead. Prepare likewise
becomes an array of `launcher.prepare_tasks` tasks (`slurm/prepare_array.sbatch`, `shard_task=i`: a
contiguous range of the planned shards each) followed by a `manifest_only=true` job; the later steps
depend on that job (also `python -m pipeline.prepare launcher=slurm`, `submit_prepare`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig

from core.processes import PROCESS_LOCAL_ENV
from pipeline.slurm import sbatch_command, submit, wait_for

REPO = Path(__file__).resolve().parents[1]


def exported_names(patterns: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The variables of the submitting environment a job gets, by name (`launcher.export_env`; `PREFIX*`
    matches by prefix). Only names travel on sbatch's command line: sbatch reads their values itself, and
    every other variable (tokens the job does not need included) stays out of the job, and so does the
    address of a service of the submitting process (`core.processes.PROCESS_LOCAL_ENV`), whatever matches."""
    env = os.environ if environ is None else environ
    names: dict[str, None] = {}
    for pattern in patterns:
        pattern = str(pattern)
        matches = [k for k in sorted(env) if k.startswith(pattern[:-1])] if pattern.endswith("*") else (
            [pattern] if pattern in env else [])  # fmt: skip
        names.update(dict.fromkeys(m for m in matches if m not in PROCESS_LOCAL_ENV))
    return list(names)


def _launcher_argv(script: str, step, launcher: DictConfig, dependency: list[str], entry: str | None,
                   **job) -> list[str]:  # fmt: skip
    """sbatch argv of `script` for `step` with the launcher's shared options (partition, account, qos, time,
    cpus, extra flags, the environment: the GLDM_* variables and the names in `launcher.export_env`, never
    ALL); `job` holds what differs per job kind."""
    env = ([f"GLDM_ENTRY={entry}"] if entry else []) + [f"GLDM_ROOT={Path.cwd()}"]
    venv = launcher.get("venv") or (sys.prefix if sys.prefix != sys.base_prefix else None)
    if venv:
        env.append(f"GLDM_VENV={venv}")
    env += exported_names(launcher.get("export_env") or [])
    return sbatch_command(
        str(REPO / "slurm" / script),
        job_name=f"gldm-{step.name}",
        cpus_per_task=int(launcher.cpus_per_task),
        time=str(launcher.time),
        partition=launcher.partition,
        account=launcher.account,
        qos=launcher.qos,
        dependency=dependency or None,
        extra=[f"--export={','.join(env)}", *launcher.extra],
        args=step.argv,
        **job,
    )


def stage_sbatch_argv(step, launcher: DictConfig, log_dir: Path, dependency: list[str]) -> list[str]:
    """sbatch argv for one step: distributed steps get one task per device on every node."""
    return _launcher_argv(
        "stage.sbatch",
        step,
        launcher,
        dependency,
        step.entry,
        nodes=int(launcher.nodes) if step.distributed else 1,
        ntasks_per_node=int(launcher.ntasks_per_node) if step.distributed else 1,
        gres=f"gpu:{launcher.gpus_per_node}" if launcher.gpus_per_node and step.distributed else None,
        output=str(log_dir / f"{step.name}-%j.out"),
    )


def sweep_size(step) -> int:
    """Number of settings in an evaluation step's sweep (guidance settings x sampler chains)."""
    from pipeline.evaluate import sweep_points

    return len(sweep_points(compose(config_name=step.root, overrides=step.argv), for_count=True))


def eval_array_argv(step, launcher: DictConfig, log_dir: Path, dependency: list[str], n: int) -> list[str]:
    """sbatch argv for a sweep as an array of n tasks (one setting, one device each)."""
    parallel = launcher.get("eval_array_parallel")
    return _launcher_argv(
        "eval_array.sbatch",
        step,
        launcher,
        dependency,
        None,  # the script runs pipeline.evaluate itself
        nodes=1,
        ntasks_per_node=1,
        gres="gpu:1" if launcher.gpus_per_node else None,
        output=str(log_dir / f"{step.name}-%A_%a.out"),
        array=f"0-{n - 1}" + (f"%{int(parallel)}" if parallel else ""),
    )


# The keys by which submit_prepare_step tells each prepare job its part; a user's value would contradict it.
PREPARE_PART_KEYS = ("shard_task", "shard_tasks", "manifest_only")


def prepare_tasks(cfg: DictConfig, launcher: DictConfig) -> int:
    """The number of array tasks for the prepare of config `cfg`: min(`launcher.prepare_tasks`, shards), or
    0 for one plain job (a finished manifest of this config to verify, existing shards to scan, a single
    task). Plans the shards, so a bad source (a missing folder, one with no images) or a manifest of another
    config fails here, before any sbatch."""
    from datamodules.shards import existing_manifest
    from pipeline.prepare import dataset_plan, is_scan, prepare_config

    wanted = launcher.get("prepare_tasks", 1)
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ValueError(f"launcher.prepare_tasks={wanted!r}: expected an integer >= 1 (1: prepare as one job)")
    if is_scan(cfg):
        root = Path(cfg.data.source.root)
        if not root.is_dir():
            raise FileNotFoundError(f"no shard folder {root} (data.source.root)")
        return 0
    if existing_manifest(cfg.data.dir, prepare_config(cfg), bool(cfg.force)) is not None:
        return 0
    n = min(wanted, len(dataset_plan(cfg).shards))
    return n if n > 1 else 0


def prepare_array_argv(step, launcher: DictConfig, log_dir: Path, dependency: list[str], n: int) -> list[str]:
    """sbatch argv for prepare as an array of n tasks (task i: `shard_task=i`, one CPU-only task each)."""
    return _launcher_argv(
        "prepare_array.sbatch",
        step,
        launcher,
        dependency,
        None,  # the script runs pipeline.prepare itself
        nodes=1,
        ntasks_per_node=1,
        gres=None,
        output=str(log_dir / f"{step.name}-%A_%a.out"),
        array=f"0-{n - 1}",
    )


def submit_prepare_step(step, launcher: DictConfig, log_dir: Path, dependency: list[str], tasks: int,
                        reason: str) -> list[str]:  # fmt: skip
    """Submit prepare: one job (`tasks` = 0), or an array of `tasks` shard-range tasks and the manifest job
    after it (afterok). Returns the job ids; the last one is what later steps depend on."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in step.overrides}
    step = replace(step, overrides=[o for o in step.overrides
                                    if o.lstrip("+~").split("=", 1)[0] not in PREPARE_PART_KEYS])  # fmt: skip
    if "num_workers" not in keys:  # each job writes with the CPUs it was given (launcher.cpus_per_task)
        step = replace(step, overrides=[*step.overrides, "num_workers=auto"])
    if tasks == 0:
        job = submit(stage_sbatch_argv(step, launcher, log_dir, dependency))
        print(f"[run] {step.name}: submitted job {job} ({reason}); log {log_dir / f'{step.name}-{job}.out'}", flush=True)
        return [job]
    array_step = replace(step, overrides=[*step.overrides, f"shard_tasks={tasks}"])
    array = submit(prepare_array_argv(array_step, launcher, log_dir, dependency, tasks))
    print(f"[run] {step.name}: submitted array job {array} ({tasks} shard ranges, {reason}); "
          f"logs {log_dir / f'{step.name}-{array}_<i>.out'}", flush=True)  # fmt: skip
    manifest_step = replace(step, name=f"{step.name}_manifest", overrides=[*step.overrides, "manifest_only=true"])
    job = submit(stage_sbatch_argv(manifest_step, launcher, log_dir, [array]))
    print(f"[run] {manifest_step.name}: submitted job {job} (after array {array}); "
          f"log {log_dir / f'{manifest_step.name}-{job}.out'}", flush=True)  # fmt: skip
    return [array, job]


def submit_prepare(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """`python -m pipeline.prepare ... launcher=slurm`: prepare's jobs (see `submit_prepare_step`), each
    running `pipeline.prepare` with `overrides` (the command line less the launcher's)."""
    from pipeline.run import Step

    launcher = cfg.launcher
    tasks = prepare_tasks(cfg, launcher)  # every check before the first sbatch
    log_dir = Path(launcher.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    step = Step("prepare", "pipeline.prepare", "prepare", [], False, list(overrides))
    ids = submit_prepare_step(step, launcher, log_dir, [], tasks, "launcher=slurm")
    wait_if_asked(ids, launcher, log_dir)
    return ids


def wait_if_asked(ids: list[str], launcher: DictConfig, log_dir: Path) -> None:
    """With `launcher.wait`, block until the jobs are final; exit with an error naming any that failed."""
    if ids and launcher.wait:
        states = wait_for(ids, timeout=float(launcher.wait_timeout_s))
        print("[run] " + ", ".join(f"{j}: {s}" for j, s in states.items()), flush=True)
        failed = {j: s for j, s in states.items() if s != "COMPLETED"}
        if failed:
            raise SystemExit(f"[run] jobs did not complete: {failed}; logs in {log_dir}")


def submit_chain(steps: list, cfg: DictConfig, status: Callable) -> list[str]:
    """Submit every step that is not done (and everything downstream of one that is not)."""
    launcher = cfg.launcher
    log_dir = Path(launcher.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    # Every sweep composed and checked (duplicated settings refused), and the shards planned (a bad source
    # refused), before the first sbatch.
    sizes = {s.name: sweep_size(s) for s in steps if s.entry == "pipeline.evaluate"}
    shard_tasks = {s.name: prepare_tasks(compose(config_name=s.root, overrides=s.argv), launcher)
                   for s in steps if s.entry == "pipeline.prepare"}  # fmt: skip
    ids: list[str] = []
    rerun_upstream = False
    for step in steps:
        done, reason = status(step)
        if done and not rerun_upstream:
            print(f"[run] {step.name}: {reason}, skipping", flush=True)
            continue
        rerun_upstream = True
        if step.entry == "pipeline.prepare":
            ids += submit_prepare_step(step, launcher, log_dir, ids[-1:], shard_tasks[step.name], reason)
            continue
        if step.entry == "pipeline.evaluate" and launcher.get("eval_array", True):
            n = sizes[step.name]
            array = submit(eval_array_argv(step, launcher, log_dir, ids[-1:], n))
            ids.append(array)
            print(f"[run] {step.name}: submitted array job {array} ({n} sweep settings, {reason}); "
                  f"logs {log_dir / f'{step.name}-{array}_<i>.out'}", flush=True)  # fmt: skip
            step = replace(step, name=f"{step.name}_report", args=[*step.args, "report_only=true"])
            reason = f"after array {array}"
        job = submit(stage_sbatch_argv(step, launcher, log_dir, ids[-1:]))
        ids.append(job)
        print(f"[run] {step.name}: submitted job {job} ({reason}); log {log_dir / f'{step.name}-{job}.out'}", flush=True)
    wait_if_asked(ids, launcher, log_dir)
    return ids
