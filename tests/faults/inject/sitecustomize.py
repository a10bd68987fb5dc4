"""Test-only fault injection for `tests/faults/`, loaded by Python at start-up when this folder is on
PYTHONPATH (`site` imports `sitecustomize`). Nothing here is imported by the pipeline itself. Each fault is
switched on by an environment variable; with none set this module does nothing.

- FAULT_KILL_IN_SAVE=n: the n-th `torch.save` of the process writes a few bytes, then the process is
  SIGKILLed (a node dying in the middle of a checkpoint save).
- FAULT_DISK_FULL_AT_SAVE=n: before the n-th `torch.save`, the file system of the file being written is
  filled (FAULT_FILLER names the filler file to create), so the save hits a real ENOSPC.
- FAULT_NAN_FORWARD="module:Class" and FAULT_NAN_CALL=k: the k-th forward of that network class in
  training mode with gradients on returns NaN (so the stage's training loss becomes NaN at that batch).
"""

from __future__ import annotations

import os

_counts = {"save": 0, "forward": 0}


def _install_save_faults() -> None:
    import signal

    import torch

    kill_at = int(os.environ.get("FAULT_KILL_IN_SAVE", "0"))
    full_at = int(os.environ.get("FAULT_DISK_FULL_AT_SAVE", "0"))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        _counts["save"] += 1
        if _counts["save"] == kill_at:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if _counts["save"] == full_at:
            # Fill the file system, then give back 256 KiB: small writes (logs) still succeed, a checkpoint not.
            fd = os.open(os.environ["FAULT_FILLER"], os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                while os.write(fd, b"\0" * (1 << 16)):
                    pass
            except OSError:
                pass
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - (256 << 10)))
            os.close(fd)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _install_nan_forward(spec: str, call: int) -> None:
    import importlib

    import torch

    module_name, class_name = spec.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    real_forward = cls.forward

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            _counts["forward"] += 1
            if _counts["forward"] == call:  # a tensor, or a dict holding one as "logits" (FeatureNet)
                nan = float("nan")
                out = {**out, "logits": out["logits"] * nan} if isinstance(out, dict) else out * nan
        return out

    cls.forward = forward


if os.environ.get("FAULT_KILL_IN_SAVE") or os.environ.get("FAULT_DISK_FULL_AT_SAVE"):
    _install_save_faults()
if os.environ.get("FAULT_NAN_FORWARD"):
    _install_nan_forward(os.environ["FAULT_NAN_FORWARD"], int(os.environ.get("FAULT_NAN_CALL", "1")))
