"""A training stage's checkpoints on disk: durable writes, one previous good file, verified resume.

See docs/ARCHITECTURE.md, "Checkpoints" and "Resume and skip rules". Files of a stage directory:

- `checkpoints/last.ckpt`: the newest periodic checkpoint (ModelCheckpoint, `save_last=True`).
- `checkpoints/prev.ckpt`: the `last.ckpt` before it. Each save of `last.ckpt` writes the new file to a
  temporary file and fsyncs it, then renames the old `last.ckpt` to `prev.ckpt`, then the new one into
  place (`DurableCheckpointIO`): a save killed or out of space at any moment leaves at least one complete
  checkpoint, and a `last.ckpt` that is corrupt for any other reason still has a fallback.
- `hpc_ckpt_<n>.ckpt`: written on Slurm preemption (`pipeline.preemption`); the older ones are deleted
  once a newer checkpoint of the stage was saved.
- `checkpoints/*.corrupt`: a resume candidate that failed to load, moved aside (kept for inspection).

Every write goes through `core.io.atomic_open` (temporary file, fsync of the file and its directory,
atomic rename); `resume_checkpoint` removes the temporary files a killed save left, then returns the newest
candidate that loads with `torch.load(weights_only=True)`, printing each one it skipped and why.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from core.dist import env_rank
from core.io import TMP_SUFFIX, atomic_open, remove_stale_temps
from lightning_modules.artifacts import safe_load

LAST, PREV, FINAL = "last.ckpt", "prev.ckpt", "final.ckpt"
HPC_GLOB = "hpc_ckpt_*.ckpt"
HPC_RE = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
CORRUPT_SUFFIX = ".corrupt"


class BadCheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (truncated, not a checkpoint, unsafe to unpickle)."""


def _numbered_hpc(stage_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(stage_dir).glob(HPC_GLOB) if (m := HPC_RE.fullmatch(p.name))]
    return sorted(found)


def hpc_checkpoints(stage_dir: str | os.PathLike) -> list[Path]:
    """`stage_dir`'s `hpc_ckpt_<n>.ckpt` files, by n."""
    return [p for _, p in _numbered_hpc(stage_dir)]


def next_hpc_path(stage_dir: str | os.PathLike) -> Path:
    """Where the next preemption checkpoint goes: `hpc_ckpt_<n + 1>.ckpt` after the highest n present."""
    return Path(stage_dir) / f"hpc_ckpt_{max((n for n, _ in _numbered_hpc(stage_dir)), default=0) + 1}.ckpt"


def prune_hpc_checkpoints(stage_dir: str | os.PathLike, keep: str | os.PathLike | None = None) -> list[Path]:
    """Delete `stage_dir`'s `hpc_ckpt_*.ckpt` except `keep`: called once a newer checkpoint was saved."""
    keep = Path(keep).resolve() if keep is not None else None
    pruned = [p for p in hpc_checkpoints(stage_dir) if p.resolve() != keep]
    for p in pruned:
        p.unlink(missing_ok=True)
    return pruned


def remove_checkpoint_temps(stage_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed checkpoint saves left in `stage_dir` and its `checkpoints/`
    (`core.io.remove_stale_temps`); only while no save is running (before training starts, on rank 0)."""
    stage_dir = Path(stage_dir)
    ckpt_dir = stage_dir / "checkpoints"
    targets = {ckpt_dir / name for name in (LAST, PREV, FINAL)}
    for folder in (stage_dir, ckpt_dir):  # a temp is ".<name>.<random><TMP_SUFFIX>"
        for tmp in folder.glob(f".*.ckpt.*{glob.escape(TMP_SUFFIX)}"):
            targets.add(folder / (tmp.name[1:].split(".ckpt.", 1)[0] + ".ckpt"))
    return [p for target in sorted(targets) for p in remove_stale_temps(target)]


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load `path` weights-only on CPU and check it is a Lightning training checkpoint (it has a
    `state_dict` and a `global_step`); BadCheckpointError says why not."""
    try:
        ckpt = safe_load(path)
    except Exception as err:  # truncated zip, unpickling refused, I/O error: all mean "not resumable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadCheckpointError(f"{path} does not load ({type(err).__name__}: {reason})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise BadCheckpointError(f"{path} is not a training checkpoint (no state_dict / global_step)")
    return ckpt


def resume_candidates(stage_dir: str | os.PathLike) -> list[Path]:
    """`last.ckpt`, `prev.ckpt` and `hpc_ckpt_*.ckpt` of the stage, newest (by modification time) first."""
    stage_dir = Path(stage_dir)
    found = [stage_dir / "checkpoints" / LAST, stage_dir / "checkpoints" / PREV, *hpc_checkpoints(stage_dir)]
    existing = []
    for p in found:
        try:
            existing.append((p.stat().st_mtime, p))
        except FileNotFoundError:  # absent, or moved aside by rank 0 meanwhile
            continue
    return [p for _, p in sorted(existing, key=lambda e: e[0], reverse=True)]


def resume_checkpoint(stage_dir: str | os.PathLike, stage: str = "") -> str | None:
    """The newest checkpoint of the stage that loads, or None (start from scratch).

    Called on every rank before `trainer.fit`. Rank 0 (by environment) first removes the temporary files
    of killed saves; each candidate that does not load is named in a printed line with the reason, and
    rank 0 moves it aside to `<name>.corrupt` (so that the next save does not rotate it into `prev.ckpt`
    over the good file it falls back to). Every rank reads the same files, so all pick the same one.
    """
    label = f"[train] {stage}: " if stage else "[train] "
    if env_rank() == 0:
        for tmp in remove_checkpoint_temps(stage_dir):
            print(f"{label}removed {tmp}, the temporary file of an interrupted checkpoint save", flush=True)
    for path in resume_candidates(stage_dir):
        try:
            check_checkpoint(path)
        except BadCheckpointError as err:
            if env_rank() == 0:
                aside = path.with_name(path.name + CORRUPT_SUFFIX)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, aside)
                print(f"{label}cannot resume from {path}: {err}; moved it to {aside}, trying the previous checkpoint",
                      flush=True)  # fmt: skip
            continue
        return str(path)
    return None


def out_of_space(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `exc`, if any. torch.save into a file object reports a failed
    write as a RuntimeError ("unexpected pos ...") whose context is the OSError, so the chain is searched."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class DurableCheckpointIO(TorchCheckpointIO):
    """torch.save through `core.io.atomic_open` (a killed job never leaves half a .ckpt; file and directory
    fsynced), keeping the replaced `last.ckpt` as `prev.ckpt`, and pruning `stage_dir`'s older
    `hpc_ckpt_*.ckpt` once a save succeeded.

    Args:
        stage_dir: the stage directory whose `hpc_ckpt_*.ckpt` a newer save supersedes; None: prune nothing.
    """

    def __init__(self, stage_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.stage_dir = Path(stage_dir) if stage_dir is not None else None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            with atomic_open(path, "wb") as f:
                torch.save(checkpoint, f)
                if path.name == LAST and path.exists():
                    # The new file is complete on disk before the old one is moved: out of space or killed
                    # before this line, last.ckpt is untouched; after it, prev.ckpt holds the old one.
                    f.flush()
                    os.fsync(f.fileno())
                    os.replace(path, path.with_name(PREV))
        except Exception as exc:
            err = out_of_space(exc)
            if err is None:
                raise
            kept = [str(p) for p in (path, path.with_name(PREV)) if p.is_file()]
            raise OSError(err.errno, (
                f"no space left to write checkpoint {path} ({err.strerror}); nothing was replaced: "
                f"{' and '.join(kept) if kept else 'the earlier checkpoints'} intact. Free space on that file "
                "system (or a quota), then run the same command again to resume."
            )) from err  # fmt: skip
        if self.stage_dir is not None:
            prune_hpc_checkpoints(self.stage_dir, keep=path)
