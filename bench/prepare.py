"""Prepare throughput and peak memory on generated image folders, 1 vs 2 writer processes, side by side.

    python bench/prepare.py [--sizes 20000 100000] [--workers 1 2] [--image 48] [--shard-size 1000]

For each size, a folder of small random JPEGs (two class folders, `--image` px, plus 3 corrupt files) is
generated once under a temporary directory; then `prepare_dataset` (the code of `python -m pipeline.prepare
data=imagefolder`) runs in a fresh process per worker count, twice: once timed, once watched for memory (the
memory sampler walks /proc every 20 ms, and on a 2-core machine that CPU comes out of the writers': timed
with it running, 2 writers measured 1.45x of 1 instead of 1.84x). Reported: images/s over the whole prepare
(listing, decoding, PNG encoding, sha256, manifest) from the timed run; from the watched run, the peak resident memory of the largest process (max
of the parent's and any writer's ru_maxrss); and the peak memory of the whole process tree (prepare and its
writers), the sum of their proportional set sizes (PSS: a page the forked writers share with the parent
counted once in all) sampled every 20 ms from /proc/<pid>/smaps_rollup, and the anonymous part of it
(Pss_Anon: heap and buffers; the shared libraries' file pages excluded, whose PSS also depends on what
other processes on the machine map the same files). The targets of issue 14: peak memory independent of the dataset size (within 15% from 20k to 100k images)
and 2 workers at least 1.7x the images/s of 1 on a 2-core machine. The CPU (lscpu model name and the
SIMD flags) is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.machine import cpu_description  # noqa: E402
from core.processes import child_pids  # noqa: E402


def make_folder(root: Path, n: int, px: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, px, px, 3), dtype=np.uint8)  # a few patterns: generation stays cheap
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base[i % 64], i % px, axis=1)).save(d / f"{i:07d}.jpg", quality=90)
    for i in range(3):
        (root / "a" / f"corrupt{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += child_pids(p)
    return out


def _pss_kib(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) of a process in KiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # the process ended between listing and reading
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")}
    return fields.get("Pss", 0), fields.get("Pss_Anon", 0)


class TreePeak(threading.Thread):
    """Samples the summed PSS (all, anonymous) of this process and its descendants every `interval` s;
    `peak_kib` holds the max of each."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_kib, self._done = interval, (0, 0), threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            now = [_pss_kib(p) for p in _tree(os.getpid())]
            total, anon = sum(x[0] for x in now), sum(x[1] for x in now)
            self.peak_kib = (max(self.peak_kib[0], total), max(self.peak_kib[1], anon))
            self._done.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        self._done.set()
        self.join()
        return self.peak_kib


def run_one(folder: str, out: str, workers: int, shard_size: int, px: int, watch: bool) -> None:
    """In a fresh process: one prepare; print images/s, the largest process's peak RSS and (`watch`) the
    process tree's peak PSS (MiB) as JSON."""
    sys.path.insert(0, str(REPO))
    from datamodules.shards import prepare_dataset
    from datamodules.sources import ImageFolder

    sampler = TreePeak()
    if watch:
        sampler.start()
    t0 = time.perf_counter()
    m = prepare_dataset(ImageFolder(folder, channels=3, image_size=px), out, name="bench", config={},
                        val_size=500, test_size=500, shard_size=shard_size, num_workers=workers,
                        progress=False)  # fmt: skip
    took = time.perf_counter() - t0
    tree = sampler.stop() if watch else (0, 0)
    n = sum(v["num_samples"] for v in m["splits"].values()) + m.get("num_skipped", 0)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"images_per_s": n / took, "peak_mib": peak / 1024, "tree_pss_mib": tree[0] / 1024,
                      "tree_anon_mib": tree[1] / 1024, "skipped": m.get("num_skipped", 0)}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--image", type=int, default=48)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_w", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--_watch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        run_one(args._one[0], args._one[1], args._w, args.shard_size, args.image, args._watch)
        return
    print(f"CPU: {cpu_description()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"imgs{n}"
            t0 = time.perf_counter()
            make_folder(folder, n, args.image)
            print(f"generated {n} JPEGs ({args.image}px, 3 corrupt) in {time.perf_counter() - t0:.0f}s", flush=True)
            for w in args.workers:
                out = Path(tmp) / f"out{n}_{w}"
                cmd = [sys.executable, __file__, "--_one", str(folder), str(out), "--_w", str(w),
                       "--shard-size", str(args.shard_size), "--image", str(args.image)]  # fmt: skip
                res = {}
                for watch in (False, True):  # timed, then watched for memory (module docstring)
                    run = json.loads(subprocess.run(cmd + ["--_watch"] * watch, check=True, capture_output=True,
                                                    text=True).stdout.splitlines()[-1])  # fmt: skip
                    res.update({k: v for k, v in run.items() if (k == "images_per_s") != watch})
                    shutil.rmtree(out)
                rows.append((n, w, res))
                print(f"  {n} images, {w} worker(s): {res['images_per_s']:.0f} img/s, peak RSS of a process "
                      f"{res['peak_mib']:.0f} MiB, of the tree: PSS {res['tree_pss_mib']:.0f} MiB, anonymous "
                      f"{res['tree_anon_mib']:.0f} MiB", flush=True)  # fmt: skip
            shutil.rmtree(folder)
    print(f"\n{'images':>8} | " + " | ".join(f"{w} worker(s): img/s, peak MiB (process, tree PSS, tree anon)"
                                              for w in args.workers))  # fmt: skip
    for n in args.sizes:
        cells = [r for (m, _, r) in rows if m == n]
        print(f"{n:>8} | " + " | ".join(f"{r['images_per_s']:>10.0f}, {r['peak_mib']:>6.0f}, {r['tree_pss_mib']:>6.0f}, "
                                        f"{r['tree_anon_mib']:>6.0f}" + " " * 12 for r in cells))  # fmt: skip
    for n in args.sizes:
        by_w = {w: r for (m, w, r) in rows if m == n}
        if 1 in by_w and 2 in by_w:
            print(f"{n}: 2 workers / 1 worker = {by_w[2]['images_per_s'] / by_w[1]['images_per_s']:.2f}x")
    small, large = min(args.sizes), max(args.sizes)
    for w in args.workers:
        a, b = ({m: r for (m, ww, r) in rows if ww == w}[x] for x in (small, large))
        print(f"{w} worker(s): peak memory at {large} / at {small} images: process {b['peak_mib'] / a['peak_mib']:.3f}x, "
              f"tree PSS {b['tree_pss_mib'] / a['tree_pss_mib']:.3f}x, tree anon {b['tree_anon_mib'] / a['tree_anon_mib']:.3f}x")


if __name__ == "__main__":
    main()
