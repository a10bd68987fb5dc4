"""`python -m pipeline.export run_dir=runs/<experiment>/<run> [out=<dir>]`: a trained run -> a diffusers directory.

See `lightning_modules/interop/export.py` for the layout; load it with
`GuidedLDMPipeline.from_pretrained(out, local_files_only=True)` (README, "Export to diffusers").
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lightning_modules.interop.convert import UnsupportedByDiffusers
from lightning_modules.interop.export import export_diffusers
from pipeline.config_checks import ConfigError


def export(cfg: DictConfig):
    if cfg.weights not in ("ema", "raw"):
        raise ConfigError(f"weights={cfg.weights!r}: expected ema or raw")
    try:
        out = export_diffusers(
            cfg.checkpoint,
            cfg.out,
            autoencoder_checkpoint=cfg.autoencoder_checkpoint,
            scheduler=cfg.scheduler,
            spacing=cfg.spacing,
            weights=cfg.weights,
            force=cfg.force,
        )
    except (UnsupportedByDiffusers, FileExistsError, FileNotFoundError, ImportError) as err:
        raise ConfigError(str(err)) from err
    print(f"[export] {cfg.checkpoint} -> {out}")
    return out


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except ConfigError as e:  # the user's mistake, said without a traceback; nothing was written
        raise SystemExit(f"[export] {e}") from None


if __name__ == "__main__":
    main()
