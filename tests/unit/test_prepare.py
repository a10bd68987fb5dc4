"""Shard writing: manifest, bit-exact round trip from the IDX source, idempotency, checksums."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules import sources
from datamodules.shards import ShardChecksumError, load_manifest, prepare_dataset, verify_shards
from datamodules.sources import FashionMNIST, ImageFolder, read_idx
from tests.conftest import FMNIST, require_fashion_mnist


def read_tar(path):
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_manifest_counts_and_round_trip(tiny_data):
    d = tiny_data / "fashion_mnist"
    manifest = load_manifest(d)
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 256, "val": 64, "test": 256}
    assert manifest["image_shape"] == [28, 28, 1] and manifest["num_classes"] == 10
    assert manifest["class_names"][7] == "sneaker"
    for entry in manifest["splits"].values():
        assert sum(s["num_samples"] for s in entry["shards"]) == entry["num_samples"]
    assert len(manifest["splits"]["val"]["shards"]) >= 4  # eval splits spread over ranks x workers

    images = {"train": read_idx(FMNIST / "train-images-idx3-ubyte.gz"), "test": read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")}
    labels = {"train": read_idx(FMNIST / "train-labels-idx1-ubyte.gz"), "test": read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")}
    seen = 0
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            for _key, s in read_tar(d / shard["name"]).items():
                meta = json.loads(s["json"])
                src = "test" if split == "test" else "train"
                img = np.asarray(Image.open(io.BytesIO(s["png"])))
                np.testing.assert_array_equal(img, images[src][meta["index"]])
                assert int(s["cls"]) == labels[src][meta["index"]] == meta["label"]
                assert manifest["class_names"][meta["label"]] in s["txt"].decode()
                seen += 1
    assert seen == 576


def test_val_is_a_disjoint_seeded_holdout(tiny_data):
    manifest = load_manifest(tiny_data / "fashion_mnist")
    idx = {}
    for split in ("train", "val"):
        idx[split] = set()
        for shard in manifest["splits"][split]["shards"]:
            idx[split] |= {json.loads(s["json"])["index"] for s in read_tar(tiny_data / "fashion_mnist" / shard["name"]).values()}
    assert not idx["train"] & idx["val"]


def test_rerun_skips_and_force_rewrites(tmp_path):
    require_fashion_mnist()
    kw = dict(name="fm", config={"a": 1}, val_size=20, limit=40, shard_size=20, progress=False)
    m1 = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path, **kw)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    m2 = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path, **kw)
    assert m1 == m2
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    with pytest.raises(FileExistsError, match="force=true"):
        prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path, **{**kw, "config": {"a": 2}})
    m3 = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path, **{**kw, "force": True})
    assert m3["splits"] == m1["splits"]  # deterministic: same bytes, same checksums
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupted_shard_detected_by_checksum(tmp_path):
    require_fashion_mnist()
    kw = dict(name="fm", config={}, val_size=20, limit=40, shard_size=20, progress=False)
    manifest = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path, **kw)
    victim = tmp_path / manifest["splits"]["train"]["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=victim.name):
        verify_shards(tmp_path, manifest)
    with pytest.raises(ShardChecksumError, match="force=true"):
        prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path, **kw)


def test_captions_are_reproducible(tmp_path):
    require_fashion_mnist()
    kw = dict(name="fm", config={}, val_size=10, limit=10, shard_size=10, progress=False)
    a = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path / "a", **kw)
    b = prepare_dataset(FashionMNIST(str(FMNIST)), tmp_path / "b", **kw)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]


def test_imagefolder_source(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    src = ImageFolder(str(tmp_path / "imgs"), channels=3, image_size=16)
    m = prepare_dataset(src, tmp_path / "out", name="folder", config={}, val_size=2, test_size=2, shard_size=4, progress=False)
    assert m["class_names"] == ["cat", "dog"]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 8, "val": 2, "test": 2}
    assert m["image_shape"] == [16, 16, 3]


def write_images(folder, n, captions=None, size=(12, 10)):
    """`n` random PNGs `00.png`, ... in `folder`, with a `metadata.jsonl` of `captions.format(i)` when given."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    if captions:
        rows = [json.dumps({"file_name": f"{i:02d}.png", "text": captions.format(i)}) for i in range(n)]
        (folder / "metadata.jsonl").write_text("\n".join(rows))


def shard_captions(out, manifest):
    """{split: sorted captions of its shards}."""
    return {split: sorted(s["txt"].decode() for sh in v["shards"] for s in read_tar(out / sh["name"]).values())
            for split, v in manifest["splits"].items()}  # fmt: skip


def test_hf_split_layout_maps_train_and_validation(tmp_path):
    """`root/train/` (+ metadata.jsonl) is train with val held out of it; `validation/` is the test split unless
    `test/` exists; a folder without class folders is one class named after the dataset folder."""
    root = tmp_path / "hf"
    write_images(root / "train", 10, "train caption {}")
    write_images(root / "validation", 3, "validation caption {}")
    src = ImageFolder(str(root), channels=3, image_size=8)
    assert src.class_names == ["hf"] and src.has_test
    kw = dict(config={}, val_size=2, test_size=5, shard_size=4, min_eval_shards=1, progress=False)
    m = prepare_dataset(src, tmp_path / "a", name="hf", **kw)
    assert m["num_classes"] == 1
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 8, "val": 2, "test": 3}
    caps = shard_captions(tmp_path / "a", m)
    assert caps["test"] == [f"validation caption {i}" for i in range(3)]
    assert sorted(caps["train"] + caps["val"]) == [f"train caption {i}" for i in range(10)]
    write_images(root / "test", 4, "test caption {}")  # test/ wins over validation/
    m = prepare_dataset(ImageFolder(str(root), channels=3, image_size=8), tmp_path / "b", name="hf", **kw)
    assert shard_captions(tmp_path / "b", m)["test"] == [f"test caption {i}" for i in range(4)]
    # class folders in the same split layout (root/train/<class> without test/ was refused before)
    for c in ("x", "y"):
        write_images(tmp_path / "cls" / "train" / c, 3)
        write_images(tmp_path / "cls" / "validation" / c, 1)
    m = prepare_dataset(ImageFolder(str(tmp_path / "cls"), channels=3, image_size=8), tmp_path / "c", name="c", **kw)
    assert m["class_names"] == ["x", "y"]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 4, "val": 2, "test": 2}


def test_folder_without_images_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "gone"}\n')
    (tmp_path / "notes" / "a.txt").write_text("a caption without its image")
    (tmp_path / "split" / "train").mkdir(parents=True)
    for folder in (tmp_path / "empty", tmp_path / "notes", tmp_path / "split" / "train"):
        with pytest.raises(ValueError, match=re.escape(f"{folder} has neither class sub-folders nor images")) as e:
            ImageFolder(str(folder.parent if folder.name == "train" else folder))
        assert f"directly in {folder} (one class)" in str(e.value) and "metadata.jsonl" in str(e.value)


def test_class_folder_captions_from_metadata(tmp_path):
    """metadata.jsonl in a class folder (`file_name` relative to it) or in the root (`<class>/<file>`)."""
    write_images(tmp_path / "imgs" / "a", 3, "class folder caption {}")
    write_images(tmp_path / "imgs" / "b", 3)
    rows = [json.dumps({"file_name": f"b/{i:02d}.png", "text": f"root caption {i}"}) for i in range(3)]
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(rows))
    m = prepare_dataset(ImageFolder(str(tmp_path / "imgs"), channels=3, image_size=8), tmp_path / "out", name="c",
                        config={}, val_size=1, test_size=1, shard_size=8, min_eval_shards=1, progress=False)  # fmt: skip
    assert m["class_names"] == ["a", "b"]
    assert sorted(c for v in shard_captions(tmp_path / "out", m).values() for c in v) == sorted(
        [f"class folder caption {i}" for i in range(3)] + [f"root caption {i}" for i in range(3)])


@pytest.mark.parametrize("collide", [False, True])
def test_metadata_captions_keep_the_dict_semantics(tmp_path, monkeypatch, collide):
    """The packed caption lookup answers as the dict it replaced: the last row of a file name wins, values are
    `str()`-ed, an empty text is a caption, a class folder's own metadata.jsonl wins over the root's, a `.txt`
    sidecar over both; any text round-trips (a lone surrogate too). `collide`: every name has one hash."""
    if collide:
        monkeypatch.setattr(sources, "hash", lambda _: 0, raising=False)
    write_images(tmp_path / "imgs" / "a", 4)
    write_images(tmp_path / "imgs" / "b", 2)
    rows = [("00.png", "first"), ("01.png", ""), ("02.png", 7), ("00.png", "last wins"), ("gone.png", "x"),
            ("03.png", "odd \ud800 text")]
    (tmp_path / "imgs" / "a" / "metadata.jsonl").write_text(
        "\r\n".join(json.dumps({"file_name": f, "text": t}) for f, t in rows) + "\r\n\r\n")
    (tmp_path / "imgs" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f, "text": t}) for f, t in
                  [("a/00.png", "root a0"), ("a/02.png", "root a2"), ("b/01.png", "root b1")]))
    (tmp_path / "imgs" / "a" / "02.txt").write_text(" sidecar \n")
    src = ImageFolder(str(tmp_path / "imgs"), channels=3, image_size=8).load("train")
    assert [src.names[i] for i in range(len(src))] == [f"a/{i:02d}.png" for i in range(4)] + ["b/00.png", "b/01.png"]
    assert [src.caption(i) for i in range(len(src))] == ["last wins", "", "7", "odd \ud800 text", None, "root b1"]
    assert src.item(2)[2]["caption"] == "sidecar" and "caption" not in src.item(4)[2]
    assert src.path(0) == str(tmp_path / "imgs" / "a" / "00.png")


def test_missing_source_and_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path)).load("train")
    with pytest.raises(FileNotFoundError, match="python -m pipeline.prepare"):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(str(tmp_path / "nope"))


def test_shards_have_plain_ustar_headers(tiny_data):
    """A float mtime made tarfile write a PAX header per member: twice the bytes and the read time."""
    shard = load_manifest(tiny_data / "fashion_mnist")["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(tiny_data / "fashion_mnist" / shard) as tar:
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} and m.mtime == 0 for m in members)
