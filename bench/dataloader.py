"""Training-loader throughput: WebDataset shards at 0/1/2 workers vs the same images from memory.

    .venv/bin/python bench/dataloader.py [--data-dir data/fashion_mnist] [--batches 100]

Prints samples/s of each configuration and its ratio to the in-memory reference, measured side by
side in one process. The in-memory reference is a tensor already decoded and padded: the ratio is
the price of streaming (tar reading, PNG decoding, shuffling, collation).
"""

from __future__ import annotations

import argparse
import time

import torch

from datamodules.webdata import WebDataModule


def measure(loader, batches: int, warmup: int = 3) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += len(next(it)["image"])
    return n / (time.perf_counter() - t0)


def in_memory_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """Random batches from a decoded tensor: the fastest a loader can feed the model."""
    while True:
        idx = torch.randint(0, len(images), (batch_size,))
        yield {"image": images[idx], "label": labels[idx]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/fashion_mnist")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=100)
    args = p.parse_args()

    rows = []
    for workers in (0, 1, 2):
        dm = WebDataModule(args.data_dir, image_size=32, channels=1, batch_size=args.batch_size,
                           num_workers=workers, train_batches_per_epoch=args.batches + 10)  # fmt: skip
        rows.append((f"webdataset, {workers} workers", measure(dm.train_dataloader(), args.batches)))

    dm = WebDataModule(args.data_dir, image_size=32, channels=1, batch_size=1000, num_workers=0)
    decoded = [b for _, b in zip(range(10), dm.train_dataloader(), strict=False)]
    images = torch.cat([b["image"] for b in decoded]).contiguous()
    labels = torch.cat([b["label"] for b in decoded])
    ref = measure(in_memory_loader(images, labels, args.batch_size), args.batches)

    print(f"{'loader':<28}{'samples/s':>12}{'vs in-memory':>14}")
    print(f"{'in-memory tensor (ref)':<28}{ref:>12.0f}{1.0:>14.3f}")
    for name, rate in rows:
        print(f"{name:<28}{rate:>12.0f}{rate / ref:>14.3f}")
    print(f"({torch.get_num_threads()} torch threads, batch {args.batch_size}, {args.batches} batches each)")


if __name__ == "__main__":
    main()
