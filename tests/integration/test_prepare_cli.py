"""The README's "bring your own images" commands through the real CLI, then a `debug=fdr` stage on the result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
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


def test_caption_folder_then_text_conditioned_stage(tmp_path):
    """Captions from metadata.jsonl (the diffusers/HF imagefolder convention) reach the text-conditioned run."""
    folder = make_folder(tmp_path / "imgs", classes=("all",), n=16)
    rows = [{"file_name": f"{i}.jpg", "text": f"a photo number {i}"} for i in range(16)]
    (folder / "all" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data_root, runs = tmp_path / "data", tmp_path / "runs"
    common = ["data=imagefolder", f"data.source.root={folder}", "data.num_classes=1", "data.image_size=16",
              f"paths.data_dir={data_root}", "data.val_size=4", "data.test_size=4"]  # fmt: skip
    run_cli("pipeline.prepare", *common, "progress=false", "num_workers=2")
    m = load_manifest(data_root / "imagefolder")
    assert m["num_classes"] == 1 and sum(v["num_samples"] for v in m["splits"].values()) == 16
    shard = (data_root / "imagefolder" / m["splits"]["train"]["shards"][0]["name"]).read_bytes()
    assert b"a photo number" in shard
    run_cli("pipeline.train", "experiment=fashion_mnist_text", "stage=diffusion", "debug=fdr", *common,
            f"paths.runs_dir={runs}", "logger=csv", "data.batch_size=4", "data.eval_batch_size=4",
            "data.num_workers=0")  # fmt: skip


def test_existing_shards_command_then_fdr_stage(tmp_path):
    """img2dataset-style shards (jpg/txt/json, no labels) taken as they are: a manifest by scanning them."""
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(1)
    for s in range(4):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20 + s, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": buf.getvalue(), "txt": f"caption {s} {i}",
                            "json": {"url": f"http://example.invalid/{s}/{i}.jpg", "caption": f"caption {s} {i}"}})
    data_root, runs = tmp_path / "data", tmp_path / "runs"
    common = ["data=webdataset", f"data.source.root={shards}", "data.image_size=16", f"paths.data_dir={data_root}"]
    run_cli("pipeline.prepare", *common, "progress=false")
    m = load_manifest(data_root / "webdataset")
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 12, "test": 6, "val": 6}
    assert m["num_classes"] == 1 and m["splits"]["val"]["shards"][0]["name"] == str(shards / "00003.tar")
    # unlabelled data: a stage that needs no labels (feature_net is a classifier of >= 2 classes)
    run_cli("pipeline.train", "stage=autoencoder", "debug=fdr", *common, f"paths.runs_dir={runs}", "logger=csv",
            "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0")  # fmt: skip
