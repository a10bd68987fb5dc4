"""SlurmRequeue: a USR1 that reaches any rank at any moment stops every rank at one step boundary after a
checkpoint (Lightning's own handler saves inside the signal handler and can deadlock DDP)."""

from __future__ import annotations

import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from pipeline.preemption import Preempted, SlurmRequeue, requeue_job


class SignalAt(BoringModel):
    """Sends SIGUSR1 to its own process at `step` on the ranks in `ranks`."""

    def __init__(self, step: int, ranks: tuple[int, ...]):
        super().__init__()
        self.signal_step, self.ranks = step, ranks

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_step and self.global_rank in self.ranks:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().training_step(batch, batch_idx)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=40, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SlurmRequeue(tmp_path, check_every_n_steps=4)], **kw)  # fmt: skip


def test_signal_stops_at_the_next_check_with_a_checkpoint_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    trainer = _trainer(tmp_path, devices=1)
    with pytest.raises(Preempted) as stop:
        trainer.fit(SignalAt(step=5, ranks=(0,)))
    # flagged during step 5 (global_step 5 -> 6); the next check is at global_step 8
    assert trainer.global_step == 8 and stop.value.step == 8
    assert stop.value.checkpoint == tmp_path / "hpc_ckpt_1.ckpt"
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 8
    assert signal.getsignal(signal.SIGUSR1) is before


def test_next_preemption_numbers_the_next_checkpoint(tmp_path):
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"")
    trainer = _trainer(tmp_path, devices=1)
    with pytest.raises(Preempted) as stop:
        trainer.fit(SignalAt(step=1, ranks=(0,)))
    assert stop.value.checkpoint == tmp_path / "hpc_ckpt_4.ckpt" and trainer.global_step == 4


def test_no_signal_trains_to_the_end(tmp_path):
    trainer = _trainer(tmp_path, devices=1)
    trainer.fit(SignalAt(step=-1, ranks=()))
    assert trainer.global_step == 40 and not list(tmp_path.glob("hpc_ckpt_*"))


def test_ddp_signal_on_one_rank_stops_both_at_the_same_step(tmp_path, capfd):
    """Only rank 1 is signalled: without the agreed check rank 0 would train on and the ranks would hang."""
    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn")
    with pytest.raises(Exception, match="Preempted: preempted at step 4"):  # re-raised from a spawned worker
        trainer.fit(SignalAt(step=2, ranks=(1,)))
    assert "[preemption] signal 10 at step 4" in capfd.readouterr().out  # printed by rank 0, never signalled
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4, ckpt["global_step"]


def test_requeue_outside_slurm_says_what_to_do(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="run the same command again"):
        requeue_job()


def _fake_scontrol(tmp_path, monkeypatch, rc: int):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\necho "boom" >&2\nexit {rc}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls"


def test_requeue_names_array_task_and_says_so_before_slurm_kills_the_job(tmp_path, monkeypatch, capfd):
    calls = _fake_scontrol(tmp_path, monkeypatch, rc=0)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    requeue_job()
    assert calls.read_text().split() == ["requeue", "40_1"]  # the task, not the array's first job id
    # printed and flushed before scontrol runs: the requeue kills this process, maybe before it returns
    assert "[preemption] requeueing Slurm job 40_1" in capfd.readouterr().out


def test_failed_requeue_keeps_the_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, rc=1)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match=r"scontrol requeue 41` failed \(boom\).*submit the same stage again"):
        requeue_job()


def test_check_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="check_every_n_steps"):
        SlurmRequeue(tmp_path, check_every_n_steps=0)
