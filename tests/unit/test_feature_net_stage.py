"""FeatureNetModule: the accuracy and loss it reports are those of the float32 net the evaluation jobs run,
whatever precision it trained in."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.feature_net import FeatureNetModule
from lightning_modules.nets.feature_net import FeatureNet


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(48, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (48,), generator=g)
    collate = lambda rows: {"image": torch.stack([r[0] for r in rows]), "label": torch.stack([r[1] for r in rows])}  # noqa: E731
    return DataLoader(TensorDataset(images, labels), batch_size=16, collate_fn=collate)


def test_eval_metrics_are_float32_whatever_the_training_precision(tmp_path):
    torch.manual_seed(0)
    module = FeatureNetModule(FeatureNet(in_channels=1, num_classes=4, widths=(8, 16)),
                              functools.partial(torch.optim.AdamW, lr=1e-3))  # fmt: skip
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path / precision))  # fmt: skip
        results[precision] = {**trainer.validate(module, dataloaders=_loader(), verbose=False)[0],
                              **trainer.test(module, dataloaders=_loader(), verbose=False)[0]}  # fmt: skip
    assert set(results["32-true"]) == {"val/loss", "val/acc", "test/acc"}
    for key, value in results["32-true"].items():
        assert results["bf16-mixed"][key] == pytest.approx(value, rel=1e-6), key
