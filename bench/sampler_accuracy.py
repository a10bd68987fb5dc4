"""How far each sampler's final latent is from the probability-flow ODE's solution, per step count and spacing.

    python bench/sampler_accuracy.py RUN_DIR [--per-class 4] [--scale 3] [--steps 5 10 20 50]
        [--reference-steps 100]

RUN_DIR holds diffusion/ (e.g. runs/fashion_mnist_quick/fashion_mnist). Every chain starts from the same
seeded noise and the same classifier-free guided denoiser (`lightning_modules.generation.generate`, the
one generation function, stopped before decoding); the reference is DPM-Solver++(2M) on the trailing chain
with `--reference-steps` steps, which starts at t = T - 1 like every trailing chain. The printed error is
the RMS over latent elements of (z_0 - z_0 reference), relative to the reference's RMS.

What it separates: an FID difference between samplers that comes from solving the same ODE more or less
accurately (a trailing DDIM and a trailing DPM-Solver++ chain converge to the same z_0) from one that
comes from solving another problem: a "leading" chain of n steps starts at t = (n - 1) T / n, not at
T - 1 (800 for n = 5, 900 for n = 10), so it treats the starting noise as a less noisy x_t, and a
different n is a different starting time; its error against the trailing reference does not vanish.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.machine import cpu_description  # noqa: E402
from lightning_modules.artifacts import load_diffusion  # noqa: E402
from lightning_modules.diffusion import DDIMSampler, DPMSolverPP2MSampler, make_timesteps  # noqa: E402
from lightning_modules.generation import GuidanceSetting, generate  # noqa: E402


class _Latents:
    """A codec stand-in whose `decode_uint8` hands back the reverse chain's z_0 itself."""

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        return z


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bundle = load_diffusion(args.run_dir / "diffusion" / "checkpoints" / "final.ckpt")
    labels = torch.arange(bundle.num_classes).repeat_interleave(args.per_class)
    seeds = list(range(args.seed, args.seed + len(labels)))
    guidance = GuidanceSetting("cfg", cfg_scale=args.scale)
    T = bundle.schedule.num_timesteps

    def run(sampler) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        z = generate(bundle.unet, _Latents(), bundle.conditioner, guidance, sampler, bundle.schedule,
                     bundle.prediction_type, labels, seeds, latent_shape=bundle.latent_shape)  # fmt: skip
        return z.double(), time.perf_counter() - t0

    print(
        f"# {len(labels)} samples, CFG s = {args.scale:g}, {cpu_description()}, {torch.get_num_threads()} threads"
    )
    ref, took = run(DPMSolverPP2MSampler(num_steps=args.reference_steps, spacing="trailing"))
    ref_rms = float(ref.pow(2).mean().sqrt())
    print(
        f"# reference: DPM-Solver++(2M) trailing {args.reference_steps} steps ({took:.0f} s), RMS {ref_rms:.3f}"
    )
    print("| sampler | spacing | steps | first t | NFE | rel. RMS error vs reference | seconds |")
    print("|---|---|---|---|---|---|---|")
    for spacing in ("trailing", "leading"):
        for name, cls in (("DDIM", DDIMSampler), ("DPM-Solver++(2M)", DPMSolverPP2MSampler)):
            for n in args.steps:
                z, took = run(cls(num_steps=n, spacing=spacing))
                err = float((z - ref).pow(2).mean().sqrt()) / ref_rms
                first = int(make_timesteps(T, n, spacing)[0])
                nfe = n * (1 if args.scale == 1 else 2)
                print(f"| {name} | {spacing} | {n} | {first} | {nfe} | {err:.4f} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
