"""What a training run reports when it ends: first and last losses, the checkpoint --keep-best kept, throughput,
peak memory and MFU, for training_summary.json and the closing line."""

from __future__ import annotations

import math
import time

import torch

from . import hardware


def first_and_last(log_history: list[dict], key: str, name: str) -> dict:
    """{"first_<name>": ..., "last_<name>": ...} of a logged value (None when never logged)."""
    values = [entry[key] for entry in log_history if key in entry] or [None]
    return {f"first_{name}": values[0], f"last_{name}": values[-1]}


def train_loss_first_and_last(log_history: list[dict]) -> dict:
    """first_and_last of the train loss; a run shorter than --logging-steps logs none, and its last train loss is
    the Trainer's final one (`train_loss`, the mean over the steps of that run)."""
    losses = first_and_last(log_history, "loss", "train_loss")
    if losses["last_train_loss"] is None:
        losses["last_train_loss"] = first_and_last(log_history, "train_loss", "train_loss")["last_train_loss"]
    return losses


def kept_best(state) -> dict | None:
    """With --keep-best: the checkpoint the adapter is, its validation content loss and the last evaluation's."""
    if state.best_model_checkpoint is None:
        return None
    evaluations = [(entry["step"], entry.get("eval_content_loss")) for entry in state.log_history]
    last_step, last_loss = [evaluation for evaluation in evaluations if evaluation[1] is not None][-1]
    return {
        "checkpoint": state.best_model_checkpoint,
        "step": state.best_global_step,
        "validation_content_loss": state.best_metric,
        "last_evaluated_step": last_step,
        "last_validation_content_loss": last_loss,
    }


def kept_best_line(state) -> str:
    best = kept_best(state)
    if best is None:
        return "--keep-best: no validation ran before the end, so the adapter is the last step's"
    return (
        f"--keep-best: the adapter is {best['checkpoint']} (step {best['step']:,}, validation content loss "
        f"{best['validation_content_loss']:.4f}; the last evaluation, at step {best['last_evaluated_step']:,}, "
        f"had {best['last_validation_content_loss']:.4f})"
    )


def model_flops_utilization(plan: dict, this_run: dict) -> float | None:
    """MFU over every process's GPU, for GPUs in hardware.PEAK_TFLOPS; None on the CPU or an unlisted GPU."""
    if plan["device"] != "cuda" or not this_run["training_step_seconds"]:
        return None
    peak = hardware.peak_tflops(torch.cuda.get_device_name(), plan["precision"])
    if peak is None:
        return None
    seconds = this_run["training_step_seconds"]
    return round(hardware.model_flops_utilization(this_run["model_flops"], seconds, peak, plan["processes"]), 4)


def cost_line(this_run: dict, mfu: float | None) -> str:
    if this_run["tokens_per_second"] is None:
        return "no optimizer step ran in this run"
    peaks = ", ".join(f"{peak:,.0f}" for peak in this_run["peak_memory_mib"])
    measure = this_run["peak_memory_measure"]
    if this_run["peak_memory_reserved_mib"] is not None:
        measure += f"; reserved {', '.join(f'{peak:,.0f}' for peak in this_run['peak_memory_reserved_mib'])} MiB"
    return (
        f"{this_run['examples_per_second']:,.2f} examples/s, {this_run['tokens_per_second']:,.0f} tokens/s "
        f"(non-padding, optimizer steps only), peak memory {peaks} MiB ({measure}), "
        f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}"
    )


def run_facts(trainer, started: float, checkpoint: str | None, overrides: list[str]) -> dict:
    """What this run (since a resume) did; every process must call it (the counts are summed over them)."""
    seen = (trainer.tokens_seen, trainer.squared_lengths_seen, trainer.lm_head_positions_seen)
    tokens, squared_lengths, lm_head_positions = trainer.accelerator.reduce(torch.stack(seen), reduction="sum").tolist()
    shape = hardware.model_shape(trainer.accelerator.unwrap_model(trainer.model))
    return {
        "tokens_trained_on": tokens,
        "model_flops": hardware.training_flops(shape, tokens, squared_lengths, lm_head_positions),
        "runtime_seconds": round(time.perf_counter() - started, 1),
        **training_cost(trainer, tokens),
        "resumed_from": checkpoint,
        "resume_overrides": overrides,
    }


def training_cost(trainer, tokens: int) -> dict:
    """Throughput over the time inside optimizer steps (start-up, evaluation, checkpoints and logging excluded:
    training.StepTimer) of `tokens` and the examples summed over processes; the peak memory of each process's
    device, and on a GPU also the peak its allocator reserved."""
    device = trainer.args.device
    examples = trainer.accelerator.reduce(torch.tensor(trainer.examples_seen, device=device), reduction="sum")
    reserved = hardware.peak_memory_reserved_mib(device)
    memory = [hardware.peak_memory_mib(device), math.nan if reserved is None else reserved]
    local = torch.tensor([[trainer.step_timer.seconds, *memory]], device=device)
    seconds, peaks, reserved_peaks = trainer.accelerator.gather(local.double()).cpu().T.tolist()
    slowest = max(seconds)
    return {
        "training_step_seconds": round(slowest, 3),
        "examples_per_second": round(int(examples) / slowest, 3) if slowest else None,
        "tokens_per_second": round(tokens / slowest, 1) if slowest else None,
        "peak_memory_mib": [round(peak, 1) for peak in peaks],
        "peak_memory_reserved_mib": None if reserved is None else [round(peak, 1) for peak in reserved_peaks],
        "peak_memory_measure": hardware.peak_memory_measure(device),
    }
