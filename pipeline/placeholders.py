"""`debug=fdr` on its own: missing upstream artifacts replaced by randomly initialised ones.

A smoke test of one stage (`python -m pipeline.train stage=diffusion debug=fdr` on a fresh clone) should not
need its upstream stages trained first. Under Lightning's fast_dev_run, every upstream stage whose
`checkpoints/final.ckpt` is missing gets a placeholder: its networks built from the upstream stage's own
config (composed with this command's experiment/data/model overrides) with random weights, written by the
real writers of `lightning_modules.artifacts` to `<stage dir>/fdr_placeholders/<upstream>/checkpoints/
final.ckpt`, and `stage.upstream.<name>` pointed there. The real upstream directory is never touched and
never marked DONE; a line on stdout names every placeholder. An upstream trained on a replaced one (a
diffusion model on a replaced autoencoder) cannot match it and is replaced too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.artifacts import (
    autoencoder_artifacts,
    feature_net_artifacts,
    save_artifact,
)
from pipeline.builders import upstream_dirs

CONF = Path(__file__).resolve().parents[1] / "conf"
PLACEHOLDER_DIR = "fdr_placeholders"
# Upstream directory names in the order they are built, and which other upstreams each was trained on.
ORDER = ("feature_net_perceptual", "feature_net_eval", "autoencoder", "diffusion")
TRAINED_ON = {"diffusion": ("autoencoder",)}
# Command-line overrides that may concern an upstream stage's networks (stage/trainer/debug ones never do).
FORWARDED = ("experiment", "data", "paths", "experiment_name", "run_name", "seed", "model")


def final_checkpoint(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / "checkpoints" / "final.ckpt"


def substitute_missing_upstream(cfg: DictConfig) -> dict[str, Path]:
    """Under fast_dev_run, write a random-init placeholder for each missing upstream artifact and point
    `cfg.stage.upstream` at it. Returns {upstream name: placeholder final.ckpt}; {} otherwise."""
    if not cfg.trainer.get("fast_dev_run"):
        return {}
    upstream = upstream_dirs(cfg)
    reasons = {name: f"has no {final_checkpoint(path)}" for name, path in upstream.items()
               if not final_checkpoint(path).is_file()}  # fmt: skip
    for name, bases in TRAINED_ON.items():
        replaced = [b for b in bases if b in reasons]
        if name in upstream and name not in reasons and replaced:
            reasons[name] = f"was trained on the real {', '.join(replaced)}, which is replaced"
    missing = set(reasons)
    unknown = missing - set(ORDER)
    if unknown:
        raise ValueError(f"debug=fdr cannot build a placeholder for upstream {sorted(unknown)} (known: {list(ORDER)})")
    written: dict[str, Path] = {}
    root = Path(cfg.stage.dir) / PLACEHOLDER_DIR
    for name in [n for n in ORDER if n in missing]:
        target = root / name
        path = final_checkpoint(target)
        with torch.random.fork_rng(devices=[]):
            write_placeholder(name, upstream_config(name), path, cfg)
        print(f"[train] debug=fdr: upstream {name} {reasons[name]}; using a randomly "
              f"initialised {name} built from its config instead: {path} (smoke test only, {name} is not "
              "marked done)", flush=True)  # fmt: skip
        with open_dict(cfg):
            cfg.stage.upstream[name] = str(target)
        with open_dict(cfg):
            _redirect(cfg, str(final_checkpoint(upstream[name])), str(path))
        written[name] = path
    return written


def _redirect(node: DictConfig, old: str, new: str) -> None:
    """Point every other config value that names the upstream's final.ckpt by its own path (not through
    `stage.upstream`, e.g. model.perceptual.checkpoint_path) at the placeholder. Interpolations of whole
    nodes follow their target and are left alone."""
    for key in list(node.keys()):
        if OmegaConf.is_dict(node._get_node(key)) and not OmegaConf.is_interpolation(node, key):
            _redirect(node[key], old, new)
            continue
        try:
            value = node[key]
        except Exception:  # noqa: BLE001 - a value that does not resolve here names no checkpoint
            continue
        if isinstance(value, str) and value == old:
            node[key] = new


def write_placeholder(name: str, ucfg: DictConfig, path: Path, cfg: DictConfig) -> Path:
    """Random-init artifact of upstream `name` from its composed config `ucfg`, by the real writers."""
    torch.manual_seed(int(ucfg.stage.seed))
    if name.startswith("feature_net_"):
        return save_artifact(path, "feature_net", feature_net_artifacts(instantiate(ucfg.stage.module.net),
                                                                        str(ucfg.stage.role)))  # fmt: skip
    if name == "autoencoder":
        ae = instantiate(ucfg.stage.module.autoencoder)
        c, s = int(ucfg.data.channels), int(ucfg.data.image_size)
        art = autoencoder_artifacts(ae, 1.0, [c, s, s], ae.latent_shape(s))
        return save_artifact(path, "autoencoder", art)
    if name == "diffusion":
        # The stage module itself, on the autoencoder this stage uses (real or placeholder): its artifacts()
        # are what the diffusion stage writes into final.ckpt.
        with open_dict(ucfg):
            ucfg.stage.upstream.autoencoder = cfg.stage.upstream.autoencoder
        module = instantiate(ucfg.stage.module)
        return save_artifact(path, "diffusion", module.artifacts())
    raise ValueError(f"no placeholder for upstream {name!r}")


def upstream_config(name: str) -> DictConfig:
    """The train config of upstream stage `name` (a directory name: feature_net_<role>, autoencoder,
    diffusion), with this command's overrides that it accepts among `FORWARDED`."""
    stage = ["stage=feature_net", f"stage.role={name.removeprefix('feature_net_')}"] if name.startswith(
        "feature_net_") else [f"stage={name}"]  # fmt: skip
    forwarded = [o for o in _task_overrides() if _key(o) in FORWARDED]
    # Group choices first, as on a command line; keep each override the upstream config understands.
    ok: list[str] = []
    for o in sorted(forwarded, key=lambda o: "." in o.split("=", 1)[0]):
        try:
            _compose([*stage, *ok, o])
        except Exception:  # noqa: BLE001 - an override of this stage's networks only (e.g. model/unet)
            continue
        ok.append(o)
    return _compose([*stage, *ok])


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)
