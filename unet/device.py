"""Which device and which precision: CUDA, then Apple's MPS, then the CPU; bf16 where the hardware has it."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())


def pick_device(name: str = "auto") -> torch.device:
    """A device by name; auto takes CUDA, then Apple's MPS, then the CPU. ValueError for one not here."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: no MPS device on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device and a --precision choice; None means plain fp32.

    auto: bf16 on CUDA and on a CPU with bf16 units. A GPU older than Ampere only emulates bf16,
    slowly, so it gets fp16 (which training pairs with loss scaling).
    """
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast to `autocast_dtype`, or plain fp32."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What `autocast_for` runs: fp32, bf16 or fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device, precision)]


def machine_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count and torch version: for the record of a run."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
