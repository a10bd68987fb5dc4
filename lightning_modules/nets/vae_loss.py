"""Autoencoder loss: L1 + perceptual reconstruction with a learned log-variance, KL, and a patch GAN.

After CompVis latent-diffusion `ldm/modules/losses/contperceptual.py` (LPIPSWithDiscriminator) and
taming-transformers `taming/modules/losses/vqperceptual.py`, with two of their pitfalls fixed:
- `logvar` is a trainable parameter that LDM declares but its training script never gives to an
  optimiser. Here `AutoencoderLoss.generator_parameters()` returns it (and any other trainable
  parameter of the loss); the LightningModule MUST add those to the autoencoder's optimiser.
  (It is also in `.parameters()`, beside the frozen perceptual weights, which never receive gradients.)
- fp16/bf16: every loss term is computed in float32 with autocast disabled; the networks themselves
  (perceptual net, discriminator) still run under the caller's autocast.

The loss never steps optimisers or touches DDP; it returns scalars and a dict of detached logs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.autoencoder import DiagonalGaussian
from lightning_modules.nets.perceptual import autocast_off

ADAPTIVE_EPS = 1e-4


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017, Geometric GAN; taming `hinge_d_loss`), a scalar.

    0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))); logits of any shape.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Binary cross-entropy discriminator loss (Goodfellow et al. 2014 eq. 1, negated), a scalar.

    0.5 * (mean(-log sigmoid(D(x))) + mean(-log(1 - sigmoid(D(x_hat))))), via softplus for stability.
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Adaptive GAN weight (Esser et al. 2021 eq. 7), a detached float32 scalar.

    lambda = ||grad_GL[L_rec]|| / (||grad_GL[L_GAN]|| + 1e-4), GL the decoder's last layer, clamped to
    [0, max_weight]. Both losses must still have their graphs (they are kept for the real backward).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, max_weight).detach()


def nll_learned_logvar(rec: Tensor, logvar: Tensor) -> Tensor:
    """Reconstruction NLL with a learned scalar log-variance (Rombach et al. 2022, LDM contperceptual).

    rec: (B, C, H, W) per-pixel reconstruction loss -> scalar sum over pixels of rec / exp(logvar) + logvar,
    averaged over the batch (LDM's `torch.sum(nll) / B`).
    """
    nll = rec / torch.exp(logvar) + logvar
    return nll.sum() / rec.shape[0]


def _detached_logs(logs: dict[str, Tensor | float], device: torch.device) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device).detach() for k, v in logs.items()}


class AutoencoderLoss(nn.Module):
    """Generator (autoencoder) and discriminator objectives of the KL autoencoder.

    Generator: nll_learned_logvar(|x - x_hat| + w_p * P(x, x_hat)) + w_kl * KL + d_weight * disc_factor * G,
    G = -mean(D(x_hat)), d_weight = disc_weight * adaptive_weight(...). Discriminator: disc_factor * d_loss.
    disc_factor is 0 before `disc_start`, 1 from it on; before it the discriminator is not even called in
    the generator objective, so the GAN term is exactly zero.

    Args:
        perceptual: a frozen module mapping two (B, C, H, W) batches in [-1, 1] to (B,) distances
            (`LPIPSVGG`, `DomainPerceptual`), or None for no perceptual term.
        perceptual_weight: w_p.
        kl_weight: w_kl.
        disc_weight: factor on the adaptive weight.
        disc_start: first global step with the GAN terms on.
        disc_loss: "hinge" or "vanilla".
        logvar_init: initial value of the learned log-variance.
        adaptive_weight_max: clamp of the adaptive weight.
    """

    def __init__(
        self,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.5,
        disc_start: int = 50_001,
        disc_loss: str = "hinge",
        logvar_init: float = 0.0,
        adaptive_weight_max: float = 1e4,
    ) -> None:
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_loss = disc_loss
        self.adaptive_weight_max = adaptive_weight_max
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the loss (the learned `logvar`): give them to the autoencoder's optimiser."""
        return [p for p in self.parameters() if p.requires_grad]

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at `global_step` (the LightningModule may skip the D step if not)."""
        return global_step >= self.disc_start

    def perceptual_loss(self, inputs: Tensor, recons: Tensor) -> Tensor:
        """(B, C, H, W) x 2 -> (B,) float32 distances; zeros without a perceptual net or weight."""
        if self.perceptual is None or self.perceptual_weight == 0:
            return inputs.new_zeros(inputs.shape[0], dtype=torch.float32)
        return self.perceptual(inputs, recons).float().reshape(inputs.shape[0])

    def generator_loss(
        self,
        inputs: Tensor,
        recons: Tensor,
        posterior: DiagonalGaussian,
        global_step: int,
        last_layer: Tensor,
        discriminator: nn.Module,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder objective and its logs.

        Args:
            inputs: (B, C, H, W) images in [-1, 1].
            recons: (B, C, H, W) reconstructions, still attached to the autoencoder's graph.
            posterior: q(z | inputs).
            global_step: optimiser step count, compared with `disc_start`.
            last_layer: the decoder's last weight (`AutoencoderKL.last_layer`).
            discriminator: maps (B, C, H, W) to patch logits.

        Returns:
            (scalar float32 loss, {name: detached float32 scalar}).
        """
        p_loss = self.perceptual_loss(inputs, recons)
        active = self.discriminator_active(global_step)
        logits_fake = discriminator(recons) if active else None
        with autocast_off(inputs.device):
            l1 = (inputs.float() - recons.float()).abs()
            rec = l1 + self.perceptual_weight * p_loss.view(-1, 1, 1, 1)
            nll = nll_learned_logvar(rec, self.logvar.float())
            kl = posterior.kl().mean()
            loss = nll + self.kl_weight * kl
            g_loss, d_weight = self._gan_term(nll, logits_fake, last_layer)
            if active:
                loss = loss + d_weight * g_loss
        logs = {
            "loss": loss,
            "l1": l1.mean(),
            "perceptual": p_loss.mean(),
            "rec": rec.mean(),
            "nll": nll,
            "kl": kl,
            "g_loss": g_loss,
            "d_weight": d_weight,
            "disc_factor": float(active),
            "logvar": self.logvar,
        }
        return loss, _detached_logs(logs, inputs.device)

    def _gan_term(self, nll: Tensor, logits_fake: Tensor | None, last_layer: Tensor) -> tuple[Tensor, Tensor]:
        """(G = -mean(D(x_hat)), disc_weight * adaptive weight); zeros when the GAN is off.

        Without a graph (validation under no_grad) the adaptive weight cannot be taken; it is 0 then, as LDM.
        """
        zero = nll.new_zeros(())
        if logits_fake is None:
            return zero, zero
        g_loss = -logits_fake.float().mean()
        if not (torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad):
            return g_loss, zero
        return g_loss, self.disc_weight * adaptive_weight(nll, g_loss, last_layer, self.adaptive_weight_max)

    def discriminator_loss(
        self, inputs: Tensor, recons: Tensor, global_step: int, discriminator: nn.Module
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator objective, disc_factor * d_loss(D(x), D(x_hat)), and its logs.

        `recons` is detached here, so this loss never backpropagates into the autoencoder.

        Returns:
            (scalar float32 loss, {"d_loss", "logits_real", "logits_fake", "disc_factor"}).
        """
        logits_real = discriminator(inputs.detach())
        logits_fake = discriminator(recons.detach())
        disc_factor = float(self.discriminator_active(global_step))
        with autocast_off(inputs.device):
            real, fake = logits_real.float(), logits_fake.float()
            loss = disc_factor * DISC_LOSSES[self.disc_loss](real, fake)
        logs = {
            "d_loss": loss,
            "logits_real": real.mean(),
            "logits_fake": fake.mean(),
            "disc_factor": disc_factor,
        }
        return loss, _detached_logs(logs, inputs.device)
