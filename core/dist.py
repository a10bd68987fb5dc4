"""Rank and world size from the launcher's environment, before any process group exists."""

from __future__ import annotations

import os
from typing import NamedTuple


class DistEnv(NamedTuple):
    rank: int
    world: int
    local_rank: int


def dist_env() -> DistEnv:
    """(rank, world size, local rank) from torchrun/Lightning (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) when neither is set.

    Slurm's variables count only inside an srun step: the batch script itself also sees SLURM_NTASKS
    but is one process (and Lightning starts its own ranks from there). Without RANK, a LOCAL_RANK (a
    child of Lightning's launcher) gives NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK: rank 0 is always
    the first process of the first node, the one process that may move or delete a stage's files.
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE") or 1)
    if env.get("RANK"):
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK") or 0))
    if env.get("SLURM_NTASKS") and env.get("SLURM_PROCID") and env.get("SLURM_STEP_ID"):
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    if env.get("LOCAL_RANK"):
        # Lightning's subprocess launcher gives its children LOCAL_RANK, NODE_RANK and WORLD_SIZE, no RANK.
        local, node = int(env["LOCAL_RANK"]), int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
        per_node = int(env.get("LOCAL_WORLD_SIZE") or 0) or max(1, world // max(1, node + 1))
        return DistEnv(node * per_node + local, world, local)
    return DistEnv(0, 1, 0)


def env_rank() -> int:
    """The global rank (see `dist_env`)."""
    return dist_env().rank
