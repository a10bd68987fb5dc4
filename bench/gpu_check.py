"""The GPU path in one short call: every stage's training step at the LDM-4 and demo sizes, the U-Net's model
FLOPs utilisation, the SDPA backends, and `debug=fdr` of each stage through the real CLI; one JSON.

    python bench/gpu_check.py --device cuda --out bench/results/gpu_check.json        # < 5 min on one GPU
    python bench/gpu_check.py --device cuda --compile off --out ...                    # the eager fallback
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json            # the test suite's run
    python bench/gpu_check.py --device cpu --tiny --compile on --compile-backend aot_eager --parts train
                                                                                       # regional compile traces

Parts (each in its own try/except: a failing part records its error and the others still run; the exit
code is 1 if any part failed; past `--budget-s` the remaining parts are skipped with a note; a part is
stopped after `--part-timeout-s`, the LDM-4 U-Net part, the first training part, after `--unet-timeout-s`;
after each part its memory is released (gc, `torch._dynamo.reset`, `torch.cuda.empty_cache`) and each
training part records `allocated_mib_at_start`, ~0 unless an earlier part leaked; a part that runs out of
memory runs again at half the batch, `--oom-retries` times, and lists the batches in `oom_batches`):

- `env`: device name, capability, torch / CUDA / cuDNN versions, the peak TFLOP/s used for MFU.
- `sdpa`: the attention shapes of the LDM-4 U-Net (self-attention over 64x64/ds tokens, cross-attention to
  the class token), each SDPA backend tried alone (forward + backward, bf16), and the kernels the default
  dispatch ran (from the profiler) with the backend they belong to (`default_backend`). Cross-attention
  gets a key mask only if the conditioner returns one (the class conditioner returns None: flash is
  allowed); self-attention gets none.
- `train/<size>/<stage>` for size `ldm4` (experiment=imagenet256_ldm with its experiment_stage files) and
  `demo` (experiment=fashion_mnist_quick), stage `feature_net` (demo only: LDM-4 uses LPIPS-VGG and
  Inception), `autoencoder`, `diffusion`, `classifier`. The nets are the stage's own, built from the composed
  Hydra config; the step is what the stage module's training_step + optimizer_step do, written out without
  Lightning (see `STEPS`): autoencoder = generator loss (L1 + perceptual + KL + adaptive-weight GAN term)
  with backward and Adam step, then discriminator hinge loss with backward and Adam step (the GAN is on from
  step 0, the heavier steady state); diffusion = label dropout, class tokens, `diffusion_loss`, backward,
  grad-norm clip 1.0, AdamW, EMA update, on latents drawn at random (the cached-latents path: no encoder);
  classifier = `diffuse` + cross-entropy, backward, AdamW, EMA update; feature_net = cross-entropy, AdamW.
  Mixed precision as the configs (`bf16-mixed`: autocast bf16, fp32 weights); nets compiled in place with
  `torch.compile` (`--compile`, `dynamic=False`): by default regionally, each ResBlock / SpatialTransformer /
  ResnetBlock / AttnBlock on its own (`--compile-scope regional`; nets without such blocks, the
  discriminator and feature net, whole), which compiles each distinct block shape once (the LDM-4 U-Net:
  38 blocks, 20 graphs) instead of one 426M-parameter graph (> 150 s on the H200 run). `first_step_s` is
  the first step (compilation included), `warmup_s` all warm-up steps; neither is timed. `--channels-last`
  and `--fused-optim` time the U-Net step with NHWC convolutions / a fused AdamW. The timed steps run between
  `torch.cuda.synchronize` calls; peak memory is `torch.cuda.max_memory_allocated` after
  `reset_peak_memory_stats` (CPU: not measured, null). Random weights and batches: speed does not depend
  on them.
- MFU of the U-Net step: FLOPs of one uncompiled forward + backward at the same batch, counted by
  `torch.utils.flop_counter.FlopCounterMode`, / the timed step time / the device's dense bf16 peak
  (`PEAK_TFLOPS` by device name, or `--peak-tflops`).
- `fdr/<stage>`: a tiny image folder of random PNGs, `python -m pipeline.prepare`, then `python -m
  pipeline.train stage=... debug=fdr trainer=gpu|cpu logger=csv` for feature_net (both roles), autoencoder,
  diffusion and classifier, and one small `python -m pipeline.evaluate`: exit code, seconds, the output
  tail on failure.

Needs torch, pytorch-lightning, torchmetrics, torchvision, numpy, scipy, pillow, matplotlib, tqdm, pyyaml
and the wheels of `bench/gpu_wheels.sh` (hydra-core, omegaconf, antlr4, webdataset, braceexpand); no W&B.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.io import atomic_write_json  # noqa: E402
from core.machine import cpu_description  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name (first match wins, so the more specific names come first).
PEAK_TFLOPS = [
    ("H200", 989.5), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.5), ("GH200", 989.5),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05), ("L40", 181.05), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0),
]
EXPERIMENTS = {"ldm4": "imagenet256_ldm", "demo": "fashion_mnist_quick"}
STAGES = {"ldm4": ["diffusion", "autoencoder", "classifier"], "demo": ["feature_net", "autoencoder", "diffusion", "classifier"]}
# --tiny: the same configs shrunk so that every part runs in seconds on a CPU.
TINY = {
    "ldm4": ["data.image_size=32", "data.num_classes=10", "model.autoencoder.ch=16",
             "model.autoencoder.num_res_blocks=1", "model.discriminator.ndf=8", "model.unet.model_channels=32",
             "model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=16",
             "model.conditioner.embed_dim=32", "parts.adm_classifier.model_channels=32",
             "parts.adm_classifier.channel_mult=[1,2]", "parts.adm_classifier.attention_resolutions=[2]",
             "parts.adm_classifier.num_head_channels=16"],
    "demo": [],
}
TINY_BATCH = 4


class PartTimeout(BaseException):
    """Raised in the main thread when a part overruns its time (a BaseException: no fallback catches it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the block after `seconds` (SIGALRM; the main thread), so one slow part cannot eat the budget."""

    def expire(signum, frame):
        raise PartTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, f"table entry {key!r} (dense bf16)"
    return None, f"{name!r} not in the table (pass --peak-tflops)"


# --- configs and nets ---------------------------------------------------------------------------------------
def compose_stage(size: str, stage: str, trainer: str, tiny: bool, batch: int | None = None):
    """The composed `pipeline.train` config of `stage` under the size's experiment (+ the --tiny shrink)."""
    from hydra import compose, initialize_config_dir

    import pipeline  # noqa: F401  (registers the resolvers)

    overrides = [f"experiment={EXPERIMENTS[size]}", f"stage={stage}", f"trainer={trainer}", "logger=none"]
    overrides += [*TINY[size], f"data.batch_size={TINY_BATCH}"] if tiny else []
    overrides += [f"data.batch_size={batch}"] if batch else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def latent_geometry(args) -> tuple[int, int]:
    """(z_channels, latent side) of the size's autoencoder (from the autoencoder stage's config: the later
    stages read it from the autoencoder checkpoint)."""
    cfg = compose_stage(args.size_now, "autoencoder", args.trainer, args.tiny)
    ae = cfg.model.autoencoder
    return int(ae.z_channels), int(cfg.data.image_size) // 2 ** (len(ae.ch_mult) - 1)


def random_lpips_vgg(tmp: Path) -> nn.Module:
    """The real LPIPSVGG module, loaded from weight files of random values (nothing is downloaded)."""
    from torchvision.models import vgg16

    from lightning_modules.nets.perceptual import LPIPSVGG, VGG_CHANNELS

    vgg, heads = tmp / "vgg16.pth", tmp / "lpips_vgg.pth"
    if not vgg.exists():
        torch.save({f"features.{k}": v for k, v in vgg16().features.state_dict().items()}, vgg)
        torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(VGG_CHANNELS)}, heads)
    return LPIPSVGG(vgg_weights_path=str(vgg), lpips_weights_path=str(heads))


def perceptual_net(cfg, fn_cfg, tmp: Path) -> nn.Module | None:
    from hydra.utils import instantiate

    from lightning_modules.nets.perceptual import DomainPerceptual

    target = cfg.model.perceptual._target_
    if target.endswith("LPIPSVGG"):
        return random_lpips_vgg(tmp)
    if target.endswith("domain_perceptual"):
        return DomainPerceptual(instantiate(fn_cfg.stage.module.net))  # the perceptual role's net, random init
    return None


COMPILE_BACKEND = "inductor"  # --compile-backend (aot_eager: dynamo + AOT autograd without code generation)
COMPILE_SCOPE = "regional"  # --compile-scope: "regional" (each repeated block) or "full" (the whole net)
# Regional compilation: the whole 426M-parameter LDM-4 U-Net as one inductor graph took > 150 s to compile on
# the H200 (16 CPU cores); compiling its repeated blocks one by one (PyTorch recipe "Reducing torch.compile
# cold start compilation time with regional compilation") compiles each distinct block shape once, and the
# blocks of equal shape reuse it. Each distinct shape is a recompile of the same code object, more than
# dynamo's default limit of 8, hence RECOMPILE_LIMIT (past a limit dynamo runs the block eagerly, silently).
RECOMPILE_LIMIT = 128


def regional_block_types() -> tuple[type, ...]:
    """The repeated blocks of the nets: the U-Net's and classifier's ResBlock and SpatialTransformer, the
    autoencoder's ResnetBlock and AttnBlock."""
    from lightning_modules.nets.attention import SpatialTransformer
    from lightning_modules.nets.autoencoder import AttnBlock, ResnetBlock
    from lightning_modules.nets.blocks import ResBlock

    return ResBlock, SpatialTransformer, ResnetBlock, AttnBlock


def compile_regions(net: nn.Module, blocks: tuple[type, ...]) -> int:
    """`Module.compile` (in place: names, parameters and state_dict unchanged) every outermost submodule of a
    type in `blocks`; the number compiled."""
    n = 0
    for child in net.children():
        if isinstance(child, blocks):
            child.compile(backend=COMPILE_BACKEND, dynamic=False)
            n += 1
        else:
            n += compile_regions(child, blocks)
    return n


def maybe_compile(net: nn.Module, on: bool) -> nn.Module:
    """`net` compiled in place (regionally, or as a whole if it has no repeated blocks or --compile-scope full)."""
    if on and (COMPILE_SCOPE == "full" or not compile_regions(net, regional_block_types())):
        net.compile(backend=COMPILE_BACKEND, dynamic=False)
    return net


def recompile_limit(n: int):
    """dynamo's per-code-object recompile limit raised to n for the block (`recompile_limit`, formerly
    `cache_size_limit`)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(n, getattr(config, name))})


def eager(fn: Callable[[], int]) -> int:
    """fn() with every compiled module running its original code (FLOP counting sees each op)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance else contextlib.nullcontext():
        return fn()


def step_autoencoder(cfg, device, args, tmp, compile_on: bool):
    from hydra.utils import instantiate

    fn_cfg = compose_stage(args.size_now, "feature_net", args.trainer, args.tiny) if args.size_now == "demo" else None
    m = cfg.stage.module
    ae = instantiate(cfg.model.autoencoder).to(device)
    disc = instantiate(cfg.model.discriminator).to(device)
    loss = instantiate(m.loss)(perceptual=perceptual_net(cfg, fn_cfg, tmp), perceptual_weight=float(m.perceptual_weight),
                               disc_start=0).to(device)  # fmt: skip
    opt_g = instantiate(m.optimizer)([*ae.parameters(), *loss.generator_parameters()])
    opt_d = instantiate(m.disc_optimizer)(disc.parameters())
    # The encoder and decoder (or their blocks) in place: the posterior object stays outside the compiled graphs.
    maybe_compile(ae.encoder, compile_on)
    maybe_compile(ae.decoder, compile_on)
    ae_c, disc_c = ae, maybe_compile(disc, compile_on)
    b, c, s = int(cfg.data.batch_size), int(cfg.data.channels), int(cfg.data.image_size)
    x = torch.rand(b, c, s, s, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, args.precision):
            recons, posterior = ae_c(x)
            loss_g, _ = loss.generator_loss(x, recons, posterior, 1, ae.last_layer, disc_c)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with autocast(device, args.precision):
            loss_d, _ = loss.discriminator_loss(x, recons, 1, disc_c)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

    return step, b, None, {"autoencoder": ae, "discriminator": disc}


def step_diffusion(cfg, device, args, tmp, compile_on: bool):
    from hydra.utils import instantiate

    from lightning_modules.diffusion_module import diffusion_loss
    from lightning_modules.ema import EMA

    m = cfg.stage.module
    zc, hw = latent_geometry(args)
    conditioner = instantiate(cfg.model.conditioner).to(device)
    unet = instantiate(cfg.model.unet)(in_channels=zc, out_channels=zc, context_dim=conditioner.context_dim).to(device)
    schedule = instantiate(cfg.model.schedule)
    if args.channels_last:  # --channels-last: NHWC convolutions (the MFU levers of the README)
        unet.to(memory_format=torch.channels_last)
    params = [*unet.parameters(), *conditioner.parameters()]
    opt = instantiate(m.optimizer)(params, **({"fused": True} if args.fused_optim else {}))
    ema = EMA(unet, decay=float(m.ema_decay), warmup=m.ema_warmup if "ema_warmup" in m else True)
    unet_c = maybe_compile(unet, compile_on)
    b = int(cfg.data.batch_size)
    z0 = torch.randn(b, zc, hw, hw, device=device)
    z0 = z0.contiguous(memory_format=torch.channels_last) if args.channels_last else z0
    labels = torch.randint(0, int(cfg.data.num_classes), (b,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    clip = cfg.trainer.get("gradient_clip_val")

    def loss_of(model) -> Tensor:
        t = torch.randint(0, schedule.num_timesteps, (b,), generator=gen, device=device)
        noise = torch.randn(z0.shape, generator=gen, device=device)
        with autocast(device, args.precision):
            context, mask = conditioner(conditioner.drop(labels, float(m.p_uncond), gen))
            return diffusion_loss(model, schedule, m.prediction_type, z0, t, noise, context, mask).mean()

    def step() -> None:
        loss = loss_of(unet_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        opt.step()
        ema.update(unet)

    def flops() -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            loss_of(unet).backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    return step, b, lambda: eager(flops), {"unet": unet, "conditioner": conditioner}



def step_classifier(cfg, device, args, tmp, compile_on: bool):
    from hydra.utils import instantiate

    from lightning_modules.classifier_module import diffuse
    from lightning_modules.ema import EMA

    m = cfg.stage.module
    zc, hw = latent_geometry(args)
    k = int(cfg.data.num_classes)
    net = instantiate(cfg.model.classifier)(in_channels=zc, latent_size=hw, num_classes=k).to(device)
    # The classifier stage reads the schedule from the diffusion checkpoint: here from the diffusion config.
    schedule = instantiate(compose_stage(args.size_now, "diffusion", args.trainer, args.tiny).model.schedule)
    opt = instantiate(m.optimizer)(net.parameters())
    ema = EMA(net, decay=float(m.ema_decay), warmup="power", power=float(m.ema_power)) if m.use_ema else None
    net_c = maybe_compile(net, compile_on)
    b = int(cfg.data.batch_size)
    z0 = torch.randn(b, zc, hw, hw, device=device)
    labels = torch.randint(0, k, (b,), device=device)

    def step() -> None:
        z_t, t, _ = diffuse(schedule, z0)
        with autocast(device, args.precision):
            loss = F.cross_entropy(net_c(z_t, t).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(net)

    return step, b, None, {"classifier": net}


def step_feature_net(cfg, device, args, tmp, compile_on: bool):
    from hydra.utils import instantiate

    m = cfg.stage.module
    net = instantiate(m.net).to(device)
    opt = instantiate(m.optimizer)(net.parameters())
    net_c = maybe_compile(net, compile_on)
    b, c, s = int(cfg.data.batch_size), int(cfg.data.channels), int(cfg.data.image_size)
    x = torch.rand(b, c, s, s, device=device) * 2 - 1
    labels = torch.randint(0, int(cfg.data.num_classes), (b,), device=device)

    def step() -> None:
        with autocast(device, args.precision):
            loss = F.cross_entropy(net_c(x)["logits"].float(), labels, label_smoothing=float(m.label_smoothing))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, b, None, {"feature_net": net}


STEPS: dict[str, Callable] = {"autoencoder": step_autoencoder, "diffusion": step_diffusion,
                              "classifier": step_classifier, "feature_net": step_feature_net}  # fmt: skip


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float, float]:
    """(seconds of the first step: compilation + one step, seconds of all warm-up steps, median seconds per
    timed step)."""
    sync(device)
    t0 = time.perf_counter()
    first = None
    for _ in range(warmup):
        step()
        if first is None:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t1 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t1)
    times.sort()
    return first or 0.0, warm, times[len(times) // 2]


def release_memory(device: torch.device) -> None:
    """Free what the last part left: reference cycles (gc), dynamo's compiled code and guards (which hold the
    compiled modules), the CUDA caching allocator's free blocks; reset the peak-memory counter."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def train_part(size: str, stage: str, device: torch.device, args, tmp: Path, batch: int | None = None) -> dict:
    """`measure_train` at the config's batch (or `batch`); after an out-of-memory error, again at half the
    batch, at most --oom-retries times (the batches that ran out are in `oom_batches`)."""
    args.size_now = size
    cfg = compose_stage(size, stage, args.trainer, args.tiny, batch)
    ooms: list[int] = []
    while True:
        try:
            result = measure_train(cfg, stage, device, args, tmp)
            return {**result, "oom_batches": ooms} if ooms else result
        except torch.OutOfMemoryError as err:
            message = f"OutOfMemoryError at batch {cfg.data.batch_size}: {err}"[:2000]
        # Outside the except block: the error's traceback (and the part's tensors its frames hold) is gone.
        ooms.append(int(cfg.data.batch_size))
        release_memory(device)
        if len(ooms) > args.oom_retries or ooms[-1] < 2:
            raise RuntimeError(f"{message} (batches tried: {ooms})")
        cfg = compose_stage(size, stage, args.trainer, args.tiny, ooms[-1] // 2)


def measure_train(cfg, stage: str, device: torch.device, args, tmp: Path) -> dict:
    """One part's measurement at the composed config `cfg` (run_part frees the memory after each part)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each part compiles afresh (no recompile limits shared between parts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result: dict = {"allocated_mib_at_start": allocated_mib(device)}  # > 0: an earlier part's tensors leaked
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if stage == "diffusion":
        result.update(channels_last=args.channels_last, fused_optim=args.fused_optim)
    result.update(batch_size=int(cfg.data.batch_size), precision=args.precision, compiled=compile_on,
                  **({"compile_backend": COMPILE_BACKEND, "compile_scope": COMPILE_SCOPE} if compile_on else {}))  # fmt: skip
    step, batch, flops_fn, nets = STEPS[stage](cfg, device, args, tmp, compile_on)
    result["parameters"] = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    try:
        with recompile_limit(RECOMPILE_LIMIT):
            first, warm, sec = time_steps(step, device, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001  (a compile failure: record it, measure eager instead)
        if not compile_on:
            raise
        result["compile_error"] = f"{type(err).__name__}: {err}"[:2000]
        result["compiled"] = False
        del step, flops_fn, nets
        release_memory(device)
        step, batch, flops_fn, nets = STEPS[stage](cfg, device, args, tmp, False)
        first, warm, sec = time_steps(step, device, args.warmup, args.steps)
    # first_step_s: compilation (when compiled) + one step; warmup_s: all --warmup steps, first included.
    result.update(first_step_s=first, warmup_s=warm, step_ms=1e3 * sec, images_per_s=batch / sec,
                  timed_steps=args.steps)  # fmt: skip
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if flops_fn is not None:
        flops = flops_fn()
        result["model_tflop_per_step"] = flops / 1e12
        result["achieved_tflops"] = flops / sec / 1e12
        peak, _ = device_peak_tflops(device, args.peak_tflops)
        result["mfu"] = flops / sec / (peak * 1e12) if peak else None
    return result


# --- SDPA ---------------------------------------------------------------------------------------------------
def sdpa_part(device: torch.device, args) -> dict:
    """Which SDPA backends run the LDM-4 U-Net's attention shapes (forward + backward, bf16)."""
    if device.type != "cuda":
        return {"note": "CPU: SDPA runs its CPU kernels (flash-attention-for-CPU or math); nothing to probe"}
    from hydra.utils import instantiate
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args.size_now = "ldm4"
    cfg = compose_stage("ldm4", "diffusion", args.trainer, args.tiny)
    zc, hw = latent_geometry(args)
    u = cfg.model.unet
    # Cross-attention gets a key mask only if the conditioner returns one (the class conditioner: None).
    _, cond_mask = instantiate(cfg.model.conditioner)(torch.zeros(1, dtype=torch.long))
    d = int(u.num_head_channels)
    b = int(cfg.data.batch_size)
    shapes = {}
    for ds in u.attention_resolutions:
        ch = int(u.model_channels) * int(u.channel_mult[min(int(math.log2(ds)), len(u.channel_mult) - 1)])
        n = (hw // ds) ** 2
        shapes[f"self_ds{ds}"] = (b, ch // d, n, n, d, False)
        shapes[f"cross_ds{ds}"] = (b, ch // d, n, int(cfg.model.conditioner.get("num_tokens", 1)), d,
                                   cond_mask is not None)  # fmt: skip
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    out: dict = {"head_dim": d, "cross_attention_mask": cond_mask is not None, "shapes": {}}
    for name, (bb, h, n, nk, dd, masked) in shapes.items():
        q = torch.randn(bb, h, n, dd, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(bb, h, nk, dd, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(bb, h, nk, dd, device=device, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(bb, 1, 1, nk, dtype=torch.bool, device=device) if masked else None
        usable = {}
        for bname, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
                sync(device)
                usable[bname] = True
            except Exception as err:  # noqa: BLE001
                usable[bname] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        kernels = default_kernels(q, k, v, mask)
        out["shapes"][name] = {"shape_bhnld": [bb, h, n, nk, dd], "mask": masked, "usable": usable,
                               "default_backend": backend_of(kernels), "default_kernels": kernels}  # fmt: skip
        del q, k, v
    flash = [s["usable"]["flash"] is True for s in out["shapes"].values()]
    out["flash_usable"] = {"self_attention": all(f for f, n in zip(flash, out["shapes"]) if n.startswith("self")),
                           "cross_attention": all(f for f, n in zip(flash, out["shapes"]) if n.startswith("cross"))}  # fmt: skip
    return out


def backend_of(kernels: list[str]) -> str:
    """The SDPA backend the default dispatch chose, from the names of the kernels it ran."""
    names = " ".join(kernels).lower()
    if "cudnn" in names and "sdpa" in names:
        return "cudnn"
    if "flash" in names:
        return "flash"
    if "memeff" in names or "fmha_cutlass" in names or "efficient" in names:
        return "efficient"
    return "math or unknown" if kernels else "unknown"


def default_kernels(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> list[str]:
    """CUDA kernel names of one default-dispatch SDPA forward + backward that look like attention."""

    try:
        return _default_kernels(q, k, v, mask)
    except Exception as err:  # noqa: BLE001  (no CUPTI: say so, keep the rest of the part)
        return [f"profiler failed: {type(err).__name__}: {err}"[:200]]


def _default_kernels(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        torch.cuda.synchronize()
    keys = ("flash", "fmha", "attention", "attn", "cudnn", "efficient", "sdpa", "softmax")
    names = {e.key for e in prof.key_averages() if any(s in e.key.lower() for s in keys)}
    return sorted(n[:120] for n in names)


# --- debug=fdr through the CLI ------------------------------------------------------------------------------
def make_image_folder(root: Path, classes: int = 4, per_class: int = 70, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{i}.png")


def cli(module: str, overrides: list[str], env: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=max(timeout, 1))  # fmt: skip
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or b""  # bytes even with text=True (CPython)
        out = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        rc, err = 124, f"timed out after {timeout:.0f} s"
    result = {"command": f"python -m {module} {' '.join(overrides)}", "exit_code": rc,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    if rc != 0:
        result["error"] = f"exit code {rc}"
        result["output_tail"] = (out[-2000:] + "\n" + err[-4000:]).strip()
    return result


FDR_STAGES = [
    ("feature_net_perceptual", ["stage=feature_net", "stage.role=perceptual"]),
    ("feature_net_eval", ["stage=feature_net", "stage.role=eval"]),
    ("autoencoder", ["stage=autoencoder"]),
    ("diffusion", ["stage=diffusion"]),
    ("classifier", ["stage=classifier"]),
]


def fdr_parts(device: torch.device, args, tmp: Path, deadline: float, record: Callable[[str, dict], None]) -> None:
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]),
                "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})  # fmt: skip
    # FID needs more samples than the eval feature net's 128 dimensions: 136 samples, 140 test images.
    images, root = tmp / "images", tmp / "gldm"
    make_image_folder(images)
    common = ["experiment=fashion_mnist_quick", "data=imagefolder", f"data.source.root={images}", "data.num_classes=4",
              "data.channels=1", "data.image_size=32", "data.val_size=8", "data.test_size=140", "data.shard_size=64",
              f"paths.root_dir={root}"]  # fmt: skip
    trainer = "trainer=gpu" if device.type == "cuda" else "trainer=cpu"
    names = [n for n, _ in FDR_STAGES] if args.fdr_stages == "all" else args.fdr_stages.split(",")
    steps = [("prepare", "pipeline.prepare", [*common, "progress=false"])]
    steps += [(n, "pipeline.train", [*o, *common, "debug=fdr", trainer, "logger=csv"]) for n, o in FDR_STAGES if n in names]
    if args.fdr_stages == "all":
        steps.append(("evaluate", "pipeline.evaluate",
                      [*common, "logger=csv", "num_samples=136", "batch_size=68", "sampler.num_steps=3",
                       "grid_per_class=1", "guidance.scales=[3]", "progress=false", "metrics.is_splits=2",
                       f"device={'cuda' if device.type == 'cuda' else 'cpu'}"]))  # fmt: skip
    for name, module, overrides in steps:
        part = f"fdr/{name}"
        if time.perf_counter() > deadline:
            record(part, {"skipped": "over --budget-s"})
            continue
        record(part, cli(module, overrides, env, deadline - time.perf_counter() + args.fdr_grace_s))


# --- main ---------------------------------------------------------------------------------------------------
def env_part(device: torch.device, args) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(device), "cpu": platform.processor() or platform.machine(), "tiny": args.tiny}  # fmt: skip
    with contextlib.suppress(Exception):
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported())  # fmt: skip
    else:
        info["device_name"] = cpu_description()
        info["threads"] = torch.get_num_threads()
    info["peak_tflops"], info["peak_source"] = device_peak_tflops(device, args.peak_tflops)
    return info


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: dict) -> None:
    env = results["parts"].get("env", {})
    print(f"\n# gpu_check on {env.get('device_name')} (torch {env.get('torch')}, CUDA {env.get('cuda')}), "
          f"peak {env.get('peak_tflops')} TFLOP/s ({env.get('peak_source')})")  # fmt: skip
    print("\n| part | batch | compiled | first step s | step ms | images/s | MiB at start | peak MiB | TFLOP/s | MFU "
          "| error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["parts"].items():
        if name.startswith("train/"):
            err = r.get("error") or r.get("skipped") or ("compile failed, eager" if r.get("compile_error") else "")
            err = err.splitlines()[0] if err else ""
            if r.get("oom_batches"):
                err = f"out of memory at batch {r['oom_batches']}; {err}"
            print(f"| {name} | {r.get('batch_size', '-')} | {r.get('compiled', '-')} | {fmt(r.get('first_step_s'), '.1f')} | "
                  f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('images_per_s'), '.1f')} | "
                  f"{fmt(r.get('allocated_mib_at_start'), '.0f')} | {fmt(r.get('peak_mib'), '.0f')} | "
                  f"{fmt(r.get('achieved_tflops'), '.1f')} | {fmt(r.get('mfu'), '.1%')} | {err[:60]} |")  # fmt: skip
    print("\n| fdr part | exit | seconds | note |")
    print("|---|---|---|---|")
    for name, r in results["parts"].items():
        if name.startswith("fdr/"):
            print(f"| {name} | {r.get('exit_code', '-')} | {fmt(r.get('seconds'), '.1f')} | "
                  f"{(r.get('error') or r.get('skipped') or '').splitlines()[0:1]} |")  # fmt: skip
    sdpa = results["parts"].get("sdpa", {})
    if "flash_usable" in sdpa:
        print(f"\nSDPA flash usable: {sdpa['flash_usable']}")
        for name, s in sdpa["shapes"].items():
            print(f"  {name} {s['shape_bhnld']} mask={s['mask']}: {s.get('default_backend')} "
                  f"{s['default_kernels']}")  # fmt: skip
    failed = [n for n, r in results["parts"].items() if r.get("error")]
    print(f"\n{len(results['parts'])} parts, failed: {failed or 'none'}; {results['seconds']:.0f} s in all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="shrink the LDM-4 sizes (CPU test run)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per part")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--precision", choices=["bf16-mixed", "32"], default="bf16-mixed")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for cuda")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU check)")
    parser.add_argument("--compile-scope", choices=["regional", "full"], default="regional",
                        help="regional: compile each repeated block (ResBlock, SpatialTransformer, ...); full: whole nets")
    parser.add_argument("--channels-last", action="store_true", help="the U-Net step in channels_last (NHWC)")
    parser.add_argument("--fused-optim", action="store_true", help="the U-Net step's AdamW with fused=True")
    parser.add_argument("--oom-retries", type=int, default=1, help="after out of memory, retry at half the batch")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--budget-s", type=float, default=210.0, help="parts that would start later are skipped")
    parser.add_argument("--part-timeout-s", type=float, default=90.0, help="a training/SDPA part is stopped after this")
    parser.add_argument("--unet-timeout-s", type=float, default=170.0,
                        help="the (compiled) LDM-4 U-Net part, the first training part, is stopped after this")
    parser.add_argument("--fdr-grace-s", type=float, default=40.0, help="a started part may overrun the budget by this")
    parser.add_argument("--parts", default="env,sdpa,train,fdr", help="comma-separated subset of env,sdpa,train,fdr")
    parser.add_argument("--sizes", default="ldm4,demo")
    parser.add_argument("--fdr-stages", default="all", help="all (+ evaluate), or names from FDR_STAGES")
    parser.add_argument("--big-unet-batch", type=int, default=None,
                        help="also time the LDM-4 U-Net step at this batch (default: 128 on cuda, none with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global COMPILE_BACKEND, COMPILE_SCOPE
    COMPILE_BACKEND, COMPILE_SCOPE = args.compile_backend, args.compile_scope
    if args.big_unet_batch is None:
        args.big_unet_batch = 128 if device.type == "cuda" and not args.tiny else 0
    args.trainer = "gpu" if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    deadline = start + args.budget_s
    wanted = set(args.parts.split(","))
    results: dict = {"argv": sys.argv[1:] if argv is None else argv, "complete": False, "parts": {}}

    def record(name: str, value: dict) -> None:
        results["parts"][name] = value
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: " + json.dumps(value, default=str)[:400], flush=True)
        results["seconds"] = time.perf_counter() - start
        atomic_write_json(args.out, results)  # after every part: a run killed by a time limit keeps what it did

    def run_part(name: str, fn: Callable[[], dict], timeout_s: float | None = None) -> None:
        if time.perf_counter() > deadline:
            record(name, {"skipped": "over --budget-s"})
            return
        t0 = time.perf_counter()
        limit = max(30.0, min(timeout_s or args.part_timeout_s, deadline - t0 + args.fdr_grace_s))
        try:
            with time_limit(limit):
                value = fn()
        except PartTimeout:
            value = {"error": f"PartTimeout: stopped after {limit:.0f} s (--part-timeout-s / --unet-timeout-s / "
                              "--budget-s)"}  # fmt: skip
        except Exception as err:  # noqa: BLE001  (one part's failure must not stop the others)
            value = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        release_memory(device)  # the next part starts from an empty device (allocated_mib_at_start shows it)
        value["part_s"] = time.perf_counter() - t0
        record(name, value)

    def fdr() -> None:
        try:
            fdr_parts(device, args, tmp, deadline, record)
        except Exception as err:  # noqa: BLE001
            record("fdr/setup", {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]})

    sizes = [s for s in args.sizes.split(",") if s]
    unknown = set(sizes) - set(STAGES)
    if unknown:
        parser.error(f"--sizes: unknown {sorted(unknown)}; choose from {sorted(STAGES)}")
    # Order: what matters most first, so that a tight budget cuts the rest: the LDM-4 stages (the U-Net's
    # MFU first), every stage's debug=fdr on the device, the demo sizes, then the U-Net at a larger batch.
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmpdir:
        tmp = Path(tmpdir)
        run_part("env", lambda: env_part(device, args))
        if "sdpa" in wanted:
            run_part("sdpa", lambda: sdpa_part(device, args))
        for size in sizes:
            if "train" in wanted:
                for stage in STAGES[size]:
                    unet = size == "ldm4" and stage == "diffusion"
                    run_part(f"train/{size}/{stage}", lambda s=size, g=stage: train_part(s, g, device, args, tmp),
                             args.unet_timeout_s if unet else None)  # fmt: skip
            if "fdr" in wanted and size == sizes[0]:
                fdr()
        if "fdr" in wanted and not sizes:
            fdr()
        if "train" in wanted and "ldm4" in sizes and args.big_unet_batch:
            run_part(f"train/ldm4/diffusion_b{args.big_unet_batch}",
                     lambda: train_part("ldm4", "diffusion", device, args, tmp, args.big_unet_batch), args.unet_timeout_s)
        shutil.rmtree(tmp / "gldm", ignore_errors=True)
    results["seconds"] = time.perf_counter() - start
    results["failed"] = sorted(n for n, r in results["parts"].items() if r.get("error"))
    results["complete"] = True
    atomic_write_json(args.out, results)
    print_table(results)
    print(f"wrote {args.out}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
