"""Slurm preemption without collective calls inside a signal handler.

Lightning's own auto-requeue (SLURMEnvironment(auto_requeue=True)) saves a checkpoint *inside* the USR1
handler. Under DDP that checkpoint is a collective (a barrier), and each rank runs its handler whenever
the signal happens to reach it: one rank may enter the barrier while the other is in the backward
all-reduce of the next step. The collectives then mismatch and the job hangs before `scontrol requeue`
ever runs, until the time limit kills it (observed on a loaded CI machine).

Here the handler only sets a flag. Every `check_every_n_steps` optimizer steps all ranks agree on the flag
with one all-reduce (`reduce_boolean_decision`) at the same step boundary, save the checkpoint together,
and raise `Preempted` on every rank (no validation, no further collectives); `pipeline.train` catches it,
rank 0 runs `scontrol requeue`, and the stage exits without testing or writing DONE. The requeued job
resumes from the newest checkpoint that loads (`pipeline.checkpoints.resume_checkpoint`); the trainer's
`DurableCheckpointIO` deletes the older `hpc_ckpt_*` once a newer checkpoint is saved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from pipeline.checkpoints import next_hpc_path


class Preempted(Exception):
    """Raised on every rank at one step after `checkpoint` was saved; the job should be requeued."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved to {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


class SlurmRequeue(Callback):
    """On `signum` (Slurm's `--signal=USR1@90` warning): checkpoint on every rank at one step, raise Preempted.

    Args:
        checkpoint_dir: where `hpc_ckpt_<n>.ckpt` goes (the stage directory).
        check_every_n_steps: how often the ranks agree on the flag (one 1-element all-reduce each time);
            keep the interval's wall time well under the warning time (90 s in slurm/stage.sbatch).
        signum: the signal Slurm sends before the time limit or on preemption.
    """

    def __init__(self, checkpoint_dir: str | Path, check_every_n_steps: int = 10, signum: int = signal.SIGUSR1):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.check_every_n_steps = check_every_n_steps
        self.signum = signum
        self.signalled = False  # this rank received the signal
        self._previous: Any = None

    def _flag(self, signum: int, frame: Any) -> None:  # no I/O, no collectives: just remember
        self.signalled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's signal connector took its snapshot of the handlers: its teardown restores the
        # handlers from before fit, not this one.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._flag)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.check_every_n_steps:
            return
        # Every rank reaches this line at the same step, so the all-reduce inside is matched.
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = next_hpc_path(self.checkpoint_dir)
        trainer.save_checkpoint(path)  # collective-safe: all ranks are here
        if trainer.is_global_zero:
            print(f"[preemption] signal {self.signum} at step {trainer.global_step}: saved {path}; stopping", flush=True)
        raise Preempted(path, trainer.global_step)  # not should_stop: that would run validation first


def requeue_job() -> None:
    """`scontrol requeue` this job (rank 0 only); the requeued job resumes from the saved checkpoint."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError("preempted outside a Slurm job (no SLURM_JOB_ID): run the same command again to resume")
    # Printed (and flushed) first: Slurm kills this job as part of the requeue, possibly before the call returns.
    print(f"[preemption] requeueing Slurm job {job_id}", flush=True)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`scontrol requeue {job_id}` failed ({result.stderr.strip() or result.returncode}); the checkpoint "
            "is saved: submit the same stage again (or give the job --requeue) and it resumes from it"
        )
