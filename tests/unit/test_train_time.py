"""TrainTime: seconds in training batches only (validation excluded), carried over a resume."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from pipeline.builders import TrainTime


class Slow(BoringModel):
    def __init__(self, train_s: float, val_s: float):
        super().__init__()
        self.train_s, self.val_s = train_s, val_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.train_s)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_s)
        return super().validation_step(batch, batch_idx)


def _fit(tmp_path, max_steps, ckpt=None):
    timer = TrainTime()
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, limit_train_batches=4,
                         limit_val_batches=3, num_sanity_val_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer])  # fmt: skip
    trainer.fit(Slow(0.05, 0.1), ckpt_path=ckpt)
    return trainer, timer


def test_counts_training_batches_not_validation_or_sanity_check(tmp_path):
    t0 = time.perf_counter()
    _, timer = _fit(tmp_path, max_steps=8)  # 2 epochs: 8 x 0.05 s training, (2 + 2 x 3) x 0.1 s validation
    wall = time.perf_counter() - t0
    assert 0.4 <= timer.seconds < 1.1, timer.seconds  # with the 0.8 s of validation it would be >= 1.2
    assert wall - timer.seconds >= 0.8  # the validation time is not in it


def test_resume_adds_to_the_checkpointed_time(tmp_path):
    trainer, first = _fit(tmp_path / "a", max_steps=4)
    trainer.save_checkpoint(tmp_path / "4.ckpt")
    _, second = _fit(tmp_path / "b", max_steps=8, ckpt=str(tmp_path / "4.ckpt"))
    assert second.seconds >= first.seconds + 0.2 - 1e-3 and second.seconds < first.seconds + 0.2 + 0.5
