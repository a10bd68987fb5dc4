"""Shared fixtures: a tiny real Fashion-MNIST shard set and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One torch thread per test process, set before anything imports torch (a value already in the environment
# wins). The suite runs as two pytest-xdist workers on two cores (`make test`), and the tests' tiny nets spend
# longer in OpenMP hand-offs between threads than in arithmetic: on the 2-core machine shared with other
# jobs, tests/unit/test_sweep.py's batch-independence test took 68 s with two threads (a tiny U-Net's conv2d
# 16 ms a call) and 5.5 s with one. The CLI runs below get the same setting (`cli_env`).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
sys.path.insert(0, str(REPO))


def require_fashion_mnist() -> None:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing: apt-get install -y dataset-fashion-mnist (make test does it)")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Shards of 256 train / 64 val / 256 test Fashion-MNIST images; returns the data_dir (parent)."""
    require_fashion_mnist()
    from datamodules.shards import prepare_dataset
    from datamodules.sources import FashionMNIST

    root = tmp_path_factory.mktemp("data")
    prepare_dataset(FashionMNIST(str(FMNIST)), root / "fashion_mnist", name="fashion_mnist",
                    config={"tiny": True}, val_size=64, limit=256, shard_size=64, min_eval_shards=4,
                    progress=False)  # fmt: skip
    return root


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_DISABLE_GIT": "true"})  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.fixture(scope="session")
def ended_wandb_service(tmp_path_factory) -> str:
    """The WANDB_SERVICE value of a process that used W&B and has ended (a closed notebook, a finished sweep
    driver): W&B's address of its service, which every child of such a process inherits."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_parent")
    code = ("import os, wandb; wandb.init(mode='offline', dir=os.environ['ROOT'], project='parent').finish(); "
            "print(os.environ['WANDB_SERVICE'])")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env={**cli_env(), "ROOT": str(root)}, capture_output=True,
                          text=True, timeout=300, check=True)  # fmt: skip
    return proc.stdout.strip().splitlines()[-1]


def run_cli(module: str, *overrides: str, timeout: int = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `python -m <module> <overrides>` the way a user does; on failure show the output tail."""
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(overrides)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")  # fmt: skip
    return proc


# The diffusion stage at test size, for CLI runs that do not test its size: the U-Net of tiny_checkpoints
# (model_channels 16) and sample grids of 2 classes x 2 images in 2 DDIM steps. With the default U-Net and
# grids (10 x 8 images, 25 steps, at two scales) the end-of-training grids were ~40% of a debug=fdr run.
SMALL_DIFFUSION = ("model.unet.model_channels=16", "model.unet.channel_mult=[1,2]", "model.unet.num_res_blocks=1",
                   "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=16",
                   "callbacks.sample_grids.per_row=2", "callbacks.sample_grids.max_rows=2",
                   "stage.module.sampler.num_steps=2")  # fmt: skip


def tiny_overrides(data_root: Path, runs: Path, *extra: str) -> list[str]:
    return [f"paths.data_dir={data_root}", f"paths.runs_dir={runs}", "logger=csv", *extra]


def processes_running(pids: list[int], within: float = 0.0) -> list[int]:
    """The pids of `pids` still running after up to `within` seconds. A killed process not yet reaped by its
    new parent (a zombie: this container's init reaps late) does not run; a loaded machine may take a moment
    to end a process inside an fsync."""

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + within
    while (left := [p for p in pids if running(p)]) and time.time() < deadline:
        time.sleep(0.1)
    return left
