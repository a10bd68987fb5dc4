"""`python -m pipeline.prepare data=fashion_mnist`: sources -> WebDataset shards + manifest.json.

`data=imagefolder` streams a folder of class folders into shards (`num_workers=N` writer processes,
resumable); `data=webdataset` takes existing shards as they are and writes only the manifest.
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datamodules.shards import prepare_dataset, scan_shards

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> dict:
    data = cfg.data
    # Resolve against the whole config: `data.source` interpolates `${data.channels}` etc., which a copy
    # of the node in a fresh config could not resolve (the InterpolationKeyError of issue 14).
    resolved = OmegaConf.to_container(data, resolve=True)
    config = {
        "source": resolved["source"],
        "val_size": resolved["val_size"],
        "test_size": resolved["test_size"],
        "limit": cfg.limit,
        "seed": resolved["seed"],
        "shard_size": resolved["shard_size"],
        "caption_templates": resolved["caption_templates"],
    }
    if data.get("prepare", "write") == "scan":  # data=webdataset: existing shards, a manifest by scanning them
        manifest = scan_shards(resolved["source"]["root"], data.dir, name=data.name,
                               config={"source": resolved["source"], "val_shards": resolved["val_shards"],
                                       "test_shards": resolved["test_shards"]},
                               val_shards=data.val_shards, test_shards=data.test_shards, force=cfg.force,
                               progress=cfg.progress)  # fmt: skip
        return _report(manifest, data)
    manifest = prepare_dataset(
        instantiate(data.source),
        data.dir,
        name=data.name,
        config=config,
        val_size=data.val_size,
        test_size=data.test_size,
        limit=cfg.limit,
        seed=data.seed,
        shard_size=data.shard_size,
        caption_templates=list(data.caption_templates),
        force=cfg.force,
        progress=cfg.progress,
        num_workers=cfg.num_workers,
    )
    return _report(manifest, data)


def _report(manifest: dict, data: DictConfig) -> dict:
    counts = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    log.info("dataset %s at %s: %s", data.name, data.dir, counts)
    print(f"[prepare] {data.name}: {counts} -> {data.dir}")
    return manifest


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    main()
