"""The demo's training steps on CPU, before and after the kept CPU speed-ups, side by side in one process.

Each stage's networks at the demo sizes (conf/model/*, batch sizes of conf/stage/*), one training step =
forward, loss, backward, optimiser step, at the precision the stages pick on this CPU (`auto_precision`:
bf16 autocast with AVX512-BF16/AMX, else float32; `--precision` to force one). Two variants, timed
interleaved so that the machine's load moves both alike:

- before: `F.scaled_dot_product_attention` at every size, Adam(W) with PyTorch's CPU default (a loop over
  parameters);
- after:  `dot_product_attention`'s explicit products at small sizes on CPU, `fused=True` Adam(W)
  (`${fused_adam:...}`, pipeline/resolvers.py).

    python bench/cpu_steps.py                    # every stage, auto precision
    python bench/cpu_steps.py --precision 32-true --repeats 9

AVX2 can be approximated on an AVX512 machine with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`
(auto_precision then picks float32): the kernels are AVX2's, the clock and caches still this machine's.
Figures are medians of interleaved repeats in ms per step; the ratio is before / after.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning_modules.nets.attention as attention  # noqa: E402
from core.machine import cpu_description  # noqa: E402
from lightning_modules.nets.autoencoder import AutoencoderKL  # noqa: E402
from lightning_modules.nets.classifier import NoisyLatentClassifier  # noqa: E402
from lightning_modules.nets.discriminator import PatchDiscriminator  # noqa: E402
from lightning_modules.nets.feature_net import FeatureNet  # noqa: E402
from lightning_modules.nets.unet import UNet  # noqa: E402
from pipeline.resolvers import auto_precision  # noqa: E402


def model_kwargs(group: str, name: str, **resolved) -> dict:
    """conf/model/<group>/<name>.yaml without Hydra's keys, interpolations replaced by `resolved`."""
    cfg = OmegaConf.load(REPO / "conf" / "model" / group / f"{name}.yaml")
    out = {}
    for k in cfg:
        if str(k).startswith("_"):
            continue
        out[k] = resolved[k] if k in resolved else OmegaConf.to_container(cfg, resolve=False)[k]
    return out


def stages(gen: torch.Generator) -> dict[str, tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]]:
    """name -> (trainable module, loss of one batch), at the demo's sizes: 32x32x1 images, 4x8x8 latents."""
    img = lambda b: torch.randn(b, 1, 32, 32, generator=gen)  # noqa: E731
    lat = lambda b: torch.randn(b, 4, 8, 8, generator=gen)  # noqa: E731
    out = {}

    fnet = FeatureNet(1, 10, (32, 64, 128), 0.1, "batch", 1, 4)
    x_f, y_f = img(64), torch.randint(0, 10, (64,), generator=gen)
    out["feature_net (b64)"] = (fnet, lambda m: F.cross_entropy(m(x_f)["logits"].float(), y_f))

    ae = AutoencoderKL(**model_kwargs("autoencoder", "kl_f4", in_channels=1))
    disc = PatchDiscriminator(**model_kwargs("discriminator", "patchgan", in_channels=1))
    both = torch.nn.ModuleDict({"ae": ae, "disc": disc})
    x_a = img(32)

    def ae_loss(m: torch.nn.Module) -> torch.Tensor:
        rec = m["ae"](x_a)
        rec = rec[0] if isinstance(rec, (tuple, list)) else rec
        return (rec.float() - x_a).abs().mean() - m["disc"](rec).float().mean()

    out["autoencoder + disc. (b32)"] = (both, ae_loss)

    unet = UNet(in_channels=4, out_channels=4, context_dim=64, **model_kwargs("unet", "small"))
    z, t, c = lat(128), torch.randint(0, 1000, (128,), generator=gen), torch.randn(128, 1, 64, generator=gen)
    out["diffusion U-Net (b128)"] = (unet, lambda m: (m(z, t, c).float() - z).pow(2).mean())

    cls = NoisyLatentClassifier(in_channels=4, latent_size=8, num_classes=10, **model_kwargs("classifier", "small"))
    y_c = torch.randint(0, 10, (128,), generator=gen)
    out["classifier (b128)"] = (cls, lambda m: F.cross_entropy(m(z, t).float(), y_c))
    return out


def step_fn(module: torch.nn.Module, loss_fn, bf16: bool, explicit: bool, fused: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=fused or None)

    def step() -> None:
        attention.CPU_EXPLICIT_MAX_SCORES = saved if explicit else 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(module)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


saved = attention.CPU_EXPLICIT_MAX_SCORES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed (default: auto_precision)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or auto_precision("cpu")
    bf16 = precision.startswith("bf16")
    print(f"# CPU training steps: {cpu_description()}, {torch.get_num_threads()} threads, {precision}, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print("| stage | before ms | after: explicit attention ms | after: + fused Adam ms | ratio before/after |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (module, loss_fn) in stages(gen).items():
        variants = {
            "before": step_fn(module, loss_fn, bf16, explicit=False, fused=False),
            "attention": step_fn(module, loss_fn, bf16, explicit=True, fused=False),
            "after": step_fn(module, loss_fn, bf16, explicit=True, fused=True),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for k, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - start) * 1000)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {med['before']:.1f} | {med['attention']:.1f} | {med['after']:.1f} | "
              f"{med['before'] / med['after']:.2f}x |")  # fmt: skip
    attention.CPU_EXPLICIT_MAX_SCORES = saved


if __name__ == "__main__":
    main()
