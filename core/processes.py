"""Child processes that do not outlive their parent: a stage run by `pipeline.run`, a prepare's shard writers.
A parent killed with SIGKILL (`kill -9`, the OOM killer) cannot stop its children itself; without this, a
writer would go on writing its shard while the user's re-run writes the same one. And processes that do not
share their parent's services: a stage's W&B service is its own (`forget_parent_services`)."""

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


# Variables that address something of one process (W&B's service socket): a child or a Slurm job must not
# inherit them (`forget_parent_services`, `pipeline.slurm_chain.exported_names`).
PROCESS_LOCAL_ENV = ("WANDB_SERVICE",)


def forget_parent_services() -> None:
    """Start a stage process with a W&B service of its own. W&B keeps the address of a process's service in
    WANDB_SERVICE and every child inherits it (sbatch's `WANDB_*` export too), so a stage started from a
    process that had used W&B (a notebook, a test session, a sweep driver) logged through *that* service:
    gone when it ends, unreachable from another node, and still holding the stream of a run killed by a
    requeue, so the requeued stage's `wandb.init` failed with "run ID ... is in use". Call it first in an
    entry point's main, before W&B is imported; DDP ranks started as subprocesses drop it too (they do not
    log), spawned ones do not run main and keep their parent's, as W&B's attach needs."""
    for name in PROCESS_LOCAL_ENV:
        os.environ.pop(name, None)
