"""The sbatch command lines `pipeline.run launcher=slurm` builds (no cluster needed; the real submissions
are tested in tests/integration/test_run_slurm.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pipeline.run import Step
from pipeline.slurm_chain import eval_array_argv, stage_sbatch_argv

LAUNCHER = OmegaConf.create({
    "partition": "gpu", "account": "proj", "qos": None, "time": "01:00:00", "nodes": 2, "ntasks_per_node": 4,
    "cpus_per_task": 8, "gpus_per_node": 4, "extra": ["--mem=64G"], "venv": "/opt/venv",
    "eval_array_parallel": 2,
})  # fmt: skip


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_training_stage_gets_one_task_per_device_on_every_node(tmp_path):
    step = Step("diffusion", "pipeline.train", "train", ["stage=diffusion"], True, ["trainer=ddp"])
    argv = stage_sbatch_argv(step, LAUNCHER, tmp_path, ["41"])
    flags = _flags(argv)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gres"]) == ("2", "4", "gpu:4")
    assert flags["dependency"] == "afterok:41" and flags["partition"] == "gpu" and "qos" not in flags
    assert flags["output"] == str(tmp_path / "diffusion-%j.out") and "--mem=64G" in argv
    assert "GLDM_ENTRY=pipeline.train" in flags["export"] and "GLDM_VENV=/opt/venv" in flags["export"]
    assert Path(argv[-3]).name == "stage.sbatch" and argv[-2:] == ["stage=diffusion", "trainer=ddp"]


def test_sweep_is_an_array_of_single_device_tasks(tmp_path):
    step = Step("evaluate", "pipeline.evaluate", "evaluate", [], False, ["guidance.scales=[1,3]"])
    argv = eval_array_argv(step, LAUNCHER, tmp_path, [], n=6)
    flags = _flags(argv)
    assert flags["array"] == "0-5%2" and "dependency" not in flags
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gres"]) == ("1", "1", "gpu:1")
    assert flags["output"] == str(tmp_path / "evaluate-%A_%a.out")
    assert "GLDM_ENTRY" not in flags["export"] and "GLDM_VENV=/opt/venv" in flags["export"]
    assert Path(argv[-2]).name == "eval_array.sbatch" and argv[-1] == "guidance.scales=[1,3]"
