"""`python -m pipeline.run experiment=...`: the whole pipeline as one resumable command.

prepare -> feature_net (perceptual, eval) -> autoencoder -> diffusion -> classifier -> evaluate, in
one stable run directory. Each step is its own process (the same entry points a user runs by hand),
so a crash or SIGKILL of this command loses nothing: finished stages have DONE markers and are
skipped, an interrupted stage resumes from its last.ckpt, a stage whose config or upstream changed
is re-run and says why. With `launcher=slurm` the steps become a chain of sbatch jobs instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from core.processes import die_with_parent
from core.secrets import scrub_argv, scrub_text
from pipeline.builders import stage_hash, upstream_dirs
from pipeline.common import read_done

RUN_ONLY_KEYS = ("stages", "launcher", "pipeline", "hydra", "time_budget")
CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Step:
    name: str
    entry: str
    root: str
    args: list[str]
    distributed: bool
    overrides: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return [*self.args, *self.overrides]

    @property
    def command(self) -> str:
        """The step's command line for printing and logs, credentials masked (`core.secrets`)."""
        return " ".join(["python", "-m", self.entry, *scrub_argv(self.argv)])


def forwarded_overrides(argv: list[str]) -> list[str]:
    """The command-line overrides minus the ones that only concern the orchestrator."""
    keep = []
    for o in argv:
        key = o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]
        if key not in RUN_ONLY_KEYS:
            keep.append(o)
    return keep


def accepted(root: str, base: list[str], overrides: list[str]) -> list[str]:
    """The overrides that config `root` understands (e.g. trainer.* is meaningless to prepare)."""
    ok = []
    # Group choices first (`launcher=slurm` before `launcher.wait=true`), whatever order they were typed in.
    for o in sorted(overrides, key=lambda o: "." in o.split("=", 1)[0]):
        try:
            compose(config_name=root, overrides=[*base, *ok, o])
            ok.append(o)
        except Exception:  # noqa: BLE001 - any composition error means "not for this step"
            continue
    return ok


def plan(cfg: DictConfig, argv: list[str]) -> list[Step]:
    table = cfg.pipeline
    names = list(cfg.stages) if cfg.stages else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"stages={names}: unknown {unknown}; choose from {list(table)}")
    overrides = forwarded_overrides(argv)
    steps, used = [], set(accepted("run", [], argv))
    for name in table:  # DAG order, whatever order the user listed them in
        s = table[name]
        step = Step(name, s.entry, s.root, list(s.args), bool(s.distributed))
        step.overrides = accepted(step.root, step.args, overrides)
        # An override is checked against every stage of the DAG, not only those run now: the same
        # command line (evaluation settings included) may re-run any subset with `stages=[...]`.
        used |= set(step.overrides)
        if name in names:
            steps.append(step)
    ignored = [o for o in argv if o not in used]
    if ignored:
        raise ValueError(f"no stage understands the override(s) {scrub_argv(ignored)}: check the key names")
    return steps


def status(step: Step) -> tuple[bool, str]:
    """(done, reason): whether a training step's DONE marker matches its current config."""
    if step.entry != "pipeline.train":
        return False, "checks its own outputs"
    cfg = compose(config_name=step.root, overrides=step.argv)
    done = read_done(cfg.stage.dir)
    if done is None:
        return False, "not run yet" if not Path(cfg.stage.dir, "checkpoints", "last.ckpt").exists() else "resuming"
    if done.get("config_hash") == stage_hash(cfg):
        return True, f"done ({done['config_hash'][:12]})"
    for name, path in upstream_dirs(cfg).items():
        now = (read_done(path) or {}).get("config_hash")
        if (done.get("upstream") or {}).get(name) != now:
            return False, f"upstream {name} changed"
    return False, "config changed"


def run_local(steps: list[Step], log_dir: Path) -> list[tuple[str, str, float]]:
    """Run each step as a child process (killed with us), tee its output to <log_dir>/<step>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, step in enumerate(steps, 1):
        done, reason = status(step)
        head = f"[run] ({i}/{len(steps)}) {step.name}"
        if done:
            print(f"{head}: {reason}, skipping", flush=True)
            summary.append((step.name, "skipped", 0.0))
            continue
        print(f"{head}: running ({reason}): {step.command}", flush=True)
        t0 = time.time()
        with open(log_dir / f"{step.name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", step.entry, *step.argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)  # fmt: skip
            for line in proc.stdout:  # a stage's messages may echo a URL or an override: masked here too
                line = scrub_text(line)
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        took = time.time() - t0
        if rc != 0:
            raise SystemExit(f"{head} failed (exit {rc}) after {took:.0f}s; log: {log_dir / f'{step.name}.log'}")
        print(f"{head}: finished in {took:.0f}s", flush=True)
        summary.append((step.name, "ran", took))
    return summary


def check_sweeps(steps: list[Step]) -> None:
    """Compose every evaluation step's sweep now, so a bad one (e.g. a duplicated scale,
    `eval.settings.check_unique_settings`) is refused before any stage runs or any job is submitted."""
    from pipeline.slurm_chain import sweep_size

    for step in steps:
        if step.entry == "pipeline.evaluate":
            sweep_size(step)


def apply_time_budget(cfg: DictConfig, steps: list[Step], argv: list[str]) -> dict | None:
    """`time_budget.minutes`: measure (or reuse) the step scale and pass `step_scale=<s>` to every training
    step (pipeline/time_budget.py). Not when the command line sets step_scale itself, nor under Slurm (the
    probe would time the login node), nor when the stages train on an accelerator other than the CPU."""
    from pipeline.time_budget import decide, describe

    train = [s for s in steps if s.root == "train"]
    if not train or cfg.get("time_budget", {}).get("minutes") is None:
        return None
    if any(o.lstrip("+~").split("=", 1)[0] == "step_scale" for o in argv):
        print("[run] time budget: step_scale set on the command line, no probe", flush=True)
        return None
    if cfg.launcher.name != "local":
        print(f"[run] time budget: not applied with launcher={cfg.launcher.name} (the probe would time this "
              "node, not the compute nodes); pass step_scale=<s> to scale the steps", flush=True)  # fmt: skip
        return None
    trainer = compose(config_name=train[0].root, overrides=train[0].argv).trainer
    if str(trainer.accelerator) not in ("cpu", "auto") or torch.cuda.is_available():
        print(f"[run] time budget: for CPU runs; trainer.accelerator={trainer.accelerator}, not applied", flush=True)
        return None
    record = decide(cfg, str(trainer.precision))
    print(describe(record), flush=True)
    for step in train:
        step.overrides.append(f"step_scale={record['step_scale']:g}")
    return record


def run(cfg: DictConfig, argv: list[str]) -> None:
    steps = plan(cfg, argv)
    check_sweeps(steps)
    print(f"[run] {cfg.experiment_name}/{cfg.run_name} -> {cfg.paths.run_dir}: {[s.name for s in steps]}", flush=True)
    budget = apply_time_budget(cfg, steps, argv)
    if cfg.launcher.name == "slurm":
        from pipeline.slurm_chain import submit_chain

        submit_chain(steps, cfg, status)
        return
    t0 = time.time()
    summary = run_local(steps, Path(cfg.launcher.log_dir))
    print("\n[run] stage                    status    seconds")
    for name, state, took in summary:
        print(f"[run] {name:<24} {state:<9} {took:7.0f}")
    print(f"[run] total {time.time() - t0:.0f}s; outputs in {cfg.paths.run_dir}")
    if budget:
        print(f"[run] time budget {budget['minutes']:g} min, predicted {budget['predicted_minutes']:.1f} min at "
              f"step_scale={budget['step_scale']:g}; this run took {(time.time() - t0) / 60:.1f} min", flush=True)
    for report in sorted(Path(cfg.paths.run_dir, "eval").glob("*/report.md")):
        results = report.parent / "results.csv"
        if results.exists():
            print(f"\n[run] results ({results}):\n{results.read_text()}")
        print(f"[run] report: {report}")


def main(argv: list[str] | None = None) -> None:
    """Not a @hydra.main app: the orchestrator keeps the overrides it understands and forwards all of
    them to the stages, each of which composes its own config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        cfg = compose(config_name="run", overrides=accepted("run", [], argv))
        OmegaConf.resolve(cfg)
        run(cfg, argv)


if __name__ == "__main__":
    main()
