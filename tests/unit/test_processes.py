"""core.processes: a child started with `die_with_parent` ends when its parent is killed with SIGKILL.

pipeline.run's SIGKILL test cannot tell this apart from a stage ending on a broken pipe (it prints progress
into the killed orchestrator's pipe); a quiet child (a long evaluation, a sleep) only ends through the prctl.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, processes_running

PARENT = """
import subprocess, sys, time
from core.processes import die_with_parent
kw = {"preexec_fn": die_with_parent} if sys.argv[1] == "1" else {}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], **kw)
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
@pytest.mark.parametrize("with_prctl", [True, False])
def test_a_quiet_child_ends_with_its_killed_parent_only_through_die_with_parent(with_prctl):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "1" if with_prctl else "0"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        child = int(parent.stdout.readline())
    finally:  # the parent sleeps for 2 minutes: never leave it behind, even when it printed no pid
        parent.kill()
        parent.wait()
    try:
        left = processes_running([child], within=10 if with_prctl else 3)
        assert left == ([] if with_prctl else [child])  # the control: without the prctl the orphan sleeps on
    finally:
        if processes_running([child]):
            os.kill(child, signal.SIGKILL)
