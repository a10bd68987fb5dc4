"""Child processes that do not outlive their parent: a stage run by `pipeline.run`, a prepare's shard writers.
A parent killed with SIGKILL (`kill -9`, the OOM killer) cannot stop its children itself; without this, a
writer would go on writing its shard while the user's re-run writes the same one."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Have Linux SIGKILL this process when its parent ends (prctl PR_SET_PDEATHSIG). Call it in the child, as
    a `subprocess` `preexec_fn` of a process that starts children from its main thread only: the signal comes
    when the *thread* that forked the child ends, not the process. `parent`, the pid that started the child:
    if that process has already ended (the child was re-parented before the prctl), exit at once. A no-op
    where prctl is not available (not Linux). For `multiprocessing` Pool workers use `exit_with_parent`."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def exit_with_parent(parent: int, interval: float = 0.05) -> None:
    """A `multiprocessing` Pool initializer: a daemon thread ends this worker (`os._exit`) within `interval`
    seconds of its parent `parent` ending. Not PR_SET_PDEATHSIG: a Pool forks replacement workers
    (`maxtasksperchild`) from its worker-handler thread, and that thread ends at `Pool.terminate()`; a worker
    the signal killed then, while it held the task queue's lock, left `terminate()` waiting for the lock
    for ever (seen in the 2-writer kill test)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (Linux: /proc/<pid>/task/<tid>/children; [] elsewhere or when the
    process has ended)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended while being read
            continue
    return out
