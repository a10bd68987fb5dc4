"""The streaming DataModule: exactly-once eval splits over ranks x workers, equal train batches, bad shards."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from datamodules.shards import load_manifest
from datamodules.webdata import ShardReadError, WebDataModule


def make_dm(data_dir, **kw) -> WebDataModule:
    args = dict(image_size=32, channels=1, batch_size=16, eval_batch_size=16, num_workers=2, shuffle_buffer=50)
    return WebDataModule(str(data_dir), **{**args, **kw})


def as_rank(monkeypatch, rank: int, world: int) -> None:
    # webdataset's split_by_node reads RANK/WORLD_SIZE (or torch.distributed), as it does under DDP.
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_batches_are_dicts_in_range(tiny_data):
    dm = make_dm(tiny_data / "fashion_mnist", num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"][:, :, :2].eq(-1).all()  # 28 -> 32 padding is black
    assert batch["label"].dtype == torch.long and len(batch["caption"]) == 16
    assert all(isinstance(c, str) and c for c in batch["caption"])


def test_val_every_sample_exactly_once_over_two_ranks_two_workers(tiny_data, monkeypatch):
    expected = load_manifest(tiny_data / "fashion_mnist")["splits"]["val"]["num_samples"]
    keys = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        dm = make_dm(tiny_data / "fashion_mnist", num_workers=2)
        keys += [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(keys) == expected and len(set(keys)) == expected
    # deterministic order
    as_rank(monkeypatch, 0, 2)
    a = [k for b in make_dm(tiny_data / "fashion_mnist").val_dataloader() for k in b["key"]]
    b = [k for b in make_dm(tiny_data / "fashion_mnist").val_dataloader() for k in b["key"]]
    assert a == b


def test_train_equal_batch_counts_over_ranks(tiny_data, monkeypatch):
    counts = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        dm = make_dm(tiny_data / "fashion_mnist", num_workers=2, train_batches_per_epoch=7)
        counts.append(sum(1 for _ in dm.train_dataloader()))
    assert counts == [7, 7]


def test_corrupt_sample_is_skipped_and_counted(tiny_data, tmp_path):
    import tarfile

    src = tiny_data / "fashion_mnist"
    dst = tmp_path / "fm"
    shutil.copytree(src, dst)
    shard = dst / load_manifest(dst)["splits"]["val"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # rewrite with the first PNG's bytes garbled (a valid tar)
        done = False
        for m, data in members:
            if m.name.endswith(".png") and not done:
                data, done = b"not a png" * 10, True
                m.size = len(data)
            import io

            tar.addfile(m, io.BytesIO(data))
    n = load_manifest(dst)["splits"]["val"]["num_samples"]
    dm = make_dm(dst, num_workers=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        seen = sum(len(b["key"]) for b in dm.val_dataloader())
    assert seen == n - 1
    assert dm.skipped.value == 1
    assert any("skipping corrupt sample" in str(x.message) for x in w)


@pytest.mark.parametrize("cut", [1500, 3 * 512, 0.5])  # mid-header, on a header boundary, mid-shard
def test_truncated_shard_is_an_error_naming_it(tiny_data, tmp_path, cut):
    dst = tmp_path / "fm"
    shutil.copytree(tiny_data / "fashion_mnist", dst)
    shard = dst / load_manifest(dst)["splits"]["val"]["shards"][1]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(ShardReadError, match=shard.name):
        for _ in make_dm(dst, num_workers=0).val_dataloader():
            pass


def test_truncation_inside_a_stream_is_still_an_error(tiny_data, tmp_path):
    """Without the manifest's size (older manifests) a cut inside a member's data still raises (a cut on a
    header boundary cannot be seen in the stream: tarfile takes it for the end of the archive)."""
    dst = tmp_path / "fm"
    shutil.copytree(tiny_data / "fashion_mnist", dst)
    manifest = load_manifest(dst)
    shard = dst / manifest["splits"]["val"]["shards"][1]["name"]
    shard.write_bytes(shard.read_bytes()[: 5 * 512 + 100])  # inside the first sample's png data
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            s.pop("bytes")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardReadError, match=shard.name):
        for _ in make_dm(dst, num_workers=0).val_dataloader():
            pass


def test_missing_shard_and_manifest_errors(tiny_data, tmp_path):
    dst = tmp_path / "fm"
    shutil.copytree(tiny_data / "fashion_mnist", dst)
    shard = dst / load_manifest(dst)["splits"]["train"]["shards"][0]["name"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        make_dm(dst).train_dataloader()
    with pytest.raises(FileNotFoundError, match="python -m pipeline.prepare"):
        make_dm(tmp_path / "empty")


def test_url_override_brace_pattern_and_pipe(tiny_data):
    d = tiny_data / "fashion_mnist"
    n_val = len(load_manifest(d)["splits"]["val"]["shards"])
    brace = f"{d}/val-{{00000..{n_val - 1:05d}}}.tar"
    dm = make_dm(d, num_workers=0, urls={"val": brace})
    n_brace = sum(len(b["key"]) for b in dm.val_dataloader())
    pipe = f"pipe:cat {d}/val-{{00000..{n_val - 1:05d}}}.tar"
    dm = make_dm(d, num_workers=0, urls={"val": pipe})
    n_pipe = sum(len(b["key"]) for b in dm.val_dataloader())
    assert n_brace == n_pipe == load_manifest(d)["splits"]["val"]["num_samples"]


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("L", 3), ("RGB", 1)])
def test_decoder_pads_and_scales_like_the_reference_formula(mode, channels):
    """The numpy fast path equals x / 127.5 - 1 padded with -1 (and converts modes as PIL does)."""
    import io
    import multiprocessing as mp

    import numpy as np
    from PIL import Image

    from datamodules.webdata import SampleDecoder

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (28, 26, 3) if mode == "RGB" else (28, 26), dtype=np.uint8)
    arr[0, 0] = 255  # the extremes must land exactly on +-1
    arr[1, 1] = 0
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    got = SampleDecoder(32, channels, "pad", mp.Value("l", 0)).to_tensor(buf.getvalue())
    ref = np.asarray(Image.fromarray(arr, mode).convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    ref = torch.from_numpy(ref.reshape(28, 26, channels)).permute(2, 0, 1) / 127.5 - 1
    ref = torch.nn.functional.pad(ref, (3, 3, 2, 2), value=-1.0)
    assert got.shape == (channels, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert got.max() <= 1 and got.min() >= -1


def test_decoder_resize_mode_and_exact_size():
    """resize='resize' (and padding an image larger than image_size) interpolates; an image already of
    image_size is only rescaled, in either mode."""
    import io
    import multiprocessing as mp

    import numpy as np
    from PIL import Image

    from datamodules.webdata import SampleDecoder

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr, "L").save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(1)
    small, exact = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((28, 28), (32, 32)))
    for resize in ("pad", "resize"):
        dec = SampleDecoder(32, 1, resize, mp.Value("l", 0))
        out = dec.to_tensor(png(exact))
        torch.testing.assert_close(out[0], torch.from_numpy(exact).float() / 127.5 - 1, atol=1e-6, rtol=0)
    stretched = SampleDecoder(32, 1, "resize", mp.Value("l", 0)).to_tensor(png(small))
    assert stretched.shape == (1, 32, 32) and not stretched[:, :2].eq(-1).all()  # no black border
    assert stretched.min() >= -1 and stretched.max() <= 1
    shrunk = SampleDecoder(16, 1, "pad", mp.Value("l", 0)).to_tensor(png(small))
    assert shrunk.shape == (1, 16, 16)
