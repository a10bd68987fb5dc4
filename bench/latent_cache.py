"""Diffusion-stage training throughput: latents encoded on the fly vs read from the latent cache
(`stage.cache_latents=true`), side by side in one run on the same data, nets and machine.

Each mode streams the same Fashion-MNIST shards through `LatentCacheDataModule` and runs the stage's real
`training_step` (+ backward + AdamW) with the default nets (conf/model/unet/small.yaml,
conf/model/autoencoder/kl_f4.yaml, random weights: the cost does not depend on them).

    python bench/latent_cache.py [--images 2048] [--batch 128] [--steps 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.shards import prepare_dataset  # noqa: E402
from datamodules.sources import FashionMNIST  # noqa: E402
from lightning_modules.diffusion import DDIMSampler, NoiseSchedule  # noqa: E402
from lightning_modules.diffusion_module import DiffusionModule  # noqa: E402
from lightning_modules.latent_cache import LatentCacheDataModule  # noqa: E402
from lightning_modules.nets.autoencoder import AutoencoderKL  # noqa: E402
from lightning_modules.nets.conditioners import ClassConditioner  # noqa: E402
from lightning_modules.nets.unet import UNet  # noqa: E402


def conf(path: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / path))
    return {k: v for k, v in cfg.items() if not k.startswith("_") and not str(v).startswith("${")}


def autoencoder_ckpt(out: Path) -> Path:
    ae = AutoencoderKL(in_channels=1, **conf("model/autoencoder/kl_f4.yaml"))
    torch.save({"stage": "autoencoder", "autoencoder_hparams": ae.hparams(), "autoencoder_state_dict": ae.state_dict(),
                "latent_scale_factor": 1.0, "latent_shape": [ae.z_channels, 8, 8], "image_shape": [1, 32, 32]},
               out)  # fmt: skip
    return out


def throughput(module: DiffusionModule, dm: LatentCacheDataModule, steps: int, warmup: int) -> float:
    """Seconds per training step (data + latents + forward + backward + AdamW), after `warmup` steps."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batches = iter(dm.train_dataloader())
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = module.training_step(next(batches), i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="train images in the bench's shards")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (the CPU demo uses 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default: on a shared CPU, OpenMP threads that wait for a "
                             "busy core make a multi-threaded step many times slower")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_dataset(FashionMNIST("/usr/share/datasets/fashion-mnist"), tmp / "data", name="fashion_mnist",
                        config={"bench": args.images}, val_size=64, limit=args.images, shard_size=1024,
                        progress=False)  # fmt: skip
        ckpt = autoencoder_ckpt(tmp / "ae.ckpt")
        torch.manual_seed(0)
        module = DiffusionModule(
            unet=functools.partial(UNet, **conf("model/unet/small.yaml")), conditioner=ClassConditioner(10, 64),
            schedule=NoiseSchedule("scaled_linear", 1000), sampler=DDIMSampler(num_steps=25),
            optimizer=functools.partial(torch.optim.AdamW), autoencoder_checkpoint=str(ckpt), image_size=32,
            num_classes=10,
        )  # fmt: skip
        common = dict(data_dir=str(tmp / "data"), image_size=32, channels=1, batch_size=args.batch,
                      num_workers=args.workers, shuffle_buffer=512, train_batches_per_epoch=10_000)  # fmt: skip
        fly = LatentCacheDataModule(**common)
        cached = LatentCacheDataModule(**common, cache_latents=True, cache_dir=str(tmp / "latents"),
                                       autoencoder_checkpoint=str(ckpt))  # fmt: skip
        start = time.perf_counter()
        cached.build_latent_cache()
        encode_s = time.perf_counter() - start
        results = {"encode on the fly": throughput(module, fly, args.steps, args.warmup),
                   "cached latents": throughput(module, cached, args.steps, args.warmup)}  # fmt: skip
    print(f"# diffusion training step, batch {args.batch}, {args.workers} loader worker(s), "
          f"{torch.get_num_threads()} torch threads; cache of {args.images} images encoded once in {encode_s:.1f} s")  # fmt: skip
    print("| latents | s/step | train img/s |")
    print("|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s:.3f} | {args.batch / s:.1f} |")
    fly_s, cache_s = results["encode on the fly"], results["cached latents"]
    print(f"| speed-up (cached / on the fly) | | {fly_s / cache_s:.2f}x |")


if __name__ == "__main__":
    main()
