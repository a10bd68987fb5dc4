"""bench/gpu_check.py in its CPU form, so that the one-call GPU check cannot rot between GPU loans.

Runs the script as a subprocess (`--device cpu --tiny`): every training-step part at both sizes (the
LDM-4 configs shrunk by --tiny, the demo's as configured with batches of 4), the U-Net's FLOP count and
MFU against a given peak, and the `debug=fdr` part through the real CLI for the prepare step and one stage
only (the whole chain, five stages and an evaluation, takes ~4 min on 2 shared cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1",
         "--peak-tflops", "1.0", "--threads", "1", "--fdr-stages", "feature_net_perceptual", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    trains = [f"train/{size}/{stage}" for size, stage in [
        ("ldm4", "diffusion"), ("ldm4", "autoencoder"), ("ldm4", "classifier"), ("demo", "feature_net"),
        ("demo", "autoencoder"), ("demo", "diffusion"), ("demo", "classifier")]]  # fmt: skip
    assert set(parts) == {"env", "sdpa", *trains, "fdr/prepare", "fdr/feature_net_perceptual"}
    assert result["failed"] == [] and not any("error" in p or "skipped" in p for p in parts.values())
    for name in trains:
        r = parts[name]
        assert r["batch_size"] == 4 and r["timed_steps"] == 2
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("step_ms", "images_per_s")), r
        assert all(n > 0 for n in r["parameters"].values())
    for name in ("train/ldm4/diffusion", "train/demo/diffusion"):
        r = parts[name]
        assert 0 < r["model_tflop_per_step"] and 0 < r["mfu"] < 1
        assert math.isclose(r["mfu"], r["achieved_tflops"] / 1.0, rel_tol=1e-9)  # the --peak-tflops given
    assert parts["env"]["peak_tflops"] == 1.0 and parts["env"]["device"] == "cpu"
    for name in ("fdr/prepare", "fdr/feature_net_perceptual"):
        assert parts[name]["exit_code"] == 0 and parts[name]["seconds"] > 0
    assert "| train/ldm4/diffusion | 4 |" in proc.stdout  # the printed table
