"""Stage `classifier`: a time-conditioned classifier p(y | z_t, t) of noisy latents, for classifier guidance.

Training follows guided-diffusion's `scripts/classifier_train.py` (Dhariwal & Nichol 2021, Sec. 4): clean
latents z_0 = E(x) * scale from the frozen autoencoder are noised with q(z_t | z_0) of the diffusion
stage's own schedule at t ~ U{0, ..., T-1}, the loss is cross-entropy, the optimiser AdamW with the
learning rate annealed linearly to 0 over training. Validation and test report accuracy per timestep
bucket: it is high at small t and falls towards chance (1/K) as z_t approaches pure noise (plotted by the
callback `eval.callbacks.AccuracyVsTimestepPlot` from `bucket_accuracy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from lightning_modules.artifacts import StageMismatchError, classifier_artifacts, load_diffusion_upstream
from lightning_modules.base import StageModule, build_optimizer
from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import NoiseSchedule, bucket_centres, q_sample, timestep_buckets
from lightning_modules.ema import EMA
from lightning_modules.nets.classifier import NoisyLatentClassifier

# Constructor arguments of the classifier that the upstream latents decide, not the model config.
UPSTREAM_NET_ARGS = ("in_channels", "latent_size", "num_classes")


def diffuse(
    schedule: NoiseSchedule, z0: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Noise clean latents at uniformly drawn timesteps: t ~ U{0, ..., T-1}, eps ~ N(0, I),
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4).

    z0: (B, C, h, w). generator: optional RNG on z0's device (seeded validation). Returns z_t (B, C, h, w),
    t long (B,), eps (B, C, h, w).
    """
    t = torch.randint(0, schedule.num_timesteps, (z0.shape[0],), device=z0.device, generator=generator)
    noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
    return q_sample(schedule, z0, t, noise), t, noise


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ValueError naming the first label of the data outside [0, num_classes)."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"label {int(bad[0])} in the data is out of range for a classifier of {num_classes} classes "
            f"(valid: 0..{num_classes - 1}); does data.num_classes match the dataset?"
        )


def linear_anneal(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_n = lr_0 (1 - n / total_steps), clamped at 0 (guided-diffusion classifier_train.py `set_annealed_lr`)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))


class BucketedAccuracy(torchmetrics.Metric):
    """Accuracy and mean cross-entropy, overall and per timestep bucket.

    States are per-bucket sums reduced by summation across ranks, so ranks that saw different numbers of
    batches (or none) still agree after `compute()`.
    """

    full_state_update = False

    def __init__(self, num_timesteps: int, num_buckets: int = 10) -> None:
        super().__init__()
        if not 1 <= num_buckets <= num_timesteps:
            raise ValueError(f"num_buckets must be in [1, {num_timesteps}], got {num_buckets}")
        self.num_timesteps, self.num_buckets = num_timesteps, num_buckets
        for name, dtype in (("correct", torch.long), ("count", torch.long), ("loss_sum", torch.float64)):
            self.add_state(name, torch.zeros(num_buckets, dtype=dtype), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor, t: Tensor) -> None:
        """logits (B, K), labels long (B,), t long (B,) training timesteps."""
        bucket = timestep_buckets(t, self.num_timesteps, self.num_buckets)
        hits = (logits.argmax(dim=-1) == labels).long()
        losses = F.cross_entropy(logits.float(), labels, reduction="none").double()
        self.correct.index_add_(0, bucket, hits)
        self.count.index_add_(0, bucket, torch.ones_like(hits))
        self.loss_sum.index_add_(0, bucket, losses)

    def compute(self) -> dict[str, Tensor]:
        """{"acc", "loss"}: overall (NaN without samples); {"acc_bucket", "loss_bucket", "count_bucket"}: (n,)."""
        count = self.count.double()
        return {
            "acc": self.correct.sum().double() / count.sum(),
            "loss": self.loss_sum.sum() / count.sum(),
            "acc_bucket": self.correct.double() / count,
            "loss_bucket": self.loss_sum / count,
            "count_bucket": self.count.clone(),
        }


def bucket_log_dict(values: dict[str, Tensor], prefix: str) -> dict[str, float]:
    """Flatten `BucketedAccuracy.compute()` into `<prefix>/acc`, `<prefix>/acc_bucket{i}`, ...; buckets (and
    totals) without samples are left out rather than logged as NaN."""
    out: dict[str, float] = {}
    if values["count_bucket"].sum() > 0:
        out[f"{prefix}/acc"] = float(values["acc"])
        out[f"{prefix}/loss"] = float(values["loss"])
    for i, n in enumerate(values["count_bucket"].tolist()):
        if n > 0:
            out[f"{prefix}/acc_bucket{i}"] = float(values["acc_bucket"][i])
            out[f"{prefix}/loss_bucket{i}"] = float(values["loss_bucket"][i])
    return out


class ClassifierModule(StageModule):
    """Trains a `NoisyLatentClassifier` on latents of the frozen autoencoder under the diffusion stage's
    noise schedule; its checkpoint carries the (EMA) classifier for classifier guidance.

    The autoencoder is held by a `LatentCodec`, outside the module tree: it is neither trained, nor wrapped
    by DDP, nor saved in this stage's checkpoints (its fingerprint is).

    Args:
        net: `_partial_` factory of the classifier; in_channels, latent_size and num_classes are filled
            in from the upstream latents (a conflicting value in the factory is refused).
        optimizer: `_partial_` optimiser factory (AdamW in the stage config).
        autoencoder_checkpoint: the autoencoder stage's final.ckpt.
        diffusion_checkpoint: the diffusion stage's final.ckpt (schedule, latent shape, autoencoder
            fingerprint are read from it; the U-Net is not loaded).
        num_classes: K, the data's classes; labels outside [0, K) are an error.
        total_steps: steps of the linear LR anneal to 0.
        use_ema, ema_decay, ema_power: EMA of the weights with warm-up (`lightning_modules.ema.EMA`);
            validation, test and the exported classifier use the EMA weights when it is on.
        sample_posterior: encode with a posterior sample (True, as LDM) or its mode.
        num_buckets: timestep buckets of the per-t metrics.
        eval_seed: seeds validation/test t and noise per batch, so epochs are comparable.
    """

    stage_name = "classifier"

    def __init__(
        self,
        net: Callable[..., NoisyLatentClassifier],
        optimizer: Callable[..., torch.optim.Optimizer],
        autoencoder_checkpoint: str,
        diffusion_checkpoint: str,
        num_classes: int,
        total_steps: int = 1000,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        ema_power: float = 2 / 3,
        sample_posterior: bool = True,
        num_buckets: int = 10,
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        # A plain object, not a submodule: the frozen autoencoder stays out of state_dict and optimiser.
        self.codec = LatentCodec.load(autoencoder_checkpoint)
        self.autoencoder_fingerprint = self.codec.fingerprint
        upstream = load_diffusion_upstream(diffusion_checkpoint, autoencoder_checkpoint,
                                           self.autoencoder_fingerprint, num_classes)  # fmt: skip
        self.schedule = NoiseSchedule.from_dict(upstream["schedule"])
        self.latent_shape = [int(s) for s in upstream["latent_shape"]]
        self.codec.check_latents(self.latent_shape, f"diffusion checkpoint {diffusion_checkpoint}")
        self.net = build_net(net, self.latent_shape, num_classes)
        self.ema = EMA(self.net, decay=ema_decay, power=ema_power) if use_ema else None
        self.optimizer_factory = optimizer
        T = self.schedule.num_timesteps
        self.train_metrics = BucketedAccuracy(T, num_buckets)
        self.val_metrics = BucketedAccuracy(T, num_buckets)
        self.test_metrics = BucketedAccuracy(T, num_buckets)
        # Accuracy per timestep bucket of the latest validation / test (NaN: no samples), for the plots.
        self.bucket_accuracy: dict[str, list[float]] = {}

    # --- what the next stage needs -----------------------------------------------------------------
    def artifacts(self) -> dict[str, Any]:
        return classifier_artifacts(self.eval_net, self.ema is not None, self.schedule, self.latent_shape,
                                    self.hparams.autoencoder_checkpoint, self.autoencoder_fingerprint,
                                    self.hparams.diffusion_checkpoint, self.codec.scale_factor,
                                    self.hparams.num_classes)  # fmt: skip

    @property
    def eval_net(self) -> NoisyLatentClassifier:
        """The weights that are validated, tested and exported: the EMA copy when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.net

    # --- data -> noisy latents ---------------------------------------------------------------------
    def encode(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Scaled clean latents z_0 = E(x) * scale, float32 (B, c, h, w), from `batch["image"]` (B, C, H, W)
        in [-1, 1], or from cached posterior moments `batch["moments"]` (`LatentCodec.encode_batch`)."""
        return self.codec.encode_batch(batch, generator, self.hparams.sample_posterior)

    def noisy_batch(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A DataModule batch -> (z_t (B, c, h, w), t long (B,), labels long (B,))."""
        labels = batch["label"]
        check_labels(labels, self.hparams.num_classes)
        z_t, t, _ = diffuse(self.schedule, self.encode(batch, generator), generator)
        return z_t, t, labels

    def forward(self, z_t: Tensor, t: Tensor) -> Tensor:
        """z_t (B, c, h, w), t long (B,) -> logits (B, K) of the trained (non-EMA) net."""
        return self.net(z_t, t)

    # --- training ----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        z_t, t, labels = self.noisy_batch(batch)
        logits = self.net(z_t, t)
        loss = F.cross_entropy(logits, labels)
        if not self.finite_or_skip({"cross_entropy": loss}):
            return None  # no backward, no update
        self.train_metrics.update(logits.detach(), labels, t)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA, as the diffusion stage does: here (not in on_train_batch_end, which runs
        after the checkpoint callback) the EMA saved with step N has seen exactly N updates. A batch the
        non-finite guard skipped changed no weight and is not counted."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self.skipped_batch:
            self.ema.update(self.net)

    def on_train_epoch_end(self) -> None:
        # Per-bucket training metrics over the epoch (train/acc, train/loss are logged every step). Every
        # rank ran the same number of steps, so all reach this sync together.
        if self.train_metrics.update_count:
            values = bucket_log_dict(self.train_metrics.compute(), "train")
            self.log_dict({k: v for k, v in values.items() if k not in ("train/acc", "train/loss")})
        self.train_metrics.reset()
        self.log_data_health()

    # --- validation / test -------------------------------------------------------------------------
    def _eval_step(self, batch: dict, batch_idx: int, metrics: BucketedAccuracy) -> None:
        device = batch["label"].device  # a batch of cached latents has no "image"
        seed = self.hparams.eval_seed + 1_000_003 * self.global_rank + batch_idx
        z_t, t, labels = self.noisy_batch(batch, torch.Generator(device=device).manual_seed(seed))
        metrics.update(self.eval_net(z_t, t), labels, t)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval(self.test_metrics, "test")

    def _finish_eval(self, metrics: BucketedAccuracy, prefix: str) -> None:
        # compute() sums the states over ranks once per rank: uneven (or empty) shards cannot hang DDP.
        values = metrics.compute()
        metrics.reset()
        logged = bucket_log_dict(values, prefix)
        for key in (f"{prefix}/acc", f"{prefix}/loss"):
            if key in logged:
                self.log(key, logged.pop(key), prog_bar=prefix == "val")
        self.log_dict(logged)
        self.bucket_accuracy[prefix] = values["acc_bucket"].tolist()

    def bucket_centres(self) -> list[float]:
        """Mean timestep of each metrics bucket, the x axis of `bucket_accuracy`."""
        return bucket_centres(self.schedule.num_timesteps, self.hparams.num_buckets)

    def configure_optimizers(self):
        opt = build_optimizer(self.optimizer_factory, self.net.parameters())
        sched = linear_anneal(opt, self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def build_net(
    factory: Callable[..., NoisyLatentClassifier], latent_shape: list[int], num_classes: int
) -> NoisyLatentClassifier:
    """Call the classifier factory with the upstream latent shape (C, h, w) and K, refusing a factory
    that already fixes one of them to another value (it would silently be overridden otherwise)."""
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"the classifier needs square latents, got latent shape {latent_shape}")
    upstream = {"in_channels": channels, "latent_size": height, "num_classes": num_classes}
    fixed = getattr(factory, "keywords", {}) or {}
    conflicts = {k: (fixed[k], v) for k, v in upstream.items() if k in fixed and fixed[k] != v}
    if conflicts:
        details = ", ".join(
            f"{k}={mine} (config) vs {theirs} (upstream)" for k, (mine, theirs) in conflicts.items()
        )
        raise StageMismatchError(
            f"classifier config does not match the upstream latents {latent_shape} / {num_classes} classes: "
            f"{details}; leave these keys out of model.classifier"
        )
    return factory(**upstream)
