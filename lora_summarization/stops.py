"""How a training run that stops early says so: a NaN loss, a signal (with the command that resumes it), and the
flags to try after an out-of-memory."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

from . import modeling
from .cli import EXIT_CHECK_FAILED


def resume_command(world_size: int) -> str:
    """The command that continues this run: its own flags plus --resume."""
    launcher = "python" if world_size == 1 else f"torchrun --nproc_per_node {world_size}"
    starting_afresh = ("--resume", "--overwrite-output-dir", "--overwrite_output_dir")
    flags = [arg for arg in sys.argv[1:] if arg not in starting_afresh]
    return " ".join([launcher, "train.py", *map(shlex.quote, flags), "--resume"])


def report_stop_by_signal(guard, world_size: int) -> None:
    name = signal.Signals(guard.signal_number).name
    print(
        f"{name}: stopped at optimizer step {guard.signal_step}; checkpoint saved; "
        f"continue with: {resume_command(world_size)}",
        file=sys.stderr,
    )


def memory_remedies(gradient_checkpointing: bool, precision: str, batch_size: int, grad_accum: int) -> list[str]:
    """What to try after an out-of-memory, in order, leaving out what the run already does."""
    remedies = [] if gradient_checkpointing else ["--gradient-checkpointing"]
    if precision != "bf16" and modeling.bf16_supported():
        remedies.append("--precision bf16")
    if batch_size > 1:
        smaller = batch_size // 2 if batch_size % 2 == 0 else 1
        remedies.append(f"--batch-size {smaller} --grad-accum {grad_accum * batch_size // smaller}")
    return remedies


def report_divergence(checkpoints: Path, step: int) -> None:
    print(
        f"error: the loss became NaN or infinite at optimizer step {step}; training stopped and the last good "
        f"checkpoint (if any) is in {checkpoints}. Lower --learning-rate or use --precision fp32.",
        file=sys.stderr,
    )


def early_stop_exit_code(trainer, guard, world_size: int, checkpoints: Path) -> int | None:
    """The exit code of a run that stopped before its last step (NaN loss, SIGTERM/SIGINT); None if it finished.

    Every process stops at the same step; rank 0 says why.
    """
    if guard.non_finite_step is not None:
        if trainer.is_world_process_zero():
            report_divergence(checkpoints, guard.non_finite_step)
        return EXIT_CHECK_FAILED
    if guard.signal_number is None:
        return None
    if trainer.is_world_process_zero():
        report_stop_by_signal(guard, world_size)
    return 128 + guard.signal_number
