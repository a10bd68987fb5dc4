"""What machine a figure was measured on: the CPU's model name, its logical CPUs and the SIMD flags that
decide which kernels run (AVX2 vs AVX512, native bf16 via AVX512-BF16 or AMX). One description for every
bench script, time-budget record and report that names its machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
# Environment variables that cap the kernels PyTorch and oneDNN pick below what the flags allow (an AVX2-only
# machine's kernels reproduced on an AVX512 one): a figure measured under them names them.
ONEDNN_ISA_CAP = "ONEDNN_MAX_CPU_ISA"
KERNEL_CAPS = ("ATEN_CPU_CAPABILITY", ONEDNN_ISA_CAP)


def kernel_caps(environ: dict | None = None) -> dict[str, str]:
    """The KERNEL_CAPS set (non-blank) in the environment, e.g. {"ONEDNN_MAX_CPU_ISA": "AVX2"}."""
    env = os.environ if environ is None else environ
    return {k: v for k in KERNEL_CAPS if (v := str(env.get(k, "")).strip())}


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{"model": str, "logical_cpus": int, "simd": [flags of SIMD_FLAGS present]} from /proc/cpuinfo (or the
    given text); on systems without it, the platform's processor name and no flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {
        "model": model or platform.processor() or platform.machine() or "unknown CPU",
        "logical_cpus": os.cpu_count() or 1,
        "simd": [f for f in SIMD_FLAGS if f in flags],
    }


def usable_cpus(environ: dict | None = None) -> int:
    """The CPUs this process may run on: its affinity mask (`taskset`, a container's cpuset, Slurm's CPU
    binding), capped by `SLURM_CPUS_PER_TASK` when set (a Slurm allocation that does not bind CPUs still
    grants only that many). What `num_workers=auto` means."""
    env = os.environ if environ is None else environ
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    slurm = str(env.get("SLURM_CPUS_PER_TASK", "")).strip()
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def cpu_description(cpuinfo: str | None = None, environ: dict | None = None) -> str:
    """One line, e.g. "AMD EPYC (2 CPUs; sse4_2 avx avx2 fma avx512f avx512_bf16)", and the kernel caps
    set in the environment, e.g. "...; kernels capped: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"."""
    info = cpu_info(cpuinfo)
    caps = " ".join(f"{k}={v}" for k, v in kernel_caps(environ).items())
    flags = " ".join(info["simd"]) or "no SIMD flags read"
    return f"{info['model']} ({info['logical_cpus']} CPUs; {flags}{'; kernels capped: ' + caps if caps else ''})"
