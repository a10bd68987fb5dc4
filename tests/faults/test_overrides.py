"""Bad overrides on a finished stage: validate first, then touch (docs/ARCHITECTURE.md, "Resume and skip rules").

A finished `feature_net` stage (debug=fdr) is hit with overrides a user mistypes; each run must exit
non-zero with a message naming the key, before any file of the stage is moved or deleted (every file is
hashed before and after). A config changed and then changed back brings the set-aside state back, and a
`data.urls` override is checked against the manifest and is part of the stage hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_overrides

STAGE = Path("default/fashion_mnist/feature_net_eval")
ARGS = ["stage=feature_net", "debug=fdr"]


def snapshot(stage_dir: Path) -> dict[str, str]:
    """sha256 of every file under the stage folder but `.hydra/` (Hydra's record of the last command line,
    written before the entry point runs: not the stage's state)."""
    return {str(p.relative_to(stage_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(stage_dir.rglob("*")) if p.is_file() and ".hydra" not in p.parts}  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """One finished feature_net stage (runs root, a pristine copy of its stage folder)."""
    runs = tmp_path_factory.mktemp("runs")
    run_cli("pipeline.train", *ARGS, *tiny_overrides(tiny_data, runs))
    copy = tmp_path_factory.mktemp("pristine") / "stage"
    shutil.copytree(runs / STAGE, copy)
    return runs, copy


@pytest.fixture
def finished(pristine) -> Path:
    """The runs root with the finished stage as it was made (stage hashes include its path, so it is
    restored in place rather than copied elsewhere)."""
    runs, copy = pristine
    shutil.rmtree(runs / STAGE)
    shutil.copytree(copy, runs / STAGE)
    return runs


def train(tiny_data: Path, runs: Path, *extra: str, check: bool = True):
    return run_cli("pipeline.train", *ARGS, *tiny_overrides(tiny_data, runs), *extra, check=check)


@pytest.mark.parametrize(
    "override,says",
    [
        ("stage.module.optimizer.lr=abc", "stage.module.optimizer.lr='abc': expected a number > 0"),
        ("data.batch_size=0", "data.batch_size=0: expected an integer > 0"),
        ("data.resize=crop", "data.resize must be 'pad' or 'resize', got 'crop'"),  # caught by building the datamodule
        ("trainer.precision=bf17", "Precision 'bf17' is invalid"),  # caught by building the trainer
    ],
)
def test_bad_override_leaves_a_finished_stage_untouched(tiny_data, finished, override, says):
    before = snapshot(finished / STAGE)
    proc = train(tiny_data, finished, override, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert snapshot(finished / STAGE) == before, output[-3000:]
    assert says in output and f"nothing in {finished / STAGE} was changed" in output, output[-3000:]


def test_changed_then_restored_config_is_skipped(tiny_data, finished):
    before = snapshot(finished / STAGE)
    changed = train(tiny_data, finished, "stage.module.optimizer.lr=0.001")
    assert "config changed" in changed.stdout
    aside = list((finished / STAGE).glob("checkpoints.superseded-*"))
    assert len(aside) == 1 and (aside[0] / "DONE").is_file() and (aside[0] / "final.ckpt").is_file()
    back = train(tiny_data, finished)
    assert "restored from" in back.stdout and "skipping" in back.stdout, back.stdout[-2000:]
    after = snapshot(finished / STAGE)
    # the finished state is back byte for byte; the changed config's state is kept aside in turn
    kept = {k: v for k, v in after.items() if not k.startswith("checkpoints.superseded-") and not k.startswith("csv")}
    assert kept == {k: v for k, v in before.items() if not k.startswith("csv")}
    assert any(k.startswith("checkpoints.superseded-") and k.endswith("DONE") for k in after)


def test_unfinished_stage_resumes_after_restore(tiny_data, finished):
    (finished / STAGE / "DONE").unlink()  # as if killed after its last checkpoint, before DONE
    train(tiny_data, finished, "stage.module.optimizer.lr=0.001")
    back = train(tiny_data, finished)
    assert "restored from" in back.stdout
    assert f"resuming from {finished / STAGE / 'checkpoints' / 'last.ckpt'}" in back.stdout, back.stdout[-2000:]
    assert (finished / STAGE / "DONE").is_file()


def test_data_urls_override_is_part_of_the_hash(tiny_data, finished):
    shards = tiny_data / "fashion_mnist"
    n = len(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"])
    pattern = f"{shards}/train-{{00000..{n - 1:05d}}}.tar"
    proc = train(tiny_data, finished, f"+data.urls.train='{pattern}'")
    assert "config changed" in proc.stdout and "skipping" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    "pattern,says",
    [
        ("{data}/train-{{00000..00001}}.tar", "data.urls.train names 2 shard(s) but split 'train'"),
        ("/nonexistent/train-{{00000..{last}}}.tar", "data.urls.train: shard /nonexistent/train-00000.tar does not exist"),
        ("{data}/val-{{00000..{last}}}.tar", "is not a shard of split 'train'"),
    ],
)  # fmt: skip
def test_bad_data_urls_fail_before_touching_anything(tiny_data, finished, pattern, says):
    shards = tiny_data / "fashion_mnist"
    n = len(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"])
    before = snapshot(finished / STAGE)
    proc = train(tiny_data, finished, f"+data.urls.train='{pattern.format(data=shards, last=f'{n - 1:05d}')}'",
                 check=False)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert snapshot(finished / STAGE) == before, output[-3000:]
    assert says in output, output[-3000:]


def test_url_credentials_do_not_change_the_hash():
    from pipeline.builders import url_identity

    signed = "https://user:tok1@store.example:8443/fm/train-{0..3}.tar?sig=abc&se=1"
    rotated = "https://other:tok2@store.example:8443/fm/train-{0..3}.tar?sig=def&se=2"
    assert url_identity(signed) == url_identity(rotated) == "https://store.example:8443/fm/train-{0..3}.tar"
    assert url_identity("/data/fm/train-{0..3}.tar") == "/data/fm/train-{0..3}.tar"
    assert url_identity("https://store.example/a.tar") != url_identity("https://store.example/b.tar")


def test_every_shipped_config_passes_the_rules():
    """No false alarm: the rules accept every stage x experiment x debug config and every sweep config."""
    from hydra import compose, initialize_config_dir

    from pipeline.config_checks import EVALUATE_RULES, TRAIN_RULES, violations
    from tests.conftest import REPO

    experiments = [None, *sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for exp in experiments:
            extra = [f"experiment={exp}"] if exp else []
            for stage in ("feature_net", "autoencoder", "diffusion", "classifier"):
                for debug in (None, "fdr", "limit", "overfit"):
                    ov = [f"stage={stage}", *extra, *([f"debug={debug}"] if debug else [])]
                    assert violations(compose("train", overrides=ov), TRAIN_RULES) == [], ov
            for guidance in ("cfg", "classifier", "both"):
                ov = [f"guidance={guidance}", *extra]
                assert violations(compose("evaluate", overrides=ov), EVALUATE_RULES) == [], ov


def test_a_negative_nonfinite_tolerance_is_refused():
    """`nonfinite_tolerance` is read by the non-finite guard of every stage: a negative count is a config error."""
    from hydra import compose, initialize_config_dir

    from pipeline.config_checks import TRAIN_RULES, violations
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["stage=feature_net", "nonfinite_tolerance=-1"])
    assert [v for v in violations(cfg, TRAIN_RULES) if v.startswith("nonfinite_tolerance=-1")], violations(cfg, TRAIN_RULES)


def test_bad_evaluate_override_is_refused_before_anything_loads(tiny_data, tmp_path):
    """The sweep checks its keys first: no checkpoint is needed to be told that a value is wrong."""
    proc = run_cli("pipeline.evaluate", *tiny_overrides(tiny_data, tmp_path), "num_samples=0", "batch_size=-4",
                   check=False)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "num_samples=0: expected an integer > 0" in output and "batch_size=-4: expected an integer > 0" in output
    assert "Traceback" not in output, output[-3000:]
