"""Fault: credentials planted in the environment, in a shard URL and in config values, then a search of every
file of the run directory (configs, `.hydra/`, logs, `wandb/`, CSV, Slurm output) that must find none.

The shard URL is a `pipe:curl` command with a bearer header and a signed query string that still reads the
local shards; the config values are a URL with a password (`+logger.wandb.notes`) and `${oc.env:HF_TOKEN}`
under an innocent key. W&B stays offline. The Slurm variant runs the same through `launcher=slurm` on the
local test cluster when one is up (`bash slurm/local_cluster.sh status`), and checks that a job gets only the
named variables of the submitting environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny_checkpoints as tiny
from tests.conftest import REPO, run_cli, tiny_overrides

RUN = "default/fashion_mnist"
ENV_SECRET = "plainEnvSecret8d2kq93jfz"  # no recognisable shape: only the environment rule can find it
BEARER = "bearerSecretQ7w2e9r4t6y8"
SIGNATURE = "sigSecretZx3c5v7b9n"
PASSWORD = "userinfoSecretK4j6h8g0"
SECRETS = (ENV_SECRET, BEARER, SIGNATURE, PASSWORD)
EVAL = ["guidance.scales=[1]", "num_samples=40", "batch_size=20", "sampler.num_steps=3", "grid_per_class=2",
        "progress=false"]  # fmt: skip


@pytest.fixture
def planted(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)  # read by conftest.cli_env(): every CLI run inherits it


def secret_overrides(tiny_data: Path) -> list[str]:
    """A curl pipe with a bearer header and a signed URL that still reads the local train shards; a URL with a
    password in the W&B notes; the environment's token resolved under an innocent key."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the planted shard URL is a `pipe:curl` command")
    data = tiny_data / "fashion_mnist"
    shards = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]
    first, last = (re.search(r"(\d+)\.tar$", s["name"]).group(1) for s in (shards[0], shards[-1]))
    url = (f"pipe:curl -s -f -H 'Authorization: Bearer {BEARER}' "
           f"'file://{data}/train-{{{first}..{last}}}.tar?se=2030-01-01&sig={SIGNATURE}'")  # fmt: skip
    return [f'+data.urls.train="{url}"', f'+logger.wandb.notes="mirror https://alice:{PASSWORD}@example.org/x"',
            "+note=${oc.env:HF_TOKEN}"]  # fmt: skip


def files_with_secrets(root: Path) -> dict[str, list[str]]:
    """Every file under `root` (binary ones included: checkpoints, W&B's .wandb) that holds a planted secret."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        hits = [s for s in SECRETS if s.encode() in data]
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


def test_no_secret_in_any_file_of_a_local_run(planted, tiny_data, tmp_path):
    run = tmp_path / RUN
    tiny.write_upstream_run(run)  # the evaluation's checkpoints; the feature-net stage trains for real
    out = run_cli("pipeline.run", "stages=[feature_net_perceptual,evaluate]", "debug=fdr", "logger=wandb",
                  *EVAL, *secret_overrides(tiny_data), *tiny_overrides(tiny_data, tmp_path)[:2])  # fmt: skip
    stage = run / "feature_net_perceptual"
    assert (stage / "DONE").exists() and (run / "eval" / "cfg" / "results.json").exists(), out.stdout[-3000:]
    assert list((run / "wandb").glob("offline-run-*")), "W&B wrote no offline run"
    assert files_with_secrets(tmp_path) == {}
    assert not [s for s in SECRETS if s in out.stdout + out.stderr]
    # the records are there, scrubbed, not dropped: .hydra, the saved config, the printed command line
    overrides = (stage / ".hydra" / "overrides.yaml").read_text()
    assert "Authorization: Bearer ***" in overrides and "sig=***" in overrides, overrides
    assert "alice:***@example.org" in (stage / "config.yaml").read_text()
    assert "note: '***'" in (stage / "config.yaml").read_text()
    assert (run / "eval" / "cfg" / ".hydra" / "config.yaml").exists()
    assert "Bearer ***" in out.stdout


def test_no_secret_in_csv_logs_and_hparams(planted, tiny_data, tmp_path):
    run_cli("pipeline.run", "stages=[feature_net_eval]", "debug=fdr", *secret_overrides(tiny_data)[::2],
            *tiny_overrides(tiny_data, tmp_path))  # fmt: skip  (logger=csv)
    assert list((tmp_path / RUN / "feature_net_eval" / "csv").rglob("hparams.yaml"))
    assert files_with_secrets(tmp_path) == {}


# --- Slurm -------------------------------------------------------------------------------------------------


@pytest.fixture
def slurm_cluster(monkeypatch) -> str:
    """SLURM_CONF of a running local test cluster (`bash slurm/local_cluster.sh status`), else skip."""
    try:
        status = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "status"], capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"local Slurm cluster not reachable: {error}")
    conf = re.search(r"SLURM_CONF=(\S+)", status.stdout)
    if status.returncode != 0 or conf is None:
        pytest.skip(f"local Slurm cluster not running (slurm/local_cluster.sh status exited {status.returncode}: "
                    f"{(status.stderr or status.stdout).strip()[-300:]})")  # fmt: skip
    monkeypatch.setenv("SLURM_CONF", conf.group(1))
    return conf.group(1)


@pytest.mark.slurm
def test_no_secret_in_slurm_job_logs_or_files(planted, slurm_cluster, tiny_data, tmp_path):
    out = run_cli("pipeline.run", "stages=[feature_net_perceptual]", "debug=fdr", "logger=wandb",
                  "launcher=slurm", "launcher.wait=true", "launcher.cpus_per_task=1",
                  # the job resolves ${oc.env:HF_TOKEN}: it gets that token by name, as a user would export it
                  "++launcher.export_env=[PATH,HOME,OMP_NUM_THREADS,WANDB_MODE,HF_TOKEN]", *secret_overrides(tiny_data),
                  *tiny_overrides(tiny_data, tmp_path)[:2], timeout=900)  # fmt: skip
    run = tmp_path / RUN
    logs = list((run / "logs").glob("feature_net_perceptual-*.out"))
    assert logs and (run / "feature_net_perceptual" / "DONE").exists(), out.stdout[-3000:]
    assert files_with_secrets(tmp_path) == {}
    assert not [s for s in SECRETS if s in out.stdout + out.stderr]
    assert "Bearer ***" in logs[0].read_text()  # the job script echoes its overrides, masked


@pytest.mark.slurm
def test_slurm_job_gets_only_named_variables(planted, slurm_cluster, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from pipeline import slurm
    from pipeline.run import Step
    from pipeline.slurm_chain import stage_sbatch_argv

    monkeypatch.chdir(REPO)  # GLDM_ROOT: the job imports tests.faults.print_env from here
    launcher = OmegaConf.load(REPO / "conf" / "launcher" / "slurm.yaml")
    launcher.cpus_per_task = 1
    launcher.venv = sys.prefix if sys.prefix != sys.base_prefix else None
    step = Step("print_env", "tests.faults.print_env", "train", [], distributed=False)
    argv = stage_sbatch_argv(step, launcher, tmp_path, [])
    assert not [a for a in argv if a.startswith("--export=ALL")], argv
    assert ENV_SECRET not in " ".join(argv)
    job = slurm.submit(argv)
    assert slurm.wait_for(job, timeout=300)[job] == "COMPLETED"
    env = dict(line.split("=", 1) for line in (tmp_path / f"print_env-{job}.out").read_text().splitlines()
               if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line))  # fmt: skip
    assert "HF_TOKEN" not in env and ENV_SECRET not in "\n".join(env.values())
    assert env["PATH"] == os.environ["PATH"] or env.get("VIRTUAL_ENV")  # named variables do travel
    assert env["GLDM_ROOT"] == str(REPO) and "SLURM_JOB_ID" in env
