"""Prepare as a Slurm array job on the real local cluster (issue 14): `pipeline.prepare launcher=slurm` and
pipeline.run's prepare step submit an array of shard-range tasks and a manifest job after it; the manifest
equals the one a local prepare writes."""

from __future__ import annotations

import re
import subprocess

import pytest

from datamodules.shards import load_manifest
from tests.conftest import run_cli
from tests.integration.test_local_slurm import cluster  # noqa: F401  (the module-scoped fixture)
from tests.integration.test_prepare_cli import make_folder

pytestmark = pytest.mark.slurm


def folder_args(tmp_path, name: str) -> list[str]:
    return ["data=imagefolder", f"data.source.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.image_size=16",
            "data.val_size=4", "data.test_size=4", "data.shard_size=4", f"data.name={name}",
            f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}", "progress=false"]  # fmt: skip


def test_prepare_array_job_writes_the_manifest_of_a_local_prepare(cluster, tmp_path):  # noqa: F811
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    run_cli("pipeline.prepare", *folder_args(tmp_path, "local"))
    out = run_cli("pipeline.prepare", *folder_args(tmp_path, "arr"), "launcher=slurm", "launcher.prepare_tasks=3",
                  "launcher.cpus_per_task=1", "launcher.wait=true", timeout=600)  # fmt: skip
    array = re.search(r"prepare: submitted array job (\d+) \(3 shard ranges", out.stdout)
    manifest_job = re.search(r"prepare_manifest: submitted job (\d+) \(after array (\d+)\)", out.stdout)
    assert array and manifest_job and manifest_job.group(2) == array.group(1), out.stdout[-3000:]
    logs = tmp_path / "runs" / "default" / "arr" / "logs"
    task_logs = sorted(logs.glob(f"prepare-{array.group(1)}_*.out"))
    assert len(task_logs) == 3, sorted(p.name for p in logs.iterdir())
    for i, log in enumerate(task_logs):  # task i wrote its own, non-empty range of the shards
        assert re.search(rf"shard task {i} of 3: [1-9]\d* of \d+ shard", log.read_text()), log.read_text()[-2000:]
    manifest_log = (logs / f"prepare_manifest-{manifest_job.group(1)}.out").read_text()
    assert "[prepare] arr:" in manifest_log and "Traceback" not in manifest_log, manifest_log[-2000:]
    local, arr = load_manifest(tmp_path / "data" / "local"), load_manifest(tmp_path / "data" / "arr")
    assert arr["content_hash"] == local["content_hash"] and arr["splits"] == local["splits"]
    assert arr["num_skipped"] == 1
    # submitted again: the finished manifest is verified by one job, nothing rewritten
    again = run_cli("pipeline.prepare", *folder_args(tmp_path, "arr"), "launcher=slurm", "launcher.prepare_tasks=3",
                    "launcher.cpus_per_task=1", "launcher.wait=true", timeout=600)  # fmt: skip
    assert "submitted array job" not in again.stdout and re.search(r"prepare: submitted job \d+", again.stdout), again.stdout
    assert load_manifest(tmp_path / "data" / "arr") == arr


@pytest.mark.slow  # a training job after prepare's jobs: ~3 min on 2 shared cores; the dependency itself is
# checked without a cluster by test_prepare_array.py::test_run_chain_stages_depend_on_the_manifest_job
def test_run_chain_stages_wait_for_the_manifest_job(cluster, tmp_path):  # noqa: F811
    make_folder(tmp_path / "imgs")
    out = run_cli("pipeline.run", "stages=[prepare,feature_net_perceptual]", "debug=fdr", "logger=csv",
                  *folder_args(tmp_path, "chain"), "launcher=slurm", "launcher.prepare_tasks=2",
                  "launcher.cpus_per_task=1", "launcher.wait=true", "data.batch_size=4", "data.eval_batch_size=4",
                  "data.num_workers=0", timeout=900)  # fmt: skip
    array = re.search(r"prepare: submitted array job (\d+) \(2 shard ranges", out.stdout)
    manifest_job = re.search(r"prepare_manifest: submitted job (\d+)", out.stdout)
    stage_job = re.search(r"feature_net_perceptual: submitted job (\d+)", out.stdout)
    assert array and manifest_job and stage_job, out.stdout[-3000:]
    shown = subprocess.run(["scontrol", "show", "job", "-o", stage_job.group(1)], capture_output=True, text=True).stdout
    assert f"afterok:{manifest_job.group(1)}" in shown or "Dependency=(null)" in shown  # satisfied ones are cleared
    run = tmp_path / "runs" / "default" / "chain"
    manifest = tmp_path / "data" / "chain" / "manifest.json"
    assert load_manifest(manifest.parent)["splits"]["train"]["num_samples"] == 16
    assert (run / "feature_net_perceptual" / "DONE").exists()
    assert manifest.stat().st_mtime <= (run / "feature_net_perceptual" / "STARTED").stat().st_mtime
