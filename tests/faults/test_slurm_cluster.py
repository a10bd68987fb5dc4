"""The local Slurm test cluster (slurm/local_cluster.sh) and `make test` without root (issue 13, item 7).

As root (CI): the cluster lives in a private `mktemp -d` directory (mode 0700) with a munge key made fresh
at every start, never one found on disk, and `stop` removes it. Without root: the scripts do not abort
`make test`; every other test runs and the Slurm tests skip with the reason. The unprivileged runs use
`setpriv` to uid/gid 65534 (nobody) on a copy of the repository that user owns, as a researcher's own
checkout would be.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_local_slurm import _free_port, _slurm_installed, slurm_conf_printed

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
NOBODY = 65534
SKIP_ROOT_ONLY = "the local Slurm cluster needs root (slurmd and munged run as root)"


def _sh(argv: list[str], env: dict[str, str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def _unprivileged() -> list[str]:
    """The prefix that runs a command as an unprivileged user: setpriv to nobody as root, nothing otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot drop root to test the unprivileged path")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all"]  # fmt: skip


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory outside root's private pytest tree, usable by the unprivileged user."""
    path = Path(tempfile.mkdtemp(prefix="gldm-faults-"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _missing_packages_path(root: Path) -> str:
    """A PATH whose dpkg-query reports every package as not installed (as on a machine without them)."""
    bin_dir = root / "fakebin"
    bin_dir.mkdir()
    fake = bin_dir / "dpkg-query"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    return f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"


@pytest.mark.slurm
def test_cluster_dir_is_private_with_a_fresh_key_and_removed_by_stop(shared_tmp):
    if os.geteuid() != 0:
        pytest.skip(SKIP_ROOT_ONLY)
    tmp_path = shared_tmp  # short: munged's socket path must stay under 108 characters
    parent, pointers, fixed = tmp_path / "tmp", tmp_path / "pointers", tmp_path / "fixed"
    parent.mkdir()
    planted = b"planted key " * 86  # where the old script looked for (and reused) a key
    (fixed / "munge").mkdir(parents=True)
    (fixed / "munge" / "munge.key").write_bytes(planted)
    env = {**os.environ, "LOCAL_SLURM_TMPDIR": str(parent), "LOCAL_SLURM_POINTER_DIR": str(pointers),
           "LOCAL_SLURM_DIR": str(fixed), "LOCAL_SLURM_CTLD_PORT": str(_free_port()),
           "LOCAL_SLURM_SLURMD_PORT": str(_free_port())}  # fmt: skip
    env.pop("SLURM_CONF", None)
    run = [shutil.which("bash") or "/bin/bash", str(CLUSTER)]
    try:
        keys, states = [], []
        for _ in range(2):
            started = _sh([*run, "start"], env, timeout=1200)
            if started.returncode != 0 and not _slurm_installed():
                pytest.skip(f"Slurm packages cannot be installed: {started.stderr.strip()[-600:]}")
            assert started.returncode == 0, started.stderr
            conf = slurm_conf_printed(started.stdout)
            assert conf is not None, started.stdout
            state = conf.parent.parent
            info = state.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, 0), f"{state} is not private"
            assert state.parent == parent and state.name.startswith("guided-ldm-slurm.") and state != fixed
            key = state / "munge" / "munge.key"
            assert stat.S_IMODE(key.stat().st_mode) == 0o400 and key.read_bytes() != planted
            status = _sh([*run, "status"], env)
            assert status.returncode == 0 and f"export SLURM_CONF={conf}" in status.stdout, status.stderr
            keys.append(key.read_bytes())
            states.append(state)
            stopped = _sh([*run, "stop"], env)
            assert stopped.returncode == 0, stopped.stderr
            assert not state.exists(), f"stop left {state}"
            assert _sh([*run, "status"], env).returncode == 1
        assert states[0] != states[1] and keys[0] != keys[1], "a restart reused the directory or the key"
        assert list(pointers.iterdir()) == [] and list(parent.iterdir()) == []
        assert (fixed / "munge" / "munge.key").read_bytes() == planted  # never read, never touched
    finally:
        _sh([*run, "stop"], env)


def test_scripts_without_root_do_not_abort_and_say_why(shared_tmp):
    as_user = _unprivileged()
    env = {"PATH": _missing_packages_path(shared_tmp), "HOME": str(shared_tmp),
           "LOCAL_SLURM_TMPDIR": str(shared_tmp), "LOCAL_SLURM_CTLD_PORT": str(_free_port())}  # fmt: skip
    deps = REPO / "scripts" / "system_deps.sh"
    for_tests = _sh([*as_user, "bash", str(deps), "test"], env)
    assert for_tests.returncode == 0, for_tests.stderr
    assert "not root, so not installed" in for_tests.stderr and "slurmctld" in for_tests.stderr
    for_run = _sh([*as_user, "bash", str(deps)], env)  # make run cannot work without the data: an error
    assert for_run.returncode == 1 and "error: missing Debian packages: dataset-fashion-mnist" in for_run.stderr

    stop = _sh([*as_user, "bash", str(CLUSTER), "stop"], env)  # make test's last step: nothing to stop
    assert stop.returncode == 0 and "not running" in stop.stderr, stop.stderr
    assert _sh([*as_user, "bash", str(CLUSTER), "status"], env).returncode == 1
    before = sorted(shared_tmp.iterdir())
    start = _sh([*as_user, "bash", str(CLUSTER), "start"], env)
    assert start.returncode == 1 and "must run as root" in start.stderr and "skips the Slurm ones" in start.stderr
    assert sorted(shared_tmp.iterdir()) == before  # no directory, no key, no pointer


def _venv_for(user_prefix: list[str], root: Path) -> Path:
    """A virtual environment the unprivileged user can run: this one when we are that user, else a new one
    on an interpreter nobody can execute, seeing this environment's packages (a .pth line)."""
    if not user_prefix:
        return Path(sys.prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [f"/usr/bin/python{version}", shutil.which(f"python{version}") or "",
                  os.path.realpath(getattr(sys, "_base_executable", sys.executable))]  # fmt: skip
    check = f"import sys; assert sys.version_info[:2] == ({version.replace('.', ', ')})"
    interpreter = next((c for c in candidates if c and _sh([*user_prefix, c, "-c", check], {}).returncode == 0), None)
    if interpreter is None:
        pytest.skip(f"no python{version} the unprivileged user may run (tried {candidates})")
    venv = root / "venv"
    subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True)
    import site

    site_dir = next(venv.glob("lib/python*/site-packages"))
    (site_dir / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    lint = venv / "bin" / "lint-imports"
    lint.write_text(f'#!/bin/sh\nexec "{venv}/bin/python" -c "import sys; from importlinter.cli import '
                    f'lint_imports_command; sys.exit(lint_imports_command())" "$@"\n')  # fmt: skip
    lint.chmod(0o755)
    return venv


def test_make_test_without_root_runs_the_other_tests_and_skips_the_slurm_ones(shared_tmp):
    """The real `make test` recipe as an unprivileged user on a machine without the Debian packages."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    as_user = _unprivileged()
    checkout = shared_tmp / "checkout"
    shutil.copytree(REPO, checkout, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "outputs", "multirun", "__pycache__", ".pytest_cache", ".import_linter_cache"))  # fmt: skip
    venv = _venv_for(as_user, shared_tmp)
    if as_user:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(shared_tmp)], check=True)
        probe = _sh([*as_user, str(venv / "bin" / "python"), "-c", "import torch, pytest, importlinter"], {})
        if probe.returncode != 0:
            pytest.skip(f"this environment's packages are not usable by uid {NOBODY}: {probe.stderr[-300:]}")
    env = {"PATH": _missing_packages_path(shared_tmp), "HOME": str(shared_tmp), "OMP_NUM_THREADS": "1"}
    selection = "rejects_zero_tasks or two_tasks_see_their_ranks"  # one plain test, one needing the cluster
    args = f"-p no:cacheprovider -q tests/integration/test_local_slurm.py -k '{selection}'"
    proc = _sh([*as_user, "make", "-o", f"{venv}/.installed-stamp", "test", f"VENV={venv}", f"ARGS={args}"],
               env, cwd=checkout)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "not root, so not installed" in out and "must run as root" in out
    assert "1 passed, 1 skipped" in out and "SKIPPED [1] tests/integration/test_local_slurm.py" in out, out[-3000:]
    assert SKIP_ROOT_ONLY in out
