"""OmegaConf resolvers used in conf/ (registered when `pipeline` is imported, before any config resolves).

`${auto_precision:<accelerator>}`: "bf16-mixed" where the accelerator computes bf16 natively, else "32-true".
  - CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer).
  - x86 CPU: AVX512-BF16 or AMX (oneDNN then runs bf16 convolutions natively; without them it emulates bf16
    and is slower than float32; so also when ONEDNN_MAX_CPU_ISA caps oneDNN below AVX512_CORE_BF16). Arm CPU: oneDNN's own check (`_is_mkldnn_bf16_supported`, the BF16 ISA).
  The value is resolved before the stage's config hash is taken, so a stage trained in one precision is never
  resumed in the other: it trains again, as for any other config change. `trainer.precision=32-true` on the
  command line always wins.
`${fused_adam:<accelerator>,<precision>}`: the stages' Adam(W) `fused` flag (True on CPU, else PyTorch's default).
`${scaled_steps:<steps>,${step_scale}}`: round(steps * step_scale), at least 1 (pipeline/time_budget.py).
"""

from __future__ import annotations

import platform

import torch
from omegaconf import OmegaConf

from core.machine import ONEDNN_ISA_CAP, kernel_caps
from lightning_modules.generation import AUTOCAST_DTYPES

BF16, FP32 = "bf16-mixed", "32-true"


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which it runs bf16 natively; a lower cap (e.g. AVX2, to
# reproduce an AVX2-only machine's kernels: bench/cpu_steps.py) makes bf16 emulated, hence float32 here.
ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL"}  # fmt: skip


def cpu_has_native_bf16() -> bool:
    cap = kernel_caps().get(ONEDNN_ISA_CAP, "").upper()
    if cap and cap not in ONEDNN_BF16_ISAS:
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(accelerator: str = "cpu") -> str:
    """The Lightning `precision` for `accelerator` ("cpu", "gpu"/"cuda" or "auto"): bf16 autocast where native."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return BF16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else FP32
    if accelerator in ("cpu", "auto"):
        return BF16 if cpu_has_native_bf16() else FP32
    return FP32  # mps, tpu, ...: what the Trainer does by default


SAMPLING_DTYPES = ("auto", *AUTOCAST_DTYPES)  # auto, then the generator's own


def sampling_dtype(requested: str, device: str | torch.device = "cpu") -> str:
    """`sampling_dtype` of an evaluation with "auto" resolved for `device`: "bf16" autocast where it computes
    bf16 natively (what `auto_precision` trains with), else "fp32"; the other values as given. Resolved before
    the sampler's fingerprint is taken, so a setting's hash records the dtype its samples were drawn in."""
    if requested not in SAMPLING_DTYPES:
        raise ValueError(f"sampling_dtype={requested!r}: expected one of {list(SAMPLING_DTYPES)}")
    if requested != "auto":
        return requested
    accelerator = "cuda" if str(device).startswith("cuda") else "cpu"
    return "bf16" if auto_precision(accelerator) == BF16 else "fp32"


def fused_adam(accelerator: str = "cpu", precision: str = "32-true") -> bool | None:
    """Adam(W)'s `fused` for the stages' optimisers: True on CPU (one fused kernel instead of PyTorch's CPU
    default, a per-parameter loop of small ops: 4 vs 20 ms per step for the demo's 2.6M-parameter U-Net on
    2 cores), None elsewhere (PyTorch's own default, foreach on CUDA). Never under fp16 AMP, whose gradient
    scaler Lightning cannot combine with an optimiser that unscales inside its step."""
    accelerator, precision = str(accelerator).lower(), str(precision)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return True if on_cpu and not precision.startswith("16") else None


def register() -> None:
    if not OmegaConf.has_resolver("fused_adam"):
        OmegaConf.register_new_resolver("fused_adam", fused_adam)
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    if not OmegaConf.has_resolver("scaled_steps"):
        from pipeline.time_budget import scaled_steps

        OmegaConf.register_new_resolver("scaled_steps", scaled_steps)
