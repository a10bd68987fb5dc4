"""Training throughput and peak memory of the autoencoder stage at its configured size, side by side.

    python bench/autoencoder.py [--batch-size 128] [--steps 10] [--warmup 2] [--device cpu|cuda]

Runs the real `AutoencoderModule.training_step` under a Lightning Trainer on synthetic batches, in one
process, for three settings: fp32 with the GAN step (discriminator active from step 0; the reference),
fp32 before disc_start (no discriminator forward/backward), and bf16 autocast with the GAN step. Nets come
from the composed `stage=autoencoder` config (model/autoencoder, model/discriminator); the perceptual net is
a randomly initialised FeatureNet of the feature_net stage's configured widths (speed does not depend on its
weights). Peak memory: CUDA `max_memory_allocated`; CPU the process's peak RSS (VmHWM, reset between runs
through /proc/self/clear_refs) minus the RSS before the run.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_modules.autoencoder import AutoencoderModule  # noqa: E402
from lightning_modules.nets.feature_net import FeatureNet  # noqa: E402
from lightning_modules.nets.perceptual import DomainPerceptual  # noqa: E402


class SameBatch(IterableDataset):
    """One fixed batch {"image": (B, C, S, S) in [-1, 1], "label"}, repeated `n` times (no data loading cost)."""

    def __init__(self, batch_size: int, channels: int, size: int, n: int) -> None:
        self.batch = {"image": torch.rand(batch_size, channels, size, size) * 2 - 1,
                      "label": torch.zeros(batch_size, dtype=torch.long)}  # fmt: skip
        self.n = n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


class SyntheticData(pl.LightningDataModule):
    def __init__(self, batch_size: int, channels: int, image_size: int, n: int) -> None:
        super().__init__()
        self.channels, self.image_size = channels, image_size
        self.dataset = SameBatch(batch_size, channels, image_size, n)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None)


class StepTimer(pl.Callback):
    """Wall time of each training batch (synchronised on CUDA); the first `warmup` are dropped."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t0 = warmup, [], 0.0

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t0)


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(device: str) -> int:
    """Reset the peak-memory counter; returns the baseline in bytes (CPU RSS now, 0 on CUDA)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return 0
    # Hand the previous run's freed heap back to the OS, else it counts in the baseline, not the peak.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _proc_status_kib("VmRSS") * 1024


def peak_bytes(device: str, baseline: int) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM") * 1024 - baseline


def compose_stage(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_module(cfg, fn_cfg, gan: bool) -> AutoencoderModule:
    torch.manual_seed(0)
    m = cfg.stage.module
    fn_net = fn_cfg.stage.module.net
    perceptual = DomainPerceptual(FeatureNet(in_channels=cfg.data.channels, widths=list(fn_net.widths)))
    return AutoencoderModule(
        autoencoder=instantiate(cfg.model.autoencoder),
        discriminator=instantiate(cfg.model.discriminator),
        loss=functools.partial(instantiate(m.loss), disc_start=0 if gan else 10**9),
        optimizer=instantiate(m.optimizer),
        disc_optimizer=instantiate(m.disc_optimizer),
        perceptual=lambda: perceptual,
        perceptual_weight=m.perceptual_weight,
        latent_stats_samples=1,
    )


def run(cfg, fn_cfg, args, gan: bool, precision: str, root_dir: str) -> dict:
    module = build_module(cfg, fn_cfg, gan)
    timer = StepTimer(args.warmup)
    n = args.warmup + args.steps
    data = SyntheticData(args.batch_size, cfg.data.channels, cfg.data.image_size, n)
    trainer = pl.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=n, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[timer], default_root_dir=root_dir)  # fmt: skip
    baseline = reset_peak(args.device)
    trainer.fit(module, datamodule=data)
    seconds = sum(timer.times)
    return {"images_per_s": args.batch_size * len(timer.times) / seconds, "ms_per_step": 1e3 * seconds / len(timer.times),
            "peak_mib": peak_bytes(args.device, baseline) / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size of the config")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model/autoencoder=kl_f8")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_stage(["stage=autoencoder", "experiment=fashion_mnist_quick", *args.overrides])
    fn_cfg = compose_stage(["stage=feature_net", "experiment=fashion_mnist_quick"])
    args.batch_size = args.batch_size or cfg.data.batch_size
    settings = [("fp32, G + D step (reference)", True, "32-true"), ("fp32, G only (before disc_start)", False,
                "32-true"), ("bf16 autocast, G + D step", True, "bf16-mixed")]  # fmt: skip
    with tempfile.TemporaryDirectory() as root_dir:  # the stage writes latent_stats.json there
        rows = [(name, run(cfg, fn_cfg, args, gan, precision, root_dir)) for name, gan, precision in settings]
    ref = rows[0][1]
    size = f"{cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}"
    print(f"\nautoencoder stage training, device={args.device} (threads={torch.get_num_threads()}), batch={args.batch_size}, "
          f"images {size}, model/autoencoder ch={cfg.model.autoencoder.ch} ch_mult={list(cfg.model.autoencoder.ch_mult)}, "
          f"{args.steps} timed steps after {args.warmup}")  # fmt: skip
    print(f"{'setting':36s} {'images/s':>10s} {'ms/step':>9s} {'peak MiB':>9s} {'speed x':>8s} {'memory x':>9s}")
    for name, r in rows:
        print(f"{name:36s} {r['images_per_s']:10.1f} {r['ms_per_step']:9.1f} {r['peak_mib']:9.1f} "
              f"{r['images_per_s'] / ref['images_per_s']:8.2f} {r['peak_mib'] / max(ref['peak_mib'], 1e-9):9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
