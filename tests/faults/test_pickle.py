"""A malicious pickle where a checkpoint is expected, through the real CLI (issue 13): nothing executes.

The payload creates a marker file when unpickled by the full unpickler; every loader of the pipeline is
weights-only (`lightning_modules/artifacts.py` `safe_load`, `pipeline/checkpoints.py`), so the marker must
never appear, whether the file is an upstream stage's `final.ckpt` or the `last.ckpt` a stage resumes from."""

from __future__ import annotations

import builtins
from pathlib import Path

import torch

from tests.conftest import run_cli, tiny_overrides

STAGE = "default/fashion_mnist/feature_net_eval"


class CreatesFile:
    """Unpickling this calls open(path, "w"): it creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def plant(path: Path, stage: str, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stage": stage, "global_step": 1, "state_dict": {}, "hyper_parameters": {"x": CreatesFile(marker)}},
               path)  # fmt: skip
    torch.load(path, weights_only=False)  # the payload is real: the full unpickler runs it
    assert marker.exists()
    marker.unlink()


def test_malicious_upstream_checkpoint_is_refused_naming_it(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    upstream = tmp_path / "default" / "fashion_mnist" / "autoencoder" / "checkpoints" / "final.ckpt"
    plant(upstream, "autoencoder", marker)
    proc = run_cli("pipeline.train", "stage=diffusion", "debug=fdr", *tiny_overrides(tiny_data, tmp_path), check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert str(upstream) in proc.stdout + proc.stderr and "weights_only=True" in proc.stdout + proc.stderr
    assert not marker.exists(), "the upstream checkpoint's payload was executed"
    assert not (tmp_path / "default" / "fashion_mnist" / "diffusion" / "DONE").exists()


def test_malicious_resume_checkpoint_is_set_aside_and_never_run(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    last = tmp_path / STAGE / "checkpoints" / "last.ckpt"
    plant(last, "feature_net", marker)
    proc = run_cli("pipeline.train", "stage=feature_net", "debug=fdr", *tiny_overrides(tiny_data, tmp_path))
    assert not marker.exists(), "the resume checkpoint's payload was executed"
    assert f"cannot resume from {last}" in proc.stdout, proc.stdout[-3000:]
    assert (last.parent / "last.ckpt.corrupt").exists() and (tmp_path / STAGE / "DONE").exists()
