"""Quick check of a trained diffusion stage: class accuracy of class-balanced guided samples, scored by
the eval-role feature net (the network the model never saw), per classifier-free guidance scale.

    python bench/sample_accuracy.py RUN_DIR [--per-class 20] [--scales 1 3] [--steps 25]

RUN_DIR holds diffusion/ and feature_net_eval/ (e.g. runs/fashion_mnist_quick/fashion_mnist). Sampling goes
through the same path as the stage's grids and the evaluation job (`lightning_modules.generation.generate`);
the uint8 samples are scored as the evaluation job scores them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.images import to_float_nchw  # noqa: E402
from lightning_modules.artifacts import load_diffusion, load_feature_net  # noqa: E402
from lightning_modules.codec import LatentCodec  # noqa: E402
from lightning_modules.diffusion import DDIMSampler  # noqa: E402
from lightning_modules.generation import GuidanceSetting, generate  # noqa: E402


@torch.no_grad()
def accuracy(run_dir: Path, checkpoint: str, per_class: int, scale: float, steps: int, batch: int,
             seed: int) -> tuple[float, int]:  # fmt: skip
    bundle = load_diffusion(run_dir / "diffusion" / "checkpoints" / checkpoint)
    scorer = load_feature_net(run_dir / "feature_net_eval" / "checkpoints" / "final.ckpt", role="eval",
                              user="bench/sample_accuracy.py (it scores samples)")  # fmt: skip
    codec = LatentCodec.of(bundle)
    labels = torch.arange(bundle.num_classes).repeat_interleave(per_class)
    correct = 0
    for start in range(0, len(labels), batch):
        y = labels[start : start + batch]
        seeds = list(range(seed + start, seed + start + len(y)))
        images = generate(bundle.unet, codec, bundle.conditioner, GuidanceSetting("cfg", cfg_scale=scale),
                          DDIMSampler(num_steps=steps), bundle.schedule, bundle.prediction_type, y, seeds,
                          latent_shape=bundle.latent_shape)  # fmt: skip
        correct += int((scorer(to_float_nchw(images))["logits"].argmax(-1) == y).sum())
    return correct / len(labels), len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="final.ckpt", help="file in diffusion/checkpoints/")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| CFG scale | class accuracy (eval feature net) | samples | seconds |")
    print("|---|---|---|---|")
    for scale in args.scales:
        start = time.perf_counter()
        acc, n = accuracy(args.run_dir, args.checkpoint, args.per_class, scale, args.steps, args.batch, args.seed)
        print(f"| {scale:g} | {acc:.3f} | {n} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
