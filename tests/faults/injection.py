"""Run the real training CLI with a test-only fault switched on (`inject/sitecustomize.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, cli_env
from tests.tiny_checkpoints import write_autoencoder, write_upstream_run

INJECT = Path(__file__).resolve().parent / "inject"


def train_with_fault(*overrides: str, timeout: int = 900, **fault: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.train <overrides>` with `inject/` first on PYTHONPATH and the fault's environment
    variables (FAULT_*, see `inject/sitecustomize.py`); returns the finished process whatever its exit."""
    env = {**cli_env(), "PYTHONPATH": f"{INJECT}{os.pathsep}{REPO}", **fault}
    return subprocess.run([sys.executable, "-m", "pipeline.train", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def write_upstream(stage: str, run_dir: Path) -> None:
    """Tiny final.ckpt files of the stages `stage` (feature_net, diffusion or classifier) reads, under `run_dir`."""
    if stage == "feature_net":
        return
    if stage == "diffusion":
        write_autoencoder(run_dir / "autoencoder" / "checkpoints" / "final.ckpt")
    else:
        write_upstream_run(run_dir)
