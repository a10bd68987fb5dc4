"""Prepare split over Slurm array tasks (issue 14): the deterministic shard plan, disjoint contiguous ranges,
the manifest job, and the sbatch jobs `launcher=slurm` submits (a fake `submit`; the real cluster runs them
in tests/integration/test_prepare_slurm.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from PIL import Image

from datamodules.shards import PROGRESS_DIR, load_manifest, plan_dataset, shard_range
from datamodules.sources import ImageFolder
from pipeline import slurm_chain
from pipeline.prepare import prepare
from tests.conftest import REPO


def make_folder(root: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("cat" if i % 3 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def config(tmp_path: Path, *extra: str):
    args = ["data=imagefolder", f"data.source.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.image_size=8",
            "data.val_size=4", "data.test_size=4", "data.shard_size=5", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.runs_dir={tmp_path / 'runs'}", "progress=false", *extra]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="prepare", overrides=args), args


def test_shard_ranges_are_contiguous_disjoint_and_cover_the_plan(tmp_path):
    src = ImageFolder(str(make_folder(tmp_path / "imgs")), image_size=8)
    plan = plan_dataset(src, tmp_path / "out", name="x", config={}, val_size=4, test_size=4, shard_size=5)
    again = plan_dataset(ImageFolder(str(tmp_path / "imgs"), image_size=8), tmp_path / "out", name="x", config={},
                         val_size=4, test_size=4, shard_size=5)  # fmt: skip
    assert [s.plan for s in plan.shards] == [s.plan for s in again.shards]  # what every task computes
    for n in range(1, len(plan.shards) + 3):
        ranges = [shard_range(plan.shards, t, n) for t in range(n)]
        assert [s.name for r in ranges for s in r] == [s.name for s in plan.shards]  # in order: contiguous
        if n <= 3:
            assert all(ranges), n  # balanced by samples: every task has work while there are enough shards
    with pytest.raises(ValueError, match="shard_task"):
        shard_range(plan.shards, 3, 3)


def test_array_tasks_then_manifest_job_equal_a_local_prepare(tmp_path):
    make_folder(tmp_path / "imgs")
    cfg, _ = config(tmp_path, "data.name=local")
    local = prepare(cfg)
    for task in range(3):
        cfg, _ = config(tmp_path, f"shard_task={task}", "shard_tasks=3")
        assert prepare(cfg) is None
    out = tmp_path / "data" / "imagefolder"
    assert not (out / "manifest.json").exists() and len(list((out / PROGRESS_DIR).glob("*.json"))) > 3
    cfg, _ = config(tmp_path, "manifest_only=true")
    manifest = prepare(cfg)
    assert manifest == load_manifest(out) and not (out / PROGRESS_DIR).exists()
    assert manifest["content_hash"] == local["content_hash"]
    assert {k: v for k, v in manifest.items() if k != "name"} == {k: v for k, v in local.items() if k != "name"}
    assert manifest["num_skipped"] == 1
    # a re-run of the manifest job verifies and keeps the finished manifest; a task has nothing to write
    assert prepare(config(tmp_path, "manifest_only=true")[0]) == manifest
    assert prepare(config(tmp_path, "shard_task=0", "shard_tasks=3")[0]) is None
    assert load_manifest(out) == manifest


def test_manifest_job_refuses_missing_or_foreign_shards(tmp_path):
    make_folder(tmp_path / "imgs")
    prepare(config(tmp_path, "shard_task=0", "shard_tasks=2")[0])
    out = tmp_path / "data" / "imagefolder"
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) .* are not finished"):
        prepare(config(tmp_path, "manifest_only=true")[0])
    assert not (out / "manifest.json").exists()
    prepare(config(tmp_path, "shard_task=1", "shard_tasks=2")[0])
    # the source changed after the tasks ran: the same number of files, another file at the same index
    (tmp_path / "imgs" / "cat" / "001.jpg").rename(tmp_path / "imgs" / "cat" / "001x.jpg")
    with pytest.raises(FileNotFoundError, match="source folder changed"):
        prepare(config(tmp_path, "manifest_only=true")[0])
    assert not (out / "manifest.json").exists()


def _fake_sbatch(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def submit(argv):
        calls.append(list(argv))
        return str(100 + len(calls))

    monkeypatch.setattr(slurm_chain, "submit", submit)
    return calls


def test_launcher_slurm_submits_an_array_then_a_manifest_job(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs")
    calls = _fake_sbatch(monkeypatch)
    cfg, args = config(tmp_path, "launcher=slurm", "launcher.prepare_tasks=3")
    prepare(cfg, [*args, "shard_task=7"])  # a typed shard_task would contradict the array's: dropped
    array, manifest_job = calls
    assert array[-1] == "shard_tasks=3" and "--array=0-2" in array and "shard_task=7" not in array
    assert Path(array[array.index(next(a for a in array if a.endswith(".sbatch")))]).name == "prepare_array.sbatch"
    assert not any(a.startswith("launcher") for a in array + manifest_job)  # the jobs run prepare locally
    assert "--dependency=afterok:101" in manifest_job and manifest_job[-1] == "manifest_only=true"
    assert "--export=GLDM_ENTRY=pipeline.prepare" in " ".join(manifest_job)
    assert not (tmp_path / "data" / "imagefolder").exists()  # nothing written by the submission


def test_launcher_slurm_errors_before_any_sbatch(tmp_path, monkeypatch):
    calls = _fake_sbatch(monkeypatch)
    cfg, args = config(tmp_path, "launcher=slurm")  # no folder made: data.source.root does not exist
    with pytest.raises(InstantiationException, match=r"image folder .* does not exist \(data.source.root\)"):
        prepare(cfg, args)
    make_folder(tmp_path / "imgs")
    out = tmp_path / "data" / "imagefolder"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"config_hash": "another config", "splits": {}}))
    with pytest.raises(FileExistsError, match="force=true"):
        prepare(cfg, args)
    cfg, args = config(tmp_path, "launcher=slurm", "launcher.prepare_tasks=0")
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="launcher.prepare_tasks"):
        prepare(cfg, args)
    assert calls == []


def _chain(tmp_path, prepare_args: list[str], submitted: list) -> list[str]:
    from omegaconf import OmegaConf

    from pipeline.run import Step

    launcher = OmegaConf.load(REPO / "conf" / "launcher" / "slurm.yaml")
    launcher.merge_with({"log_dir": str(tmp_path / "logs"), "venv": None, "prepare_tasks": 2, "cpus_per_task": 1})
    steps = [Step("prepare", "pipeline.prepare", "prepare", [], False, prepare_args),
             Step("autoencoder", "pipeline.train", "train", ["stage=autoencoder"], True)]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return slurm_chain.submit_chain(steps, OmegaConf.create({"launcher": launcher}),
                                        lambda step: (False, "not run yet"))  # fmt: skip


def test_run_chain_stages_depend_on_the_manifest_job(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs")
    calls = _fake_sbatch(monkeypatch)
    ids = _chain(tmp_path, config(tmp_path)[1], calls)
    array, manifest_job, stage = calls
    assert ids == ["101", "102", "103"] and "--array=0-1" in array and "manifest_only=true" in manifest_job
    assert "--dependency=afterok:101" in manifest_job and "--dependency=afterok:102" in stage


def test_run_chain_refuses_a_bad_source_before_any_sbatch(tmp_path, monkeypatch):
    calls = _fake_sbatch(monkeypatch)  # no folder made: data.source.root does not exist
    with pytest.raises(InstantiationException, match=r"data.source.root"):
        _chain(tmp_path, config(tmp_path)[1], calls)
    assert calls == []


def test_slurm_prepare_jobs_use_the_cpus_they_were_given(tmp_path, monkeypatch):
    """Each prepare job (array task, manifest job, or one job) writes with `num_workers=auto`, the CPUs of its
    allocation (launcher.cpus_per_task), unless the command line sets num_workers."""
    make_folder(tmp_path / "imgs")
    calls = _fake_sbatch(monkeypatch)
    cfg, args = config(tmp_path, "launcher=slurm", "launcher.prepare_tasks=2", "launcher.cpus_per_task=6")
    prepare(cfg, args)
    assert len(calls) == 2 and all("num_workers=auto" in job and "--cpus-per-task=6" in job for job in calls)
    calls.clear()
    cfg, args = config(tmp_path, "launcher=slurm", "launcher.prepare_tasks=2", "num_workers=3")
    prepare(cfg, args)
    assert all("num_workers=3" in job and "num_workers=auto" not in job for job in calls)


def test_num_workers_auto_is_the_cpus_of_the_allocation(tmp_path, monkeypatch):
    from core.machine import usable_cpus

    mask = len(os.sched_getaffinity(0))
    assert usable_cpus({}) == mask
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert usable_cpus({"SLURM_CPUS_PER_TASK": str(mask + 8)}) == mask  # never more than the process may use
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "lots"}) == mask
    make_folder(tmp_path / "imgs")
    seen = []
    import pipeline.prepare as entry

    monkeypatch.setattr(entry, "write_shards", lambda *a, **k: seen.append(k["num_workers"]) or {})
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    prepare(config(tmp_path, "num_workers=auto", "shard_task=0", "shard_tasks=2")[0])
    assert seen == [1]


@pytest.mark.parametrize("bad", ["num_workers=0", "num_workers=many", "data.shard_size=0", "limit=-3"])
def test_bad_prepare_values_are_refused_before_anything_is_written(tmp_path, bad):
    from pipeline.config_checks import ConfigError

    make_folder(tmp_path / "imgs")
    key = bad.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.*expected"):
        prepare(config(tmp_path, bad)[0])
    assert not (tmp_path / "data").exists()
