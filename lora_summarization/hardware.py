"""What a run costs on its hardware: peak memory, and model FLOPs utilisation against the GPU's dense peak.

Shared by train.py (its training summary) and benchmarks/train_throughput.py, so both use one table and one count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no 2:4 sparsity) peak TFLOPS from NVIDIA's datasheets: fp32 on CUDA cores, tf32 and bf16 on tensor cores.
# Matched as substrings of torch.cuda.get_device_name in this order, so a variant comes before its family:
# "NVIDIA H100 NVL" and "NVIDIA H100 PCIe" before the SXM's "NVIDIA H100 80GB HBM3".
PEAK_TFLOPS = {
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "A6000": {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The listed dense peak of a GPU (by its CUDA name) at a precision; None for a GPU not in the table."""
    return next((peaks[precision] for gpu, peaks in PEAK_TFLOPS.items() if gpu in device_name), None)


@dataclass(frozen=True)
class ModelShape:
    """The sizes a training step's matrix products scale with (see `training_flops`)."""

    frozen_linear_weights: int  # the decoder's projections (q, k, v, o, gate, up, down), LM head excluded
    trainable_linear_weights: int  # LoRA's A and B
    attention_width: int  # query heads x head size, summed over the layers
    lm_head_weights: int  # vocabulary x hidden size


def model_shape(model) -> ModelShape:
    """The ModelShape of a (PEFT-wrapped) causal LM: its nn.Linear weights by whether they train."""
    head = model.get_output_embeddings()
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear) and module is not head]
    config = model.config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        frozen_linear_weights=sum(m.weight.numel() for m in linears if not m.weight.requires_grad),
        trainable_linear_weights=sum(m.weight.numel() for m in linears if m.weight.requires_grad),
        attention_width=config.num_hidden_layers * config.num_attention_heads * head_size,
        lm_head_weights=head.weight.numel(),
    )


def training_flops(shape: ModelShape, tokens: int, squared_lengths: int, lm_head_positions: int) -> float:
    """Model FLOPs of training steps (forward and backward) over `tokens` non-padding tokens, in sequences whose
    lengths squared sum to `squared_lengths`, with the LM head run at `lm_head_positions` (the label positions).

    A product of an (n x k) and a (k x m) matrix costs 2nmk FLOPs, so per token:
    - a frozen linear weight: 2 forward, 2 for the gradient of its input, none for its own gradient: 4 x weights;
    - a LoRA weight (A, B): 2 forward, 2 input gradient, 2 weight gradient: 6 x weights;
    - attention, per layer and sequence of L tokens: the scores Q K^T and their weighted sum of V cost 2 L^2 d each
      forward (d = query heads x head size), twice that backward: 12 L^2 d, as dense kernels compute it;
    - the LM head (tied to the frozen embedding, whose lookup costs nothing): 4 x its weights, only where a label
      is, since response_token_losses computes it there alone.
    Not counted: elementwise work (norms, activations, softmax), the model's own one-position LM head
    (logits_to_keep=1, discarded), the first layer's q/k/v input gradients, which autograd skips because the
    embedding is frozen (~0.1% of a Qwen2.5-1.5B step), padding, --gradient-checkpointing's second forward (hardware
    FLOPs, which MFU leaves out by convention: Chowdhery et al. 2022, PaLM, appendix B), and DoRA's second product of
    each adapted projection on its dropped-out input (PEFT's --use-dora with --lora-dropout > 0: ~12% more FLOPs
    on Qwen2.5-1.5B with the default targets, so its MFU reads that much low).
    Checked against torch's FlopCounterMode on train.py's steps (tests/run_cost_test.py).
    """
    linears = (4 * shape.frozen_linear_weights + 6 * shape.trainable_linear_weights) * tokens
    attention = 12 * shape.attention_width * squared_lengths
    return linears + attention + 4 * shape.lm_head_weights * lm_head_positions


def model_flops_utilization(flops: float, seconds: float, peak: float, devices: int = 1) -> float:
    """Share of `devices` GPUs' dense peak (TFLOPS each) that `flops` of model work in `seconds` used."""
    return flops / seconds / (peak * 1e12 * devices)


def proc_status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max_memory_allocated on a GPU; on the CPU the process's peak resident set (VmHWM)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else proc_status_mib("VmHWM")


def peak_memory_reserved_mib(device: torch.device) -> float | None:
    """CUDA max_memory_reserved: what PyTorch's caching allocator held at its peak, which nvidia-smi shows and an
    out-of-memory error runs into; None on the CPU, where the resident set is the one measure."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


def peak_memory_measure(device: torch.device) -> str:
    return "CUDA max_memory_allocated" if device.type == "cuda" else "peak resident set (VmHWM)"
