"""Two real node ranks on this machine: `torchrun --nnodes=2 --nproc-per-node=1 --node-rank={0,1}` on localhost
(static rendezvous at 127.0.0.1), each node running the real CLI as on a cluster. The diffusion stage trains
under DDP (gloo) across the two nodes and builds its latent cache on both, then `pipeline.evaluate` runs a
CFG sweep on both. Checked: equal batch counts on every rank, each validation shard read by one rank only,
one cache (each latent shard encoded by exactly one rank), one result (rank 0 alone scores and reports).
Upstream checkpoints are the tiny random-weight ones of `tests/tiny_checkpoints.py`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pytorch_lightning.callbacks import Callback

from tests import tiny_checkpoints as tiny
from tests.conftest import REPO, cli_env, run_cli, tiny_overrides

RUN = Path("default") / "fashion_mnist"
NODES = 2
# The diffusion stage at test size: debug=limit (6 steps of 16 in epochs of 3 batches, validation after
# each), a U-Net of tiny_checkpoints' size, no sample grids.
TRAIN = ["stage=diffusion", "stage.cache_latents=true", "trainer=ddp_cpu", f"trainer.num_nodes={NODES}",
         "trainer.devices=1", "debug=limit", "callbacks=none", "model.unet.model_channels=16",
         "model.unet.channel_mult=[1,2]", "model.unet.num_res_blocks=1", "model.unet.attention_resolutions=[2]",
         "model.unet.num_head_channels=16"]  # fmt: skip
EVAL = ["num_samples=40", "batch_size=10", "sampler.num_steps=2", "grid_per_class=2", "progress=false",
        "guidance.scales=[1,3]"]  # fmt: skip


class BatchProbe(Callback):
    """Test-only callback (added with `+callbacks.probe._target_=...`): what each rank trained and validated
    on, written to `<out_dir>/rank<global rank>.json` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.train_batches = 0
        self.val_runs: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_batches += 1

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_runs.append([])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_runs[-1].extend(batch["key"])

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "world": trainer.world_size,
                  "train_batches": self.train_batches, "val_runs": self.val_runs}  # fmt: skip
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_nodes(module: str, *overrides: str, timeout: int = 600) -> list[str]:
    """Run `python -m module overrides` as node 0 and node 1 of a torchrun job; -> each node's output."""
    port = free_port()
    procs = []
    for node in range(NODES):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", module, *overrides]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} of {module} exited {proc.returncode}:\n{out[-6000:]}"
    return outputs


def shard_keys(data_dir: Path, split: str) -> dict[str, set[str]]:
    """{shard name: the sample keys in it} of a split of the prepared dataset."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    keys = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard["name"]) as tar:
            keys[shard["name"]] = {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return keys


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """A runs dir holding the upstream checkpoints: a tiny autoencoder and the scoring feature net (and, outside
    the run, a tiny diffusion checkpoint for the test that does not train one)."""
    runs = tmp_path_factory.mktemp("runs")
    ae, fingerprint = tiny.write_autoencoder(runs / RUN / "autoencoder" / "checkpoints" / "final.ckpt")
    tiny.write_feature_net(runs / RUN / "feature_net_eval" / "checkpoints" / "final.ckpt")
    tiny.write_diffusion(runs / "tiny_diffusion.ckpt", ae, fingerprint)
    return runs


def test_two_nodes_train_build_one_cache_and_evaluate_once(tiny_data, runs, tmp_path):
    run = runs / RUN
    probe = tmp_path / "probe"
    logs = on_two_nodes("pipeline.train", *TRAIN, *tiny_overrides(tiny_data, runs),
                        f"+callbacks.probe._target_={__name__}.BatchProbe", f"+callbacks.probe.out_dir={probe}")  # fmt: skip
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(NODES)]
    assert [(r["global_rank"], r["node_rank"], r["world"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]

    # equal batch counts on every rank: 6 training steps each, validation after each 3-batch epoch
    assert [r["train_batches"] for r in ranks] == [6, 6]
    assert [len(r["val_runs"]) for r in ranks] == [2, 2]
    # each validation run reads every validation sample once across the nodes, and each shard on one rank
    val = shard_keys(tiny_data / "fashion_mnist", "val")
    for i in range(2):
        seen = [r["val_runs"][i] for r in ranks]
        assert sorted(seen[0] + seen[1]) == sorted(set().union(*val.values()))
        for name, keys in val.items():
            readers = [r for r in range(NODES) if keys & set(seen[r])]
            assert len(readers) == 1, f"validation shard {name} read by ranks {readers}"

    # one cache: every latent shard encoded by exactly one rank, one manifest, no temp files left
    train_names = sorted(shard_keys(tiny_data / "fashion_mnist", "train"))
    encoded: dict[int, list[str]] = {}
    for out in logs:
        for rank, names in re.findall(r"latent cache \S+: rank (\d)/2 encoded \d+ shards \[([^\]]*)\]", out):
            encoded.setdefault(int(rank), []).extend(names.split())
    assert sorted(encoded) == [0, 1], f"latent-cache lines per rank: {encoded}"
    assert sorted(encoded[0] + encoded[1]) == train_names, encoded
    cache = run / "diffusion" / "latents"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == train_names
    assert manifest["splits"]["train"]["num_samples"] == sum(map(len, shard_keys(tiny_data / "fashion_mnist",
                                                                                 "train").values()))  # fmt: skip
    assert not list(cache.glob(".*.tmp"))
    done = json.loads((run / "diffusion" / "DONE").read_text())
    assert done["global_step"] == 6 and "val/loss" in done["metrics"]
    assert sum("[train] diffusion: done" in out for out in logs) == 1  # rank 0 alone marks the stage done

    # the evaluation sweep on the two nodes: rank 1 samples its half, rank 0 merges, scores and reports once
    outs = on_two_nodes("pipeline.evaluate", *tiny_overrides(tiny_data, runs), *EVAL)
    assert "cfg_s3: sampled+scored" in outs[0] and "report: " in outs[0]
    assert "cfg_s3: sampled" in outs[1] and "report: " not in outs[1]
    sweep = run / "eval" / "cfg"
    rows = json.loads((sweep / "results.json").read_text())
    assert [r["setting"] for r in rows] == ["cfg_s1", "cfg_s3"] and all(r["num_samples"] == 40 for r in rows)
    for name in ("cfg_s1", "cfg_s3"):
        with np.load(sweep / name / "samples.npz") as f:
            assert f["arr_0"].shape == (40, 32, 32, 1) and f["arr_1"].tolist() == [i % 10 for i in range(40)]
    assert not list(sweep.rglob("parts")) and not list(sweep.rglob("*.tmp"))


def test_evaluate_refuses_a_rank_it_cannot_tell(tiny_data, runs, monkeypatch):
    """Lightning's multi-node variables without RANK (NODE_RANK=1, WORLD_SIZE=2, one process per node) give no
    exact rank: the sweep would draw another rank's batches (rank 0 then waits for ones nobody draws)."""
    for var in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    proc = run_cli("pipeline.evaluate", *tiny_overrides(tiny_data, runs), *EVAL, "sweep_name=unknown_rank",
                   f"checkpoints.diffusion={runs / 'tiny_diffusion.ckpt'}", check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "cannot tell this process's rank from {'NODE_RANK': '1', 'WORLD_SIZE': '2'}" in out, out[-3000:]
    assert not list((runs / RUN / "eval" / "unknown_rank").rglob("*.npz"))  # refused before sampling
