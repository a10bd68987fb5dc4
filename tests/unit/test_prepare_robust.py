"""Prepare of a messy folder under the stated decoding policy (`datamodules.sources.decode_image`), and a
prepare killed midway (1 and 2 writer processes) that a re-run finishes without rewriting the shards it had
verified."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.processes import child_pids
from datamodules.shards import PROGRESS_DIR, load_manifest, prepare_dataset
from datamodules.sources import FashionMNIST, ImageFolder, UndecodableImage, decode_image
from datamodules.webdata import WebDataModule
from tests.conftest import FMNIST, REPO, cli_env, require_fashion_mnist


def messy_folder(root: Path) -> dict[str, np.ndarray]:
    """8x8 images in every mode, with the RGB values the policy must produce."""
    a, b = root / "a", root / "b"
    for d in (a, b, root / ".ipynb_checkpoints"):
        d.mkdir(parents=True)
    want = {}
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, "L").save(a / "l.png")
    want["l.png"] = np.repeat(grey[..., None], 3, -1)
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(a / "rgb.png")
    (a / "rgb.txt").write_text("a noisy square\n")
    want["rgb.png"] = rgb
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:4, :, 3] = 255  # top half opaque, bottom half fully transparent -> the white background
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    want["rgba.png"] = np.concatenate([np.full((4, 8, 3), (10, 20, 30)), np.full((4, 8, 3), 255)]).astype(np.uint8)
    pal = Image.new("P", (8, 8))
    pal.putdata([0, 1] * 32)
    pal.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    pal.save(b / "p.png", transparency=1)  # index 1 is transparent
    want["p.png"] = np.tile(np.array([[200, 0, 0], [255, 255, 255]], np.uint8), (8, 4, 1))
    i16 = np.full((8, 8), 257 * 100, np.uint16)
    i16[0, 0], i16[0, 1] = 65535, 300
    Image.fromarray(i16).save(b / "i16.png")
    w16 = np.full((8, 8), 100, np.uint8)
    w16[0, 0], w16[0, 1] = 255, 1
    want["i16.png"] = np.repeat(w16[..., None], 3, -1)
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(b / "cmyk.tif")
    want["cmyk.tif"] = np.full((8, 8, 3), 255, np.uint8)
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255  # left half black; EXIF orientation 6 (rotate 90 CW to display) puts it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(half, "L").save(b / "exif.png", exif=exif)
    want["exif.png"] = np.repeat(np.concatenate([np.zeros((4, 8)), np.full((4, 8), 255)]).astype(np.uint8)[..., None], 3, -1)
    (b / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    Image.fromarray(rgb).save(root / ".ipynb_checkpoints" / "x.png")  # a hidden folder: not a class
    Image.fromarray(rgb).save(a / ".hidden.png")  # a hidden file: not an image of the set
    return want


def shard_samples(d: Path, manifest: dict) -> dict[str, dict]:
    out = {}
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            with tarfile.open(d / shard["name"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_decoding_policy(tmp_path):
    want = messy_folder(tmp_path)
    for name, expected in want.items():
        path = next(tmp_path.glob(f"*/{name}"))
        np.testing.assert_array_equal(decode_image(path, channels=3), expected, err_msg=name)
    with pytest.raises(UndecodableImage, match="corrupt.png"):
        decode_image(tmp_path / "b" / "corrupt.png")
    # LDM preprocessing: shorter side to image_size, then a centre crop (no stretching)
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, 4:12] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert (decode_image(tmp_path / "wide.png", 3, image_size=8) == 255).all()


def test_messy_folder_prepare(tmp_path):
    want = messy_folder(tmp_path / "imgs")
    src = ImageFolder(str(tmp_path / "imgs"), channels=3)
    assert src.class_names == ["a", "b"]  # .ipynb_checkpoints is not a class
    out = tmp_path / "out"
    m = prepare_dataset(src, out, name="messy", config={}, val_size=1, test_size=1, shard_size=2,
                        min_eval_shards=1, num_workers=2, progress=False)  # fmt: skip
    skipped = [s for v in m["splits"].values() for s in v.get("skipped", [])]
    assert [Path(s["file"]).name for s in skipped] == ["corrupt.png"] and m["num_skipped"] == 1
    samples = shard_samples(out, m)
    assert sum(v["num_samples"] for v in m["splits"].values()) == len(samples) == len(want) == 7
    for s in samples.values():
        meta = json.loads(s["json"])
        name = Path(meta["file"]).name
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), want[name], err_msg=name)
        caption = s["txt"].decode()
        assert caption == "a noisy square" if name == "rgb.png" else meta["class_name"] in caption
    # captions reach batches: the DataModule over these shards
    split = next(k for k, v in m["splits"].items() for sh in v["shards"] if b"a noisy square" in (out / sh["name"]).read_bytes())
    dm = WebDataModule(str(out), image_size=8, channels=3, resize="resize", batch_size=1, eval_batch_size=1, num_workers=0)
    dm.setup("fit")
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader}.get(split)
    if loader is None:
        dm.setup("test")
        loader = dm.test_dataloader
    captions = []
    for _ in range(40):  # train resamples shards: a few epochs see every sample with near certainty
        captions += [c for batch in loader() for c in batch["caption"]]
        if "a noisy square" in captions:
            break
    assert "a noisy square" in captions


def test_killed_prepare_resumes_without_rewriting(tmp_path):
    """SIGKILL the real CLI midway; the re-run keeps every shard it had recorded as finished."""
    require_fashion_mnist()
    args = ["data=fashion_mnist", f"data.source.root={FMNIST}", f"paths.data_dir={tmp_path}", "limit=4000",
            "data.val_size=400", "data.shard_size=100", "progress=false"]  # fmt: skip
    d = tmp_path / "fashion_mnist"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((d / PROGRESS_DIR).glob("*.json"))) < 5 and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (d / "manifest.json").exists(), "prepare finished before it could be killed"
    records = sorted((d / PROGRESS_DIR).glob("*.json"))
    assert len(records) >= 5
    kept = {r.stem: (os.stat(d / r.stem).st_ino, os.stat(d / r.stem).st_mtime_ns) for r in records}
    subprocess.run([sys.executable, "-m", "pipeline.prepare", *args], cwd=REPO, env=cli_env(), check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    m = load_manifest(d)
    assert {n: (os.stat(d / n).st_ino, os.stat(d / n).st_mtime_ns) for n in kept} == kept
    fresh = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path / "fresh", name="fashion_mnist", config=m["config"],
                            val_size=400, limit=4000, shard_size=100, num_workers=2, progress=False)  # fmt: skip
    assert fresh["content_hash"] == m["content_hash"] and fresh["splits"] == m["splits"]



def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not reaped by its new parent, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_two_writer_prepare_takes_its_writers_and_resumes(tmp_path):
    """SIGKILL the CLI of an image-folder prepare with 2 writer processes while they write train shards (400
    images of 256 px each, about a second's work): the writers end with it, leaving their shards unfinished
    (an orphan would go on writing its shard while the re-run writes the same one), and the re-run keeps every
    shard recorded as finished and writes what a fresh 1-writer prepare writes."""
    rng = np.random.default_rng(0)
    for i in range(900):
        d = tmp_path / "imgs" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        small.resize((256, 256), Image.BILINEAR).save(d / f"{i:04d}.jpg", quality=90)
    args = ["data=imagefolder", f"data.source.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.image_size=96",
            f"paths.data_dir={tmp_path / 'data'}", "data.val_size=50", "data.test_size=50", "data.shard_size=400",
            "num_workers=2", "progress=false"]  # fmt: skip
    d = tmp_path / "data" / "imagefolder"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, writers = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None:
        writers = child_pids(proc.pid)
        if len(writers) == 2 and list(d.glob(".train-*.tmp")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in d.glob("*.tar"))
    assert not (d / "manifest.json").exists(), "prepare finished before it could be killed"
    assert len(writers) == 2 and list(d.glob(".train-*.tmp")), (writers, finished)
    time.sleep(2)  # an orphan writer would finish its train shard in this time
    assert not [p for p in writers if _alive(p)], "writer processes outlived the killed prepare"
    assert sorted(p.name for p in d.glob("*.tar")) == finished, "a writer finished a shard after the prepare was killed"
    records = sorted((d / PROGRESS_DIR).glob("*.json"))
    assert records, "no shard was finished before the kill: nothing to keep"
    kept = {r.stem: (os.stat(d / r.stem).st_ino, os.stat(d / r.stem).st_mtime_ns) for r in records}
    subprocess.run([sys.executable, "-m", "pipeline.prepare", *args], cwd=REPO, env=cli_env(), check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    m = load_manifest(d)
    assert {n: (os.stat(d / n).st_ino, os.stat(d / n).st_mtime_ns) for n in kept} == kept
    fresh = prepare_dataset(ImageFolder(str(tmp_path / "imgs"), channels=3, image_size=96), tmp_path / "fresh",
                            name="imagefolder", config=m["config"], val_size=50, test_size=50, shard_size=400,
                            progress=False)  # fmt: skip
    assert fresh["content_hash"] == m["content_hash"] and fresh["splits"] == m["splits"]


def test_keep_original_bytes_and_datamodule_decodes_both(tmp_path):
    rng = np.random.default_rng(2)
    for c in ("x", "y"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            size = (8, 8) if i < 3 else (12, 16)  # the last one needs a resize: re-encoded as png
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.jpg")
    src = ImageFolder(str(tmp_path / "imgs"), channels=3, image_size=8, keep_original=True)
    out = tmp_path / "out"
    m = prepare_dataset(src, out, name="orig", config={}, val_size=2, test_size=2, shard_size=8, min_eval_shards=1,
                        progress=False)  # fmt: skip
    samples = shard_samples(out, m)
    for s in samples.values():
        file = tmp_path / "imgs" / json.loads(s["json"])["file"]
        if file.stem == "3":
            assert "png" in s and "jpg" not in s
        else:
            assert s["jpg"] == file.read_bytes()  # untouched
    dm = WebDataModule(str(out), image_size=8, channels=3, resize="resize", batch_size=4, eval_batch_size=4, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and dm.skipped.value == 0


def test_imagenet_class_map(tmp_path):
    for syn in ("n01440764", "n01443537"):
        (tmp_path / "train" / syn).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / syn / "x.JPEG")
    (tmp_path / "map.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert ImageFolder(str(tmp_path), class_map=str(tmp_path / "map.txt")).class_names == ["tench", "goldfish"]
    (tmp_path / "bad.txt").write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match="n01443537"):
        ImageFolder(str(tmp_path), class_map=str(tmp_path / "bad.txt"))
