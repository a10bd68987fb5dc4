"""The README's "bring your own images" commands through the real CLI, then a `debug=fdr` stage on the result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from datamodules.shards import load_manifest
from datamodules.webdata import WebDataModule
from tests.conftest import SMALL_DIFFUSION, run_cli
from tests.unit.test_prepare import shard_captions


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
    """The README's image-caption command on a diffusers / Hugging Face image folder: the images and their
    metadata.jsonl side by side, no class folders (one class, named after the folder); the captions reach the
    text-conditioned run."""
    folder = tmp_path / "captioned"
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    rows = [{"file_name": f"{i}.jpg", "text": f"a photo number {i}"} for i in range(16)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data_root, runs = tmp_path / "data", tmp_path / "runs"
    common = ["data=imagefolder", f"data.source.root={folder}", "data.num_classes=1", "data.image_size=16",
              f"paths.data_dir={data_root}", "data.val_size=4", "data.test_size=4"]  # fmt: skip
    run_cli("pipeline.prepare", *common, "progress=false", "num_workers=2")
    m = load_manifest(data_root / "imagefolder")
    assert m["num_classes"] == 1 and m["class_names"] == ["captioned"]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 8, "val": 4, "test": 4}
    captions = sorted(c for v in shard_captions(data_root / "imagefolder", m).values() for c in v)
    assert captions == sorted(r["text"] for r in rows)
    run_cli("pipeline.train", "experiment=fashion_mnist_text", "stage=diffusion", "debug=fdr", *common,
            f"paths.runs_dir={runs}", "logger=csv", "data.batch_size=4", "data.eval_batch_size=4",
            "data.num_workers=0", *SMALL_DIFFUSION)  # fmt: skip


def test_sidecar_caption_folder_captions_reach_batches(tmp_path):
    """A flat folder of images with `<image>.txt` sidecars; an image without one gets a template caption of
    the folder's class name."""
    folder = tmp_path / "sidecars"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        if i:
            (folder / f"{i:02d}.txt").write_text(f"sidecar caption {i}\n")
    data_root = tmp_path / "data"
    run_cli("pipeline.prepare", "data=imagefolder", f"data.source.root={folder}", "data.num_classes=1",
            "data.image_size=16", f"paths.data_dir={data_root}", "data.val_size=4", "data.test_size=4",
            "progress=false")  # fmt: skip
    d = data_root / "imagefolder"
    m = load_manifest(d)
    assert m["class_names"] == ["sidecars"]
    dm = WebDataModule(str(d), image_size=16, channels=3, resize="resize", batch_size=4, eval_batch_size=4,
                       num_workers=0)  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    batches = [b for loader in (dm.val_dataloader, dm.test_dataloader) for b in loader()]
    assert all((b["label"] == 0).all() for b in batches)
    captions = [c for b in batches for c in b["caption"]] + shard_captions(d, m)["train"]
    assert sorted(c for c in captions if c.startswith("sidecar caption")) == sorted(
        f"sidecar caption {i}" for i in range(1, 12))
    templated = [c for c in captions if not c.startswith("sidecar caption")]
    assert len(templated) == 1 and "sidecars" in templated[0]  # "a photo of a sidecars", ...


def test_folder_without_images_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("pipeline.prepare", "data=imagefolder", f"data.source.root={tmp_path / 'empty'}",
                   "data.num_classes=1", f"paths.data_dir={tmp_path / 'data'}", "progress=false", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert f"{tmp_path / 'empty'} has neither class sub-folders nor images" in proc.stderr


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
