"""The import-linter contract of pyproject.toml (docs/ARCHITECTURE.md's layers) holds, and catches an
upward import: run on a copy of the tree with one planted, it fails and names the import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("core", "datamodules", "lightning_modules", "eval", "pipeline")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    # A dev dependency (make test installs it): missing, the contract is unchecked, so this fails.
    assert LINT.exists(), f"{LINT} missing: pip install -e '.[dev]' (make test does it)"
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def copy_tree(dest: Path) -> Path:
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_tree_keeps_its_layers():
    proc = lint(REPO)
    assert proc.returncode == 0 and " 0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("module", "planted", "message"),
    [
        ("datamodules/shards.py", "import pipeline.common", "datamodules is not allowed to import pipeline"),
        ("lightning_modules/nets/unet.py", "import lightning_modules.artifacts",
         "lightning_modules.nets is not allowed to import lightning_modules.artifacts"),
        ("lightning_modules/diffusion/schedules.py", "import pytorch_lightning",
         "is not allowed to import pytorch_lightning"),
        ("lightning_modules/codec.py", "import wandb", "is not allowed to import wandb"),
        ("lightning_modules/autoencoder.py", "import eval.metrics", "lightning_modules is not allowed to import eval"),
    ],
)  # fmt: skip
def test_an_upward_import_breaks_the_contract(tmp_path, module, planted, message):
    root = copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    proc = lint(root)
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-3000:]
