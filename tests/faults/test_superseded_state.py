"""Setting a stage's state aside and bringing it back (`pipeline.builders.supersede_stale`), in process: a job
killed midway, an older folder of the same name, a forced job requeued by Slurm. Nothing is ever deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.builders import supersede_stale

A, B = "a" * 64, "b" * 64


@pytest.fixture(autouse=True)
def rank_zero_outside_slurm(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_STEP_ID",
                "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def finished_stage(stage: Path, chash: str, tag: str) -> Path:
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "checkpoints" / "last.ckpt").write_text(f"last {tag}")
    (stage / "checkpoints" / "final.ckpt").write_text(f"final {tag}")
    (stage / "DONE").write_text(json.dumps({"config_hash": chash}))
    (stage / "metrics.json").write_text(f'{{"tag": "{tag}"}}')
    (stage / "hpc_ckpt_1.ckpt").write_text(f"hpc {tag}")
    (stage / "STARTED").write_text(json.dumps({"config_hash": chash}))
    return stage


def files(stage: Path) -> dict[str, str]:
    return {str(p.relative_to(stage)): p.read_text() for p in sorted(stage.rglob("*")) if p.is_file()}


def test_round_trip_brings_every_file_back(tmp_path):
    stage = finished_stage(tmp_path / "s", A, "A")
    before = {k: v for k, v in files(stage).items() if k != "STARTED"}
    supersede_stale(stage, B)
    assert not (stage / "DONE").exists() and not (stage / "checkpoints").exists()
    assert (stage / f"checkpoints.superseded-{A[:12]}" / "hpc_ckpt_1.ckpt").read_text() == "hpc A"
    supersede_stale(stage, A)
    after = files(stage)
    assert {k: v for k, v in after.items() if k != "STARTED" and "superseded" not in k} == before
    assert json.loads(after["STARTED"])["config_hash"] == A


def test_a_set_aside_killed_before_its_last_rename_is_completed(tmp_path):
    stage = finished_stage(tmp_path / "s", A, "A")
    # killed after DONE and metrics went into checkpoints/ with their record, before the folder's rename
    (stage / "checkpoints" / "SUPERSEDED.json").write_text(json.dumps({"config_hash": A, "stage_files": ["DONE"]}))
    (stage / "DONE").rename(stage / "checkpoints" / "DONE")
    supersede_stale(stage, B)
    aside = stage / f"checkpoints.superseded-{A[:12]}"
    assert sorted(p.name for p in aside.iterdir()) == ["DONE", "SUPERSEDED.json", "final.ckpt", "hpc_ckpt_1.ckpt",
                                                        "last.ckpt", "metrics.json"]  # fmt: skip
    supersede_stale(stage, A)  # back: DONE where it belongs
    assert json.loads((stage / "DONE").read_text())["config_hash"] == A
    assert not (stage / "checkpoints" / "SUPERSEDED.json").exists()


def test_an_older_folder_of_the_same_config_is_kept(tmp_path):
    stage = finished_stage(tmp_path / "s", A, "new")
    older = stage / f"checkpoints.superseded-{A[:12]}"
    older.mkdir()
    (older / "last.ckpt").write_text("old")  # left by a tree that did not restore
    supersede_stale(stage, A, force=True)
    assert (stage / f"checkpoints.superseded-{A[:12]}.1" / "last.ckpt").read_text() == "old"
    assert (stage / f"checkpoints.superseded-{A[:12]}" / "last.ckpt").read_text() == "last new"
    assert not (stage / "checkpoints").exists() and not (stage / "DONE").exists()


def test_a_forced_job_requeued_by_slurm_resumes(tmp_path, monkeypatch):
    stage = tmp_path / "s"
    stage.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    supersede_stale(stage, A, force=True)
    assert json.loads((stage / "STARTED").read_text()) == {"config_hash": A, "forced_by": "42"}
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_text("forced, step 300")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued after preemption
    supersede_stale(stage, A, force=True)
    assert (stage / "checkpoints" / "last.ckpt").read_text() == "forced, step 300"
    monkeypatch.setenv("SLURM_JOB_ID", "43")  # a new job with force=true: from scratch again
    supersede_stale(stage, A, force=True)
    assert not (stage / "checkpoints").exists()
    assert (stage / f"checkpoints.superseded-{A[:12]}" / "last.ckpt").read_text() == "forced, step 300"
