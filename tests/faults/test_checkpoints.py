"""Faults around checkpoints, through the real CLI (issue 13; docs/ARCHITECTURE.md "Resume and skip rules"):
a truncated last.ckpt, a kill in the middle of a save, a full disk during a save; and the EMA a checkpoint
holds. Faults are injected by `inject/sitecustomize.py` (test-only, on PYTHONPATH of the CLI run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_DIFFUSION, run_cli, tiny_overrides
from tests.faults.injection import output, train_with_fault, write_upstream

STAGE = "default/fashion_mnist/feature_net_eval"
MAX_STEPS = 8


def feature_net_args(data: Path, runs: Path) -> list[str]:
    """Saves last.ckpt at steps 2, 4, 6, 8 (torch.save calls 1-4), then final.ckpt (call 5)."""
    return ["stage=feature_net", "debug=limit", f"trainer.max_steps={MAX_STEPS}", "stage.checkpoint_every_n_steps=2",
            *tiny_overrides(data, runs)]  # fmt: skip


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def temps(stage: Path) -> list[Path]:
    return [*stage.glob(".*.tmp"), *(stage / "checkpoints").glob(".*.tmp")]


def test_truncated_last_ckpt_falls_back_to_the_previous_good_one(tiny_data, tmp_path):
    args = feature_net_args(tiny_data, tmp_path)
    killed = train_with_fault(*args, FAULT_KILL_IN_SAVE="3")  # killed while saving step 6
    assert killed.returncode != 0, output(killed)
    ckpts = tmp_path / STAGE / "checkpoints"
    last = ckpts / "last.ckpt"
    assert step_of(last) == 4
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # e.g. a file system that lost its tail

    resumed = run_cli("pipeline.train", *args)
    assert f"cannot resume from {last}" in resumed.stdout and "does not load" in resumed.stdout, resumed.stdout
    assert f"resuming from {ckpts / 'prev.ckpt'}" in resumed.stdout, resumed.stdout
    assert json.loads((tmp_path / STAGE / "DONE").read_text())["global_step"] == MAX_STEPS
    assert (ckpts / "last.ckpt.corrupt").exists()  # kept aside for inspection, never rotated into prev.ckpt
    assert step_of(ckpts / "last.ckpt") == MAX_STEPS and step_of(ckpts / "prev.ckpt") == MAX_STEPS - 2


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_cleans_up(tiny_data, tmp_path):
    args = feature_net_args(tiny_data, tmp_path)
    killed = train_with_fault(*args, FAULT_KILL_IN_SAVE="2")  # killed while saving step 4
    assert killed.returncode != 0, output(killed)
    stage = tmp_path / STAGE
    assert step_of(stage / "checkpoints" / "last.ckpt") == 2
    left = temps(stage)
    assert left, "the injected kill should have left the save's temporary file"
    # A Slurm preemption checkpoint from the same point, newer than last.ckpt: resumed from, then pruned.
    time.sleep(0.05)
    shutil.copy(stage / "checkpoints" / "last.ckpt", stage / "hpc_ckpt_1.ckpt")

    resumed = run_cli("pipeline.train", *args)
    assert f"resuming from {stage / 'hpc_ckpt_1.ckpt'}" in resumed.stdout, resumed.stdout
    for tmp in left:
        assert f"removed {tmp}" in resumed.stdout, resumed.stdout
    assert not temps(stage)
    assert not list(stage.glob("hpc_ckpt_*.ckpt")), "hpc_ckpt_1 should be pruned once a newer save succeeded"
    assert json.loads((stage / "DONE").read_text())["global_step"] == MAX_STEPS


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs (needs root, as in CI and `make test`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs as root)")
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tiny_data, small_fs):
    args = feature_net_args(tiny_data, small_fs)
    filler = small_fs / "filler"
    full = train_with_fault(*args, FAULT_DISK_FULL_AT_SAVE="3", FAULT_FILLER=str(filler))  # saving step 6
    assert full.returncode != 0, output(full)
    ckpts = small_fs / STAGE / "checkpoints"
    assert f"no space left to write checkpoint {ckpts / 'last.ckpt'}" in full.stderr, output(full)
    assert "run the same command again to resume" in full.stderr, output(full)
    assert step_of(ckpts / "last.ckpt") == 4 and step_of(ckpts / "prev.ckpt") == 2
    assert not (small_fs / STAGE / "DONE").exists() and not temps(small_fs / STAGE)

    filler.unlink()  # the user frees space and runs the same command
    resumed = run_cli("pipeline.train", *args)
    assert f"resuming from {ckpts / 'last.ckpt'}" in resumed.stdout, resumed.stdout
    assert json.loads((small_fs / STAGE / "DONE").read_text())["global_step"] == MAX_STEPS


@pytest.mark.parametrize("stage", ["diffusion", "classifier"])
def test_a_checkpoint_at_step_n_holds_n_ema_updates(stage, tiny_data, tmp_path):
    write_upstream(stage, tmp_path / "default" / "fashion_mnist")
    small = SMALL_DIFFUSION if stage == "diffusion" else ()
    run_cli("pipeline.train", f"stage={stage}", "debug=limit", "trainer.max_steps=4", "stage.checkpoint_every_n_steps=2",
            "stage.test=false", *small, *tiny_overrides(tiny_data, tmp_path))  # fmt: skip
    ckpts = tmp_path / "default" / "fashion_mnist" / stage / "checkpoints"
    for name in ("last.ckpt", "prev.ckpt"):
        ckpt = torch.load(ckpts / name, map_location="cpu", weights_only=True)
        assert int(ckpt["state_dict"]["ema.num_updates"]) == ckpt["global_step"], (name, ckpt["global_step"])
