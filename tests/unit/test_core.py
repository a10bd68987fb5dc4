"""The bottom layer: the one atomic writer (durable, umask honoured, nothing left behind on error) and the
one rank detector (every launcher the pipeline runs under)."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tarfile

import numpy as np
import pytest
import webdataset as wds

from core import io as cio
from core.dist import dist_env, env_rank

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_LOCALID")  # fmt: skip


# --- atomic writes ---------------------------------------------------------------------------------


def test_atomic_write_honours_the_umask_and_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(cio, "_UMASK", None)  # read again under this umask
        path = cio.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~0o027, as open() would give
    assert synced == [False, True]  # the file, then its directory (so the rename survives a crash)
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = cio.atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError, match="boom"), cio.atomic_open(path, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(ValueError, match="write mode"), cio.atomic_open(path, "r"):
        pass


def test_stale_temps_of_a_killed_write_are_removed(tmp_path):
    path = tmp_path / "train-00000.tar"
    stale = tmp_path / ".train-00000.tar.abc123.tmp"  # what mkstemp left when the writer was SIGKILLed
    stale.write_bytes(b"half a shard")
    other = tmp_path / ".train-00001.tar.def456.tmp"
    other.write_bytes(b"another shard's")
    assert cio.remove_stale_temps(path) == [stale]
    assert not stale.exists() and other.exists()


def test_a_tar_written_through_atomic_open_is_complete(tmp_path):
    """The shard and latent-cache writers hand atomic_open's file to webdataset's TarWriter."""
    path = tmp_path / "train-00000.tar"
    with cio.atomic_open(path, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "cls": i, "txt": f"caption {i}"})
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == sorted(f"k{i}.{ext}" for i in range(3) for ext in ("cls", "txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.tar"]


def test_json_helpers(tmp_path):
    row = {"b": np.float32(1.5), "a": math.nan, "c": (np.int64(2), tmp_path), 3: np.arange(2)}
    assert cio.json_safe(row) == {"b": 1.5, "a": None, "c": [2, str(tmp_path)], "3": [0, 1]}
    sorted_path = cio.atomic_write_json(tmp_path / "s.json", {"b": 1, "a": 2})
    assert sorted_path.read_text().index('"a"') < sorted_path.read_text().index('"b"')
    ordered = cio.atomic_write_json(tmp_path / "o.json", {"b": 1, "a": 2}, sort_keys=False)
    assert ordered.read_text().index('"b"') < ordered.read_text().index('"a"')
    assert cio.read_json(tmp_path / "missing.json", {}) == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert cio.read_json(tmp_path / "bad.json") is None
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        cio.read_json(tmp_path / "bad.json", strict=True)
    assert cio.read_json(tmp_path / "missing.json", strict=True) is None  # missing is not corrupt


def test_config_hash_is_canonical():
    from omegaconf import OmegaConf

    assert cio.config_hash({"a": 1, "b": [1, 2]}) == cio.config_hash({"b": [1, 2], "a": 1})
    assert cio.config_hash(OmegaConf.create({"a": 1, "b": "${a}"})) == cio.config_hash({"a": 1, "b": 1})
    assert cio.config_hash({"a": 1, "b": 2}, keys=["a"]) == cio.config_hash({"a": 1})
    assert cio.config_hash({"a": 1}) != cio.config_hash({"a": 2})


def test_sha256_file(tmp_path):
    empty = cio.atomic_write_bytes(tmp_path / "empty", b"")
    assert cio.sha256_file(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    data = os.urandom(3 << 20)  # over several read chunks
    assert cio.sha256_file(cio.atomic_write_bytes(tmp_path / "big", data), chunk=1 << 20) == hashlib.sha256(data).hexdigest()


# --- rank and world size -----------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)

    def set_env(**values):
        for var in LAUNCH_VARS:
            monkeypatch.delenv(var, raising=False)
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))
        return dist_env()

    return set_env


def test_rank_of_every_launcher(env):
    assert env() == (0, 1, 0)
    assert env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1) == (3, 4, 1)  # torchrun
    assert env(SLURM_NTASKS=4, SLURM_PROCID=0) == (0, 1, 0)  # the batch script itself, not an srun step
    assert env(SLURM_NTASKS=4, SLURM_PROCID=3, SLURM_STEP_ID=0, SLURM_LOCALID=1) == (3, 4, 1)  # srun
    # Lightning's subprocess launcher: children get LOCAL_RANK, NODE_RANK, WORLD_SIZE (no RANK)
    assert env(LOCAL_RANK=1, WORLD_SIZE=2) == (1, 2, 1)
    assert env(LOCAL_RANK=1, NODE_RANK=1, WORLD_SIZE=6, LOCAL_WORLD_SIZE=2) == (3, 6, 1)
    # ... inside a one-task srun step (srun --pty): Lightning started the ranks, not Slurm
    assert env(LOCAL_RANK=1, WORLD_SIZE=2, SLURM_NTASKS=1, SLURM_PROCID=0, SLURM_STEP_ID=0).rank == 1
    # ... and a Lightning child under srun's own DDP tasks keeps Slurm's rank
    assert env(LOCAL_RANK=0, WORLD_SIZE=4, SLURM_NTASKS=4, SLURM_PROCID=2, SLURM_STEP_ID=0) == (2, 4, 0)


def test_only_the_first_process_of_the_first_node_is_rank_0(env):
    """Without LOCAL_WORLD_SIZE the exact rank off node 0 is unknown; never 0, never another node's."""
    seen = set()
    for node in range(3):
        for local in range(2):
            rank = env(LOCAL_RANK=local, NODE_RANK=node, WORLD_SIZE=6).rank
            assert (rank == 0) == (node == 0 and local == 0)
            seen.add(rank)
    assert len(seen) == 6  # no two processes share a rank
    assert env(NODE_RANK=1).rank != 0  # a node-1 process before its launcher assigned ranks
    assert env(GROUP_RANK=2, LOCAL_RANK=0, WORLD_SIZE=4).rank != 0  # torchelastic's name for the node
    assert env(LOCAL_RANK=0, NODE_RANK=1, WORLD_SIZE=4)[0] == env_rank() != 0


def test_a_rank_without_a_world_size_is_refused(env):
    with pytest.raises(ValueError, match="RANK=1 is set but WORLD_SIZE is not"):
        env(RANK=1)


def test_publish_directory_is_all_or_nothing(tmp_path):
    """A directory appears complete or not at all; an existing one is replaced only with force, and only
    once the new one is complete; a failed write leaves the old one and no temporary directory."""
    out = tmp_path / "out"

    def write(text: str):
        def fill(tmp):
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.txt").write_text(text)
        return fill

    cio.publish_directory(out, write("one"))
    assert (out / "sub" / "a.txt").read_text() == "one"
    with pytest.raises(FileExistsError, match="force=true"):
        cio.publish_directory(out, write("two"))

    def broken(tmp):
        (tmp / "partial.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cio.publish_directory(out, broken, force=True)
    assert (out / "sub" / "a.txt").read_text() == "one" and not (out / "partial.txt").exists()
    cio.publish_directory(out, write("two"), force=True)
    assert (out / "sub" / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or set-aside directory
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        cio.publish_directory(tmp_path / "file", write("three"), force=True)
