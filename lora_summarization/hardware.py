"""What a run costs on its hardware: peak memory, and model FLOPs utilisation against the GPU's dense peak.

Shared by train.py (its training summary) and benchmarks/train_throughput.py, so both use one table.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# Dense peak TFLOPS of the GPUs the recipe is run on: fp32 on CUDA cores, tf32 and bf16 on tensor cores.
# Matched as substrings of torch.cuda.get_device_name, first match wins: "H100 PCIe" before "H100".
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "A6000": {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The listed dense peak of a GPU (by its CUDA name) at a precision; None for a GPU not in the table."""
    return next((peaks[precision] for gpu, peaks in PEAK_TFLOPS.items() if gpu in device_name), None)


def model_flops_utilization(parameters: int, tokens_per_s: float, peak: float, devices: int = 1) -> float:
    """Share of `devices` GPUs' peak (TFLOPS each) that a LoRA step uses: 4 x parameters x tokens/s.

    Forward 2 and backward 2 FLOPs per parameter and token; the frozen weights get no weight gradient.
    """
    return 4 * parameters * tokens_per_s / (peak * 1e12 * devices)


def proc_status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max_memory_allocated on a GPU; on the CPU the process's peak resident set (VmHWM)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else proc_status_mib("VmHWM")


def peak_memory_measure(device: torch.device) -> str:
    return "CUDA max_memory_allocated" if device.type == "cuda" else "peak resident set (VmHWM)"
