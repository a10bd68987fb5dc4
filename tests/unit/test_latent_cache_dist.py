"""The latent cache built by several ranks at once (`lightning_modules.latent_cache.ensure_latent_cache`).

Two ranks are two threads here: `group_rank_world` gives each its thread's rank and `rank_barrier` waits on a
`threading.Barrier`, so the protocol (each rank its share of the shards, rank 0 the manifest between two
barriers) runs as in a real process group (tests/integration/test_multinode.py runs it on two torchrun
nodes). `_write_latent_shard` is wrapped to record which rank wrote which shard.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest

import lightning_modules.latent_cache as lc
from datamodules.webdata import WebDataModule
from tests import tiny_checkpoints as tiny

TRAIN_SHARDS = ["train-00000.tar", "train-00001.tar", "train-00002.tar", "train-00003.tar"]


@pytest.fixture
def dm(tiny_data) -> WebDataModule:
    return WebDataModule(data_dir=str(tiny_data / "fashion_mnist"), image_size=32, channels=1, eval_batch_size=64,
                         num_workers=0)  # fmt: skip


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    return tiny.write_autoencoder(tmp_path_factory.mktemp("ae") / "final.ckpt")[0]


@pytest.fixture
def ranks(monkeypatch):
    """-> (rank of this thread, the shards each rank wrote); a lone caller is rank 0 of 1."""
    local = threading.local()
    writes: list[tuple[int, str]] = []
    write = lc._write_latent_shard

    def spy(codec, dm, url, path, *args):
        writes.append((getattr(local, "rank", 0), Path(path).name))
        return write(codec, dm, url, path, *args)

    monkeypatch.setattr(lc, "_write_latent_shard", spy)
    # raising=False: the code before the distributed cache had neither (every process encoded every shard)
    monkeypatch.setattr(lc, "group_rank_world", lambda: (getattr(local, "rank", 0), getattr(local, "world", 1)),
                        raising=False)  # fmt: skip
    monkeypatch.setattr(lc, "rank_barrier", lambda: contextlib.nullcontext(getattr(local, "barrier", lambda: None)),
                        raising=False)  # fmt: skip
    return local, writes


def build(cache: Path, dm: WebDataModule, ae_ckpt: Path) -> dict:
    return lc.ensure_latent_cache(cache, dm, ae_ckpt, batch_size=64, progress=False)


def build_on_two_ranks(cache: Path, dm: WebDataModule, ae_ckpt: Path, local) -> list[dict]:
    wait = threading.Barrier(2, timeout=300).wait
    results: list = [None, None]

    def rank(r: int) -> None:
        local.rank, local.world, local.barrier = r, 2, wait
        try:
            results[r] = build(cache, dm, ae_ckpt)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_two_ranks_encode_disjoint_shares_and_make_the_one_process_cache(dm, ae_ckpt, tmp_path, ranks):
    local, writes = ranks
    manifests = build_on_two_ranks(tmp_path / "two", dm, ae_ckpt, local)
    assert sorted(writes) == [(0, "train-00000.tar"), (0, "train-00002.tar"), (1, "train-00001.tar"),
                              (1, "train-00003.tar")]  # fmt: skip
    assert manifests[0] == manifests[1] == json.loads((tmp_path / "two" / "manifest.json").read_text())
    # the shards do not depend on which rank wrote them: the same bytes as one process's cache
    writes.clear()
    one = build(tmp_path / "one", dm, ae_ckpt)
    assert sorted(name for _, name in writes) == TRAIN_SHARDS
    assert one == manifests[0]
    assert one["splits"]["train"]["num_samples"] == dm.num_samples("train")
    assert all(s["bytes"] == (tmp_path / "one" / s["name"]).stat().st_size for s in one["splits"]["train"]["shards"])


def test_killed_build_resumes_and_its_stale_temps_are_removed(dm, ae_ckpt, tmp_path, ranks):
    _, writes = ranks
    cache = tmp_path / "latents"
    first = build(cache, dm, ae_ckpt)
    # killed while writing shard 2 (its temp file left, no record) before the manifest (one left half-written)
    (cache / "manifest.json").unlink()
    (cache / "train-00002.tar").unlink()
    (cache / "train-00002.tar.json").unlink(missing_ok=True)
    stale = [cache / ".train-00002.tar.k1ll3d.tmp", cache / ".manifest.json.k1ll3d.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    kept = {n: (cache / n).stat().st_mtime_ns for n in TRAIN_SHARDS if n != "train-00002.tar"}
    writes.clear()
    assert build(cache, dm, ae_ckpt) == first
    assert writes == [(0, "train-00002.tar")]  # the finished shards were verified and kept
    assert kept == {n: (cache / n).stat().st_mtime_ns for n in kept}
    assert not any(p.exists() for p in stale)


def test_a_damaged_shard_is_re_encoded_alone(dm, ae_ckpt, tmp_path, ranks):
    _, writes = ranks
    cache = tmp_path / "latents"
    first = build(cache, dm, ae_ckpt)
    shard = cache / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    writes.clear()
    assert build(cache, dm, ae_ckpt) == first
    assert writes == [(0, "train-00001.tar")]


def test_a_cache_of_another_autoencoder_is_rebuilt_and_a_finished_one_reused(dm, ae_ckpt, tmp_path, ranks):
    _, writes = ranks
    cache = tmp_path / "latents"
    first = build(cache, dm, ae_ckpt)
    writes.clear()
    assert build(cache, dm, ae_ckpt) == first and writes == []
    other, fingerprint = tiny.write_autoencoder(tmp_path / "other.ckpt", seed=1)
    second = build(cache, dm, other)
    assert second["identity"]["autoencoder_fingerprint"] == fingerprint != first["identity"]["autoencoder_fingerprint"]
    assert sorted(name for _, name in writes) == TRAIN_SHARDS


def test_a_cache_made_before_shard_records_is_reused(dm, ae_ckpt, tmp_path, ranks):
    """A manifest of this identity without records (and without shard sizes): its checksums are the records."""
    _, writes = ranks
    cache = tmp_path / "latents"
    first = build(cache, dm, ae_ckpt)
    old = json.loads((cache / "manifest.json").read_text())
    for shard in old["splits"]["train"]["shards"]:
        shard.pop("bytes", None)
        (cache / f"{shard['name']}.json").unlink(missing_ok=True)
    (cache / "manifest.json").write_text(json.dumps(old))
    writes.clear()
    assert build(cache, dm, ae_ckpt) == first and writes == []


def test_a_shard_another_rank_did_not_finish_is_an_error_and_no_manifest_is_written(dm, ae_ckpt, tmp_path, ranks):
    local, writes = ranks
    local.rank, local.world = 0, 2  # rank 1 never ran
    with pytest.raises(RuntimeError, match=r"no finished record .*train-00001\.tar\.json for shard train-00001\.tar"):
        build(tmp_path / "latents", dm, ae_ckpt)
    assert sorted(writes) == [(0, "train-00000.tar"), (0, "train-00002.tar")]
    assert not (tmp_path / "latents" / "manifest.json").exists()


def test_several_processes_without_a_process_group_are_refused_before_writing(dm, ae_ckpt, tmp_path, monkeypatch):
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="one of 2 .* no torch.distributed process group is initialised"):
        build(tmp_path / "latents", dm, ae_ckpt)
    assert not (tmp_path / "latents").exists()


def _barrier_rank(rank: int, port: int, results) -> None:
    """A process of a 2-rank gloo group: both enter `rank_barrier`, wait once, then rank 1 dies."""
    import os
    import time

    import torch.distributed as td

    from core.dist import group_rank_world, rank_barrier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    with rank_barrier() as wait:
        wait()
        if rank == 1:
            os._exit(3)
        start = time.monotonic()
        try:
            wait()
            results.put((group_rank_world(), "returned"))
        except RuntimeError as e:
            results.put((group_rank_world(), f"raised after {time.monotonic() - start:.0f} s: {e}"))


def test_rank_barrier_of_a_real_group_fails_at_once_when_a_rank_dies():
    """The barrier's timeout is a day; a dead rank is noticed by its closed connections, not by the timeout."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_barrier_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        (rank_world, outcome) = results.get(timeout=240)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert rank_world == (0, 2)
    assert outcome.startswith("raised after") and int(outcome.split()[2]) < 60, outcome
    assert [p.exitcode for p in procs] == [0, 3]
