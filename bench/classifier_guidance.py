"""Classifier guidance steers samples towards their class: accuracy of the eval-role feature net on
class-balanced samples drawn unconditionally (or with classifier-free guidance) and guided by the
noisy-latent classifier with scale s_cls (Dhariwal & Nichol 2021, Algorithms 1-2). s_cls = 0 is no
guidance; the accuracy should rise with s_cls. Every scale uses the same per-sample seeds, so the
guidance is the only difference between rows.

    python bench/classifier_guidance.py --run-dir runs/fashion_mnist_quick/fashion_mnist
    python bench/classifier_guidance.py --run-dir RUN --scales 0 1 3 10 --steps 50 --num-samples 500 \\
        --sampler ddpm --cfg-scale 3.0 --out RUN/eval/classifier_guidance

Reads <run-dir>/diffusion, <run-dir>/classifier and <run-dir>/feature_net_eval final.ckpt (override each
with --diffusion / --classifier / --feature-net). Prints one row per s_cls; --out also writes
results.json and a sample grid per scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.images import make_grid_png, to_float_nchw  # noqa: E402
from core.io import atomic_write_text  # noqa: E402
from eval.metrics import class_accuracy  # noqa: E402
from lightning_modules.artifacts import (  # noqa: E402
    DiffusionBundle,
    load_classifier,
    load_diffusion,
    load_feature_net,
)
from lightning_modules.codec import LatentCodec  # noqa: E402
from lightning_modules.diffusion import DDIMSampler, DDPMSampler  # noqa: E402
from lightning_modules.generation import GuidanceSetting, generate  # noqa: E402
from lightning_modules.nets.conditioners import ClassConditioner  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--run-dir", type=Path, required=True, help="runs/<experiment>/<run_name>")
    p.add_argument("--diffusion", type=Path, help="default: <run-dir>/diffusion/checkpoints/final.ckpt")
    p.add_argument("--classifier", type=Path, help="default: <run-dir>/classifier/checkpoints/final.ckpt")
    p.add_argument(
        "--feature-net", type=Path, help="default: <run-dir>/feature_net_eval/checkpoints/final.ckpt"
    )
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0], help="s_cls values")
    p.add_argument("--num-samples", type=int, default=200, help="N, class-balanced (label = i mod K)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (respaced chain)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale on top (s = 1: conditional); default: unconditional",
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i, for every scale")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write results.json and grid_scls<s>.png here")
    return p.parse_args(argv)


def class_balanced_labels(num_samples: int, num_classes: int) -> Tensor:
    """(N,) long: 0, 1, ..., K-1, 0, 1, ...; each class gets floor(N/K) or ceil(N/K) samples."""
    return torch.arange(num_samples) % num_classes


def guidance(s_cls: float, cfg_scale: float | None) -> GuidanceSetting:
    """Unconditional sampling (the null condition) steered by the classifier alone, or classifier-free
    guidance at `cfg_scale` with the classifier on top."""
    if cfg_scale is None:
        return GuidanceSetting("classifier", cls_scale=s_cls)
    return GuidanceSetting("both", cfg_scale=cfg_scale, cls_scale=s_cls)


def guided_samples(
    bundle: DiffusionBundle,
    classifier: Callable[[Tensor, Tensor], Tensor],
    labels: Tensor,
    s_cls: float,
    sampler: DDIMSampler | DDPMSampler,
    seeds: Sequence[int],
    cfg_scale: float | None,
    device: torch.device,
) -> np.ndarray:
    """uint8 images (B, H, W, C) for `labels` (B,) under classifier guidance scale s_cls (`generate`)."""
    if cfg_scale is not None and not isinstance(bundle.conditioner, ClassConditioner):
        raise ValueError(
            f"--cfg-scale needs a class-conditioned diffusion model, this one has {type(bundle.conditioner).__name__}"
        )
    labels = labels.to(device)
    codec = LatentCodec.of(bundle)
    return generate(bundle.unet, codec, bundle.conditioner, guidance(s_cls, cfg_scale), sampler, bundle.schedule,
                    bundle.prediction_type, labels, list(seeds), latent_shape=bundle.latent_shape, labels=labels,
                    classifier=classifier, device=device)  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    bundle = load_diffusion(args.diffusion or args.run_dir / "diffusion" / "checkpoints" / "final.ckpt")
    classifier = load_classifier(args.classifier or args.run_dir / "classifier" / "checkpoints" / "final.ckpt",
                                 diffusion=bundle)  # fmt: skip
    feature_net = load_feature_net(
        args.feature_net or args.run_dir / "feature_net_eval" / "checkpoints" / "final.ckpt", role="eval",
        user="bench/classifier_guidance.py (it scores samples)",
    )
    if feature_net.num_classes != bundle.num_classes:
        raise ValueError(
            f"feature net has {feature_net.num_classes} classes, the diffusion model {bundle.num_classes}"
        )
    for net in (bundle.unet, bundle.conditioner, bundle.autoencoder, classifier, feature_net):
        net.to(device)
    sampler = (DDIMSampler(num_steps=args.steps, eta=args.eta) if args.sampler == "ddim"
               else DDPMSampler(num_steps=args.steps))  # fmt: skip
    labels = class_balanced_labels(args.num_samples, bundle.num_classes)
    print(f"{bundle.num_classes} classes: chance accuracy {1 / bundle.num_classes:.4f}")
    rows = []
    for s_cls in args.scales:
        start, logits, grid = time.perf_counter(), [], []
        for lo in range(0, args.num_samples, args.batch_size):
            y = labels[lo : lo + args.batch_size]
            seeds = range(args.seed + lo, args.seed + lo + len(y))
            images = guided_samples(bundle, classifier, y, s_cls, sampler, seeds, args.cfg_scale, device)
            with torch.no_grad():  # scored as stored: the uint8 samples, as the evaluation job scores them
                logits.append(feature_net(to_float_nchw(images).to(device))["logits"].float().cpu())
            if lo == 0:
                grid = images[: 8 * bundle.num_classes]
        acc = class_accuracy(torch.cat(logits), labels)
        rows.append({"s_cls": s_cls, "accuracy": acc, "seconds": time.perf_counter() - start})
        print(f"s_cls {s_cls:6.2f}   accuracy {acc:.4f}   ({rows[-1]['seconds']:.1f} s)", flush=True)
        if args.out:
            make_grid_png(grid, bundle.num_classes, args.out / f"grid_scls{s_cls:g}.png",
                          labels=labels[: len(grid)].tolist())  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    guidance = "unconditional" if args.cfg_scale is None else f"classifier-free scale {args.cfg_scale:g}"
    print(f"classifier guidance: {args.num_samples} class-balanced samples, {args.sampler} {args.steps} steps, "
          f"{guidance}, device {args.device}")  # fmt: skip
    rows = run(args)
    accs = [r["accuracy"] for r in rows]
    print(f"accuracy non-decreasing in s_cls: {all(b >= a for a, b in zip(accs, accs[1:]))} "
          f"(first {accs[0]:.4f}, last {accs[-1]:.4f})")  # fmt: skip
    if args.out:
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        atomic_write_text(
            args.out / "results.json", json.dumps({"args": meta, "rows": rows}, indent=2) + "\n"
        )
    return rows


if __name__ == "__main__":
    main()
