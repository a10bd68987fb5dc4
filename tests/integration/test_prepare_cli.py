"""The README's "bring your own images" commands through the real CLI, then a `debug=fdr` stage on the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.shards import load_manifest
from tests.conftest import run_cli


def make_folder(root: Path, classes=("cat", "dog"), n: int = 12, size=(20, 24)) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def test_imagefolder_command_then_fdr_stage(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    data_root, runs = tmp_path / "data", tmp_path / "runs"
    common = ["data=imagefolder", f"data.source.root={folder}", "data.num_classes=2", "data.image_size=16",
              f"paths.data_dir={data_root}"]  # fmt: skip
    run_cli("pipeline.prepare", *common, "data.val_size=4", "data.test_size=4", "progress=false")
    m = load_manifest(data_root / "imagefolder")
    assert m["class_names"] == ["cat", "dog"] and m["image_shape"] == [16, 16, 3]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 16, "val": 4, "test": 4}
    run_cli("pipeline.train", "stage=feature_net", "debug=fdr", *common, f"paths.runs_dir={runs}", "logger=csv",
            "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0")  # fmt: skip
