"""A real one-node Slurm cluster (slurm/local_cluster.sh): ranks under srun, dependency chains,
USR1 + `scontrol requeue` (the mechanism of Lightning's auto-requeue), the sbatch templates, the
submission helpers of pipeline.slurm and the Hydra submitit launcher config.

The module fixture starts the cluster (installing Debian's packages if needed) and stops it at the end,
unless it was already running (e.g. started by `make test`), in which case it is left up. Without root, or
when the packages cannot be installed, the tests that need it skip with that reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
JOB_TIMEOUT_S = 60.0
# Installing the packages on a fresh machine is the slow part of a first start.
START_TIMEOUT_S = 1200


def _cluster(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=env,
        check=False,
    )


def slurm_conf_printed(output: str) -> Path | None:
    """The cluster's slurm.conf from the `export SLURM_CONF=...` line `start` and `status` print (the
    cluster lives in a private mktemp directory; only the script knows which)."""
    match = re.search(r"^export SLURM_CONF=(\S+)$", output, re.MULTILINE)
    return Path(match.group(1)) if match else None


def _slurm_installed() -> bool:
    return all(
        shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin") for name in ("slurmctld", "sbatch")
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Path]:
    """The cluster's slurm.conf, with SLURM_CONF pointing at it for the module's tests."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd and munged run as root)")
    was_up = _cluster("status").returncode == 0
    started = _cluster("start")
    if started.returncode != 0:
        if not _slurm_installed():
            pytest.skip(f"Slurm packages cannot be installed: {started.stderr.strip()[-600:]}")
        pytest.fail(f"local_cluster.sh start failed:\n{started.stderr}")
    conf = slurm_conf_printed(started.stdout)
    assert conf is not None and conf.is_file(), started.stdout
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        yield conf
    if not was_up:
        stopped = _cluster("stop")
        assert stopped.returncode == 0, stopped.stderr


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/bash\n" + body)
    return str(path)


def _sbatch(script: str, output: Path, **overrides: object) -> list[str]:
    options: dict = dict(
        job_name="gldm-test",
        nodes=1,
        ntasks_per_node=1,
        cpus_per_task=1,
        gres=None,
        time="5",
        partition=None,
        account=None,
        qos=None,
        output=str(output),
    )
    options.update(overrides)
    return slurm.sbatch_command(script, **options)


def _wait_for_file(path: Path, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's zombie may wait to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- pipeline.slurm without a cluster --------------------------------------------------------------


def test_sbatch_command_builds_argv() -> None:
    argv = slurm.sbatch_command(
        "slurm/stage.sbatch",
        job_name="ldm",
        nodes=2,
        ntasks_per_node=4,
        cpus_per_task=8,
        gres="gpu:4",
        time="1-00:00:00",
        partition="gpu",
        account=None,
        qos="high",
        output="runs/logs/%x-%j.out",
        dependency=["11", "12"],
        array="0-3%2",
        extra=["--exclusive"],
        args=["experiment=fashion_mnist", "+note=a b"],
    )
    assert argv == [
        "sbatch",
        "--parsable",
        "--job-name=ldm",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--time=1-00:00:00",
        "--output=runs/logs/%x-%j.out",
        "--gres=gpu:4",
        "--partition=gpu",
        "--qos=high",
        "--array=0-3%2",
        "--dependency=afterok:11:12",
        "--exclusive",
        "slurm/stage.sbatch",
        "experiment=fashion_mnist",
        "+note=a b",
    ]


def test_sbatch_command_rejects_zero_tasks() -> None:
    with pytest.raises(ValueError, match="ntasks_per_node"):
        _sbatch("job.sh", Path("out.log"), ntasks_per_node=0)


def test_hydra_submitit_launcher_config_composes() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["hydra/launcher=submitit"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.signal_delay_s == 90 and launcher.tasks_per_node == 1


# --- the cluster -----------------------------------------------------------------------------------


@pytest.mark.slurm
def test_cluster_start_status_stop_leaves_nothing(cluster: Path, tmp_path: Path) -> None:
    """A second cluster on free ports: start, idempotent start, stop with a job running, no process left."""
    parent = Path(tempfile.mkdtemp(prefix="gldm-"))  # short: munged's socket path has at most 107 characters
    env = {
        **os.environ,
        "LOCAL_SLURM_TMPDIR": str(parent),
        "LOCAL_SLURM_POINTER_DIR": str(parent / "pointers"),
        "LOCAL_SLURM_CTLD_PORT": str(_free_port()),
        "LOCAL_SLURM_SLURMD_PORT": str(_free_port()),
    }
    try:
        assert _cluster("status", env=env).returncode == 1
        first = _cluster("start", env=env)
        assert first.returncode == 0, first.stderr
        conf = slurm_conf_printed(first.stdout)
        assert conf is not None and conf.parent.name == "etc", first.stdout
        state = conf.parent.parent
        env["SLURM_CONF"] = str(conf)
        pids = {
            name: int((state / "run" / f"{name}.pid").read_text())
            for name in ("munged", "slurmctld", "slurmd")
        }
        again = _cluster("start", env=env)
        assert again.returncode == 0 and "already running" in again.stderr
        assert pids == {name: int((state / "run" / f"{name}.pid").read_text()) for name in pids}
        status = _cluster("status", env=env)
        assert status.returncode == 0 and "idle" in status.stdout

        pid_file = tmp_path / "job.pid"
        script = _script(
            tmp_path / "sleep.sh", f"echo $$ > {pid_file}\nsleep 300 & echo $! >> {pid_file}\nwait\n"
        )
        subprocess.run(["sbatch", "--output=/dev/null", script], env=env, check=True, capture_output=True)
        _wait_for_file(pid_file)
        time.sleep(0.3)
        job_pids = [int(line) for line in pid_file.read_text().split()]

        stopped = _cluster("stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert _cluster("status", env=env).returncode == 1
        assert [pid for pid in [*pids.values(), *job_pids] if _running(pid)] == []
        assert not state.exists()
    finally:
        _cluster("stop", env=env)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.slurm
def test_two_tasks_see_their_ranks(cluster: Path, tmp_path: Path) -> None:
    report = (
        "import json, os; print(json.dumps({k: os.environ[k] for k in ('SLURM_PROCID', 'SLURM_NTASKS')}))"
    )
    script = _script(tmp_path / "ranks.sh", f'srun {sys.executable} -c "{report}"\n')
    output = tmp_path / "ranks.out"
    job = slurm.submit(_sbatch(script, output, ntasks_per_node=2))
    assert slurm.wait_for([job], timeout=JOB_TIMEOUT_S, poll=0.5) == {job: "COMPLETED"}
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["SLURM_PROCID"] for r in records) == ["0", "1"]
    assert {r["SLURM_NTASKS"] for r in records} == {"2"}


@pytest.mark.slurm
def test_afterok_chain_runs_in_order(cluster: Path, tmp_path: Path) -> None:
    stamp = "date +%s.%N >> {}\n"
    first_log, second_log = tmp_path / "first.txt", tmp_path / "second.txt"
    first_script = _script(
        tmp_path / "first.sh", stamp.format(first_log) + "sleep 2\n" + stamp.format(first_log)
    )
    second_script = _script(tmp_path / "second.sh", stamp.format(second_log))
    first = slurm.submit(_sbatch(first_script, tmp_path / "first.out"))
    second = slurm.submit(_sbatch(second_script, tmp_path / "second.out", dependency=[first]))
    assert slurm.wait_for([second, first], timeout=JOB_TIMEOUT_S, poll=0.5) == {
        first: "COMPLETED",
        second: "COMPLETED",
    }
    first_start, first_end = (float(t) for t in first_log.read_text().split())
    (second_start,) = (float(t) for t in second_log.read_text().split())
    assert first_start + 2 <= first_end <= second_start


@pytest.mark.slurm
def test_dependent_of_failed_job_never_runs(cluster: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    failing = slurm.submit(_sbatch(_script(tmp_path / "fail.sh", "exit 3\n"), tmp_path / "fail.out"))
    dependent = slurm.submit(
        _sbatch(_script(tmp_path / "dep.sh", f"touch {marker}\n"), tmp_path / "dep.out", dependency=[failing])
    )
    states = slurm.wait_for([failing, dependent], timeout=JOB_TIMEOUT_S, poll=0.5)
    assert states[failing] == "FAILED"
    assert states[dependent] in {"CANCELLED", slurm.DEPENDENCY_NEVER_SATISFIED}
    assert not marker.exists()


@pytest.mark.slurm
def test_wait_for_times_out_and_submit_reports_stderr(cluster: Path, tmp_path: Path) -> None:
    job = slurm.submit(_sbatch(_script(tmp_path / "long.sh", "sleep 300\n"), tmp_path / "long.out"))
    try:
        with pytest.raises(TimeoutError, match=job):
            slurm.wait_for([job], timeout=0.5, poll=0.1)
    finally:
        subprocess.run(["scancel", job], check=True)
    assert slurm.wait_for(job, timeout=JOB_TIMEOUT_S, poll=0.5) == {job: "CANCELLED"}
    with pytest.raises(slurm.SlurmError, match="(?i)invalid partition"):
        slurm.submit(_sbatch(str(tmp_path / "long.sh"), tmp_path / "x.out", partition="no-such-partition"))


def _requeue_counts(log: Path) -> list[str]:
    return log.read_text().split()


@pytest.mark.slurm
def test_batch_shell_catches_usr1_and_requeues_itself(cluster: Path, tmp_path: Path) -> None:
    log, child = tmp_path / "runs.txt", tmp_path / "child.pid"
    body = f"""echo "run${{SLURM_RESTART_COUNT:-0}}" >> {log}
[[ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]] && exit 0
trap 'echo usr1 >> {log}; scontrol requeue "$SLURM_JOB_ID"' USR1
sleep 120 &
echo $! > {child}
wait $!
"""
    script = _script(tmp_path / "requeue.sh", body)
    job = slurm.submit(_sbatch(script, tmp_path / "requeue.out", extra=["--requeue", "--open-mode=append"]))
    _wait_for_file(log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    assert slurm.wait_for([job], timeout=JOB_TIMEOUT_S, poll=0.5) == {job: "COMPLETED"}
    assert _requeue_counts(log) == ["run0", "usr1", "run1"]
    # The first run's background child died with it (proctrack/linuxproc let it live on).
    assert not _running(int(child.read_text()))


@pytest.mark.slurm
def test_srun_step_catches_usr1_and_requeues_job(cluster: Path, tmp_path: Path) -> None:
    """Lightning's path: the python task under srun gets USR1 and runs `scontrol requeue $SLURM_JOB_ID`."""
    log, ready = tmp_path / "runs.txt", tmp_path / "ready"
    step = tmp_path / "step.py"
    step.write_text(
        f"""import os, signal, subprocess, sys, time
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
with open({str(log)!r}, "a") as f:
    f.write(f"run{{restart}}\\n")
if restart != "0":
    sys.exit(0)

def requeue(signum, frame):
    with open({str(log)!r}, "a") as f:
        f.write("usr1\\n")
    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)

signal.signal(signal.SIGUSR1, requeue)
open({str(ready)!r}, "w").close()
time.sleep(120)
"""
    )
    script = _script(tmp_path / "requeue.sh", f"srun {sys.executable} {step}\n")
    job = slurm.submit(_sbatch(script, tmp_path / "requeue.out", extra=["--requeue", "--open-mode=append"]))
    _wait_for_file(ready)
    # Without --batch the signal goes to the job steps only, as with `#SBATCH --signal=USR1@90`.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    assert slurm.wait_for([job], timeout=JOB_TIMEOUT_S, poll=0.5) == {job: "COMPLETED"}
    assert _requeue_counts(log) == ["run0", "usr1", "run1"]


# --- the sbatch templates, with stand-in entry points -----------------------------------------------

_STAND_IN = """import json, os, sys
record = {{"argv": sys.argv[1:], "rank": os.environ["SLURM_PROCID"], "ntasks": os.environ["SLURM_NTASKS"],
          "venv": os.environ.get("VIRTUAL_ENV"), "cwd": os.getcwd()}}
with open(os.path.join({out!r}, "{name}-" + os.environ.get("SLURM_ARRAY_TASK_ID", "x") + "-" + record["rank"]), "w") as f:
    json.dump(record, f)
"""


def _fake_repo(root: Path, out: Path, module: str) -> None:
    """A GLDM_ROOT whose pipeline.<module> records its argv and Slurm rank instead of training (with the real
    core/secrets.py, through which the job scripts echo their overrides)."""
    (root / "core").mkdir(parents=True)
    shutil.copy(REPO / "core" / "secrets.py", root / "core" / "secrets.py")
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / f"{module}.py").write_text(_STAND_IN.format(out=str(out), name=module))


def _template_env(root: Path) -> dict[str, str]:
    return {"GLDM_ROOT": str(root), "GLDM_VENV": sys.prefix}


@pytest.mark.slurm
def test_stage_sbatch_runs_train_under_srun(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "repo", tmp_path / "records"
    out.mkdir()
    _fake_repo(root, out, "train")
    for key, value in _template_env(root).items():
        monkeypatch.setenv(key, value)
    overrides = ["experiment=fashion_mnist_quick", "+note=two words"]
    log = tmp_path / "stage.log"
    argv = _sbatch(str(REPO / "slurm" / "stage.sbatch"), log, ntasks_per_node=2, args=overrides)
    job = slurm.submit(argv)
    assert slurm.wait_for([job], timeout=JOB_TIMEOUT_S, poll=0.5) == {job: "COMPLETED"}, log.read_text()
    records = [json.loads(p.read_text()) for p in sorted(out.iterdir())]
    assert [r["rank"] for r in records] == ["0", "1"]
    assert all(r["argv"] == overrides and r["ntasks"] == "2" for r in records)
    assert all(r["venv"] == sys.prefix and r["cwd"] == str(root) for r in records)
    shown = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, check=True
    ).stdout
    assert "Requeue=1" in shown
    assert "pipeline.train experiment=fashion_mnist_quick" in log.read_text()


_ONE_RANK_FAILS = """import os, sys, time
with open(os.path.join({out!r}, "rank-" + os.environ["SLURM_PROCID"]), "w") as f:
    f.write(str(os.getpid()))
if os.environ["SLURM_PROCID"] == "0":
    sys.exit("rank 0: a config error, a full disk, W&B refusing the run")
time.sleep(300)  # the other rank: waiting in DDP's first collective for a rank that is gone
"""


@pytest.mark.slurm
def test_stage_sbatch_ends_the_job_when_one_rank_fails(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank that exits with an error ends the whole job (srun --kill-on-bad-exit): the other ranks, waiting
    in a collective for it (gloo/NCCL wait 30 min by default), no longer hold the nodes until the time limit."""
    root, out = tmp_path / "repo", tmp_path / "records"
    out.mkdir()
    _fake_repo(root, out, "train")
    (root / "pipeline" / "train.py").write_text(_ONE_RANK_FAILS.format(out=str(out)))
    for key, value in _template_env(root).items():
        monkeypatch.setenv(key, value)
    log = tmp_path / "stage.log"
    job = slurm.submit(_sbatch(str(REPO / "slurm" / "stage.sbatch"), log, ntasks_per_node=2))
    try:
        states = slurm.wait_for([job], timeout=JOB_TIMEOUT_S, poll=0.5)
    finally:
        subprocess.run(["scancel", job], check=False)
    assert states == {job: "FAILED"}, log.read_text()
    waiting = int((out / "rank-1").read_text())
    deadline = time.monotonic() + 10
    while _running(waiting) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(waiting), "the waiting rank outlived its job"


@pytest.mark.slurm
def test_eval_array_sbatch_adds_sweep_index(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "repo", tmp_path / "records"
    out.mkdir()
    _fake_repo(root, out, "evaluate")
    for key, value in _template_env(root).items():
        monkeypatch.setenv(key, value)
    argv = _sbatch(
        str(REPO / "slurm" / "eval_array.sbatch"),
        tmp_path / "eval-%a.log",
        array="0-1",
        args=["guidance=cfg"],
    )
    job = slurm.submit(argv)
    assert slurm.wait_for([job], timeout=JOB_TIMEOUT_S, poll=0.5) == {job: "COMPLETED"}
    records = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert {name: r["argv"] for name, r in records.items()} == {
        "evaluate-0-0": ["guidance=cfg", "sweep_index=0"],
        "evaluate-1-0": ["guidance=cfg", "sweep_index=1"],
    }


@pytest.mark.slurm
def test_hydra_submitit_launcher_runs_a_sweep(cluster: Path, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        f"""import os
import hydra

@hydra.main(config_path=None, config_name=None, version_base="1.3")
def main(cfg):
    with open(os.path.join({str(tmp_path)!r}, f"x{{cfg.x}}"), "w") as f:
        f.write(os.environ["SLURM_JOB_ID"])

main()
"""
    )
    overrides = [
        "-m",
        "hydra/launcher=submitit",
        f"hydra.searchpath=[file://{REPO / 'conf'}]",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
        "+x=1,2",
    ]
    result = subprocess.run(
        [sys.executable, str(app), *overrides], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    job_ids = {(tmp_path / f"x{x}").read_text() for x in (1, 2)}
    assert len(job_ids) == 2
