"""bench/gpu_check.py in its CPU form, so that the one-call GPU check cannot rot between GPU loans.

`main` runs in this process (`--device cpu --tiny`): every training-step part at both sizes (the LDM-4
configs shrunk by --tiny, the demo's as configured with batches of 4), the U-Net's FLOP count and MFU
against a given peak, and the `debug=fdr` part through the real CLI (subprocesses) for the prepare step and
one stage only (the whole chain, five stages and an evaluation, takes minutes on 2 shared cores). The
stages' step builders are wrapped to check that each part's nets are freed before the next part starts
and to inject one out-of-memory error (retried at half the batch). Regional compilation is traced with the
`aot_eager` backend on a small U-Net (forward and backward equal eager's).
"""

from __future__ import annotations

import importlib.util
import math
import weakref
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_check_cpu_tiny(gpu_check, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fdr subprocesses
    earlier: list[weakref.ref] = []  # the nets of the parts run so far
    alive_at_start: dict[str, list[str]] = {}
    oom_injected: list[int] = []

    def wrap(stage, build):
        def checked(cfg, device, args, tmp, compile_on):
            name = f"{args.size_now}/{stage}"
            alive_at_start[name] = [repr(r()) for r in earlier if r() is not None]
            if name == "demo/feature_net" and int(cfg.data.batch_size) == 4:
                oom_injected.append(4)
                raise torch.OutOfMemoryError("injected by the test")
            step, batch, flops, nets = build(cfg, device, args, tmp, compile_on)
            earlier.extend(weakref.ref(n) for n in nets.values())
            return step, batch, flops, nets

        return checked

    for stage, build in list(gpu_check.STEPS.items()):
        monkeypatch.setitem(gpu_check.STEPS, stage, wrap(stage, build))
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--peak-tflops", "1.0",
                           "--fdr-stages", "feature_net_perceptual", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    result = __import__("json").loads(out.read_text())
    parts = result["parts"]
    assert code == 0, printed[-3000:]
    trains = [f"train/{size}/{stage}" for size, stage in [
        ("ldm4", "diffusion"), ("ldm4", "autoencoder"), ("ldm4", "classifier"), ("demo", "feature_net"),
        ("demo", "autoencoder"), ("demo", "diffusion"), ("demo", "classifier")]]  # fmt: skip
    assert set(parts) == {"env", "sdpa", *trains, "fdr/prepare", "fdr/feature_net_perceptual"}
    assert result["failed"] == [] and not any("error" in p or "skipped" in p for p in parts.values())
    # Each part starts after the earlier parts' nets are freed (on CUDA: allocated_mib_at_start ~ 0).
    assert len(alive_at_start) == 7 and all(v == [] for v in alive_at_start.values()), alive_at_start
    assert all(r() is None for r in earlier)
    for name in trains:
        r = parts[name]
        assert r["timed_steps"] == 1 and r["compiled"] is False and r["allocated_mib_at_start"] is None
        assert r["batch_size"] == (2 if name == "train/demo/feature_net" else 4)
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("step_ms", "images_per_s", "first_step_s")), r
        assert all(n > 0 for n in r["parameters"].values())
    # The injected out-of-memory error: the part ran again at half the batch and says so.
    assert oom_injected == [4] and parts["train/demo/feature_net"]["oom_batches"] == [4]
    for name in ("train/ldm4/diffusion", "train/demo/diffusion"):
        r = parts[name]
        assert 0 < r["model_tflop_per_step"] and 0 < r["mfu"] < 1
        assert math.isclose(r["mfu"], r["achieved_tflops"] / 1.0, rel_tol=1e-9)  # the --peak-tflops given
    assert parts["env"]["peak_tflops"] == 1.0 and parts["env"]["device"] == "cpu"
    for name in ("fdr/prepare", "fdr/feature_net_perceptual"):
        assert parts[name]["exit_code"] == 0 and parts[name]["seconds"] > 0
    assert "| train/ldm4/diffusion | 4 | False |" in printed  # the printed table


def test_regional_compile_traces_forward_and_backward(gpu_check, one_thread):
    """Regional compilation (aot_eager: dynamo + AOT autograd, no code generation) compiles each outermost
    ResBlock / SpatialTransformer in place, leaves parameter names alone, and gives eager's output and
    gradients; every distinct block shape gets its own graph (none left eager by the recompile limit)."""
    from torch._dynamo.utils import counters

    from lightning_modules.nets.unet import UNet

    kw = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1,), num_res_blocks=1,
              attention_resolutions=(1,), num_head_channels=8, context_dim=8)  # fmt: skip
    torch.manual_seed(0)
    plain, compiled = UNet(**kw), UNet(**kw)
    compiled.load_state_dict(plain.state_dict())
    names = [n for n, _ in compiled.named_parameters()]
    gpu_check.COMPILE_BACKEND = "aot_eager"
    torch._dynamo.reset()
    counters.clear()
    blocks = [m for m in compiled.modules() if isinstance(m, gpu_check.regional_block_types())]
    assert gpu_check.compile_regions(compiled, gpu_check.regional_block_types()) == len(blocks) > 4
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert [n for n, _ in compiled.named_parameters()] == names
    x, t, context = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.randn(2, 1, 8)
    grads = []
    with gpu_check.recompile_limit(gpu_check.RECOMPILE_LIMIT):
        for net in (plain, compiled):
            out = net(x, t, context)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out.detach(), [p.grad for p in net.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_regional_compile_gives_each_block_shape_a_graph(gpu_check):
    """9 ResBlocks of 9 widths: 9 graphs under RECOMPILE_LIMIT; dynamo's default limit (8) would leave the
    last block eager (the LDM-4 U-Net's 38 blocks have 20 distinct shapes)."""
    from torch import nn
    from torch._dynamo.utils import counters

    from lightning_modules.nets.blocks import ResBlock

    widths = [32 + 8 * i for i in range(10)]
    chain = nn.ModuleList(ResBlock(a, b, emb_dim=8) for a, b in zip(widths, widths[1:]))
    gpu_check.COMPILE_BACKEND = "eager"  # dynamo only: counts graphs without compiling them
    torch._dynamo.reset()
    counters.clear()
    assert gpu_check.compile_regions(chain, gpu_check.regional_block_types()) == 9
    x, emb = torch.randn(1, 32, 2, 2), torch.randn(1, 8)
    with torch.no_grad(), gpu_check.recompile_limit(gpu_check.RECOMPILE_LIMIT):
        for block in chain:
            x = block(x, emb)
    assert counters["stats"]["unique_graphs"] == 9
    torch._dynamo.reset()
