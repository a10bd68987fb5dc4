"""Latent U-Net speed, side by side in one run on one machine:

1. our `UNet` vs diffusers' `UNet2DConditionModel` built to the same widths, depths and attention layout
   (parameter counts printed, required within 5%): training step time (forward + MSE + backward + AdamW)
   and DDIM sampling throughput with classifier-free guidance through the same `sample()` loop;
2. classifier-free guidance as one batched forward of 2B vs two separate forwards of B.

    python bench/unet.py                          # the CPU default (config conf/model/unet/small.yaml)
    python bench/unet.py --config ldm4 --device cuda --batch 32 --latent 3 64 --context-dim 512

Figures are wall-clock medians; on a shared CPU they move with the machine's load, the ratios less so.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_modules.diffusion import CFGDenoiser, DDIMSampler, NoiseSchedule, sample  # noqa: E402
from lightning_modules.nets.unet import UNet  # noqa: E402


def unet_kwargs(config: str) -> dict:
    """The U-Net options of conf/model/unet/<config>.yaml (without Hydra's keys)."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "unet" / f"{config}.yaml"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def ours(kw: dict, channels: int, context_dim: int) -> UNet:
    return UNet(in_channels=channels, out_channels=channels, context_dim=context_dim, **kw)


def diffusers_twin(kw: dict, channels: int, context_dim: int, sample_size: int) -> nn.Module:
    """UNet2DConditionModel with our layout: per level num_res_blocks ResBlocks (+ a cross-attention
    transformer where ds is in attention_resolutions), scale-shift time conditioning, conv projections,
    heads of num_head_channels (diffusers' `attention_head_dim` is the head *count*, per block)."""
    from diffusers import UNet2DConditionModel

    mults, attn = kw["channel_mult"], set(kw["attention_resolutions"])
    widths = [kw["model_channels"] * m for m in mults]
    has_attn = [2**i in attn for i in range(len(mults))]
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(widths),
        layers_per_block=kw["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=context_dim,
        attention_head_dim=tuple(w // kw["num_head_channels"] for w in widths),
        transformer_layers_per_block=kw.get("transformer_depth", 1),
        resnet_time_scale_shift="scale_shift" if kw.get("use_scale_shift_norm", True) else "default",
        norm_num_groups=32,
        use_linear_projection=False,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def as_model(net: nn.Module) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """The (x, t, context, mask) -> prediction contract of `sample`/`CFGDenoiser`, for either net."""
    if isinstance(net, UNet):
        return net

    def call(x: Tensor, t: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return net(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample

    return call


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        warmup: int = 1) -> dict[str, float]:  # fmt: skip
    """Median seconds of each callable, timed round-robin (one call of each per round), so that a change
    in machine load during the run hits all contenders alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step(net: nn.Module, x: Tensor, ctx: Tensor) -> Callable[[], None]:
    """One training step (forward, MSE, backward, AdamW) of `net` on a fixed batch."""
    model, opt = as_model(net), torch.optim.AdamW(net.parameters(), lr=1e-4)
    t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    noise = torch.randn_like(x)

    def step() -> None:
        net.train()
        loss = (model(x, t, ctx, None) - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cfg_sampling(net: nn.Module, shape: tuple, ctx: Tensor, null: Tensor, steps: int) -> Callable[[], Tensor]:
    """DDIM sampling of a batch with classifier-free guidance (scale 3) through `sample`."""
    denoiser = CFGDenoiser(as_model(net), ctx, None, null, None, scale=3.0)
    schedule, sampler = NoiseSchedule("scaled_linear", 1000), DDIMSampler(num_steps=steps)

    def run() -> Tensor:
        net.eval()
        return sample(denoiser, shape, schedule, sampler, device=ctx.device)

    return run


def cfg_evaluations(net: UNet, x: Tensor, ctx: Tensor, null: Tensor) -> dict[str, Callable[[], Tensor]]:
    """One CFG evaluation: a batched forward of 2B (CFGDenoiser) vs two forwards of B."""
    t = torch.full((x.shape[0],), 500, device=x.device)
    batched = CFGDenoiser(net, ctx, None, null, None, scale=3.0)

    @torch.no_grad()
    def separate() -> Tensor:
        eps_c = net(x, t, ctx, None)
        eps_u = net(x, t, null.expand_as(ctx), None)
        return eps_u + 3.0 * (eps_c - eps_u)

    return {"batched": torch.no_grad()(lambda: batched(x, t)), "separate": separate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="conf/model/unet/<config>.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--latent", type=int, nargs=2, default=[4, 8], metavar=("C", "HW"))
    parser.add_argument("--context-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1, help="context tokens L")
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default: on a shared CPU, OpenMP threads that wait for a "
                             "busy core make a multi-threaded step many times slower")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kw, (c, hw) = unet_kwargs(args.config), args.latent
    nets = {"ours": ours(kw, c, args.context_dim), "diffusers": diffusers_twin(kw, c, args.context_dim, hw)}
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    gap = counts["ours"] / counts["diffusers"] - 1
    print(f"# U-Net bench: config={args.config} latent={c}x{hw}x{hw} context={args.tokens}x{args.context_dim} "
          f"batch={args.batch} device={device} threads={torch.get_num_threads()} "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__})")  # fmt: skip
    print(f"parameters: ours {counts['ours']:,}  diffusers {counts['diffusers']:,}  (ours/diffusers - 1 = {gap:+.2%})")
    if abs(gap) > 0.05:
        raise SystemExit("parameter counts differ by more than 5%: the comparison would not be like for like")

    x = torch.randn(args.batch, c, hw, hw, device=device)
    ctx = torch.randn(args.batch, args.tokens, args.context_dim, device=device)
    sb = args.sample_batch
    sctx, null = ctx[:sb], torch.zeros(1, args.tokens, args.context_dim, device=device)
    for net in nets.values():
        net.to(device)
    train = interleaved_medians({n: train_step(net, x, ctx) for n, net in nets.items()}, device, args.repeats)
    with torch.no_grad():
        shape = (sb, c, hw, hw)
        samp = interleaved_medians({n: cfg_sampling(net, shape, sctx, null, args.sample_steps)
                                    for n, net in nets.items()}, device, max(1, args.repeats // 2))  # fmt: skip
    print(f"\n| U-Net | train step (s) | train img/s | DDIM-{args.sample_steps} CFG samples/s (batch {sb}) |")
    print("|---|---|---|---|")
    for name in nets:
        print(f"| {name} | {train[name]:.4f} | {args.batch / train[name]:.1f} | {sb / samp[name]:.2f} |")
    print(f"| ours / diffusers | {train['ours'] / train['diffusers']:.2f}x time | "
          f"{train['diffusers'] / train['ours']:.2f}x | {samp['diffusers'] / samp['ours']:.2f}x |")  # fmt: skip

    nets["ours"].eval()
    print("\n| CFG evaluation of our U-Net | B | one batched forward of 2B (s) | two forwards of B (s) | ratio |")
    print("|---|---|---|---|---|")
    for b in sorted({sb, args.batch}):
        cfg = interleaved_medians(cfg_evaluations(nets["ours"], x[:b], ctx[:b], null), device, args.repeats)
        print(f"| | {b} | {cfg['batched']:.4f} | {cfg['separate']:.4f} | {cfg['batched'] / cfg['separate']:.2f}x |")

if __name__ == "__main__":
    main()
