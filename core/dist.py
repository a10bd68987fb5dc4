"""Rank and world size from the launcher's environment, before any process group exists; and, for code that
runs once it exists, the group's ranks and a barrier."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import NamedTuple


class DistEnv(NamedTuple):
    rank: int
    world: int
    local_rank: int


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def dist_env() -> DistEnv:
    """(rank, world size, local rank) of this process, from whichever launcher started it:

    - torchrun / Lightning's own ranks: RANK and WORLD_SIZE (both needed: a rank without a world size
      would make a sweep skip the batches of the ranks it does not know of).
    - Lightning's subprocess launcher (`trainer=ddp_cpu`, or DDP inside a one-task Slurm step): its
      children get LOCAL_RANK, NODE_RANK and WORLD_SIZE, no RANK. Rank = NODE_RANK * LOCAL_WORLD_SIZE +
      LOCAL_RANK when LOCAL_WORLD_SIZE is known; otherwise the exact rank off node 0 is unknown, and a
      number >= WORLD_SIZE is returned (only "rank 0 or not" may be relied on then).
    - srun: SLURM_PROCID and SLURM_NTASKS, only inside an srun step (SLURM_STEP_ID): the batch script
      itself also sees SLURM_NTASKS but is one process. Slurm's variables lose to Lightning's children
      when the step has fewer tasks than the DDP world (Lightning started the ranks itself).
    - A process on a node > 0 (NODE_RANK or GROUP_RANK) before its launcher assigned ranks is not rank 0.
    - Nothing set: (0, 1, 0).

    Rank 0 is always the first process of the first node: the one process that may move or delete a
    stage's files.
    """
    rank, world, local = _int("RANK"), _int("WORLD_SIZE"), _int("LOCAL_RANK")
    node = _int("NODE_RANK") or _int("GROUP_RANK") or 0
    if rank is not None:
        if world is None:
            raise ValueError(f"RANK={rank} is set but WORLD_SIZE is not: set both (torchrun does) or neither")
        return DistEnv(rank, world, local or 0)
    slurm_tasks = _int("SLURM_NTASKS")
    in_step = os.environ.get("SLURM_STEP_ID") not in (None, "") and _int("SLURM_PROCID") is not None
    lightning_child = local is not None and world is not None and world != (slurm_tasks if in_step else None)
    if in_step and slurm_tasks is not None and not lightning_child:
        return DistEnv(_int("SLURM_PROCID") or 0, slurm_tasks, _int("SLURM_LOCALID") or 0)
    if local is not None or node:
        world = world or 1
        local = local or 0
        per_node = _int("LOCAL_WORLD_SIZE")
        if per_node:
            return DistEnv(node * per_node + local, world, local)
        return DistEnv(local if node == 0 else node * world + local, world, local)
    return DistEnv(0, 1, 0)


def env_rank() -> int:
    """The global rank (see `dist_env`)."""
    return dist_env().rank


def exact_dist_env() -> DistEnv:
    """`dist_env()` for code that splits work by rank (the evaluation's batches): an environment whose exact
    rank `dist_env` cannot know (a process off node 0 without RANK or LOCAL_WORLD_SIZE) is refused, since
    that process would draw another rank's share and leave its own undone."""
    env = dist_env()
    if not 0 <= env.rank < env.world:
        names = ("NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE")
        launch = {k: os.environ[k] for k in names if k in os.environ}
        raise ValueError(
            f"cannot tell this process's rank from {launch}: set RANK and WORLD_SIZE for each process (torchrun "
            "and srun do), or LOCAL_WORLD_SIZE (processes per node) with NODE_RANK and LOCAL_RANK"
        )
    return env


def group_rank_world() -> tuple[int, int]:
    """(rank, world size) for code that waits on the other ranks (`rank_barrier`): the initialised default
    torch.distributed process group's, else (0, 1) for a lone process. An environment of several processes
    (`dist_env`) without an initialised group is refused: there would be no way to wait for the others."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    env = dist_env()
    if env.world > 1:
        raise RuntimeError(
            f"this process is one of {env.world} (launcher environment) but no torch.distributed process group "
            "is initialised: run this inside the Lightning run (the DataModule's setup) or after "
            "torch.distributed.init_process_group, or from a single process"
        )
    return 0, 1


BARRIER_TIMEOUT_S = 24 * 3600.0


@contextlib.contextmanager
def rank_barrier(timeout_s: float = BARRIER_TIMEOUT_S) -> Iterator[Callable[[], None]]:
    """A `wait()` that returns once every rank of the default process group has called it (a no-op without
    an initialised group); every rank must enter the context at the same point (making the group is a
    collective) and call `wait` the same number of times.

    The wait runs on a gloo group of its own, as Lightning's barrier around `prepare_data`: it needs no device
    (NCCL) and has its own timeout, long because ranks may finish unevenly long jobs (the default group's is
    30 minutes). The group is made on entry, while every rank is alive: a rank that dies later closes its
    connections, and the others' wait fails at once ("Connection closed by peer") instead of at the timeout.
    """
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        yield lambda: None
        return
    group = td.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield lambda: td.barrier(group=group)
    finally:
        td.destroy_process_group(group)
