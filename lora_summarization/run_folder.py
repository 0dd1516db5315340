"""What a run leaves in its output folder: finding a previous run's outputs, refusing or clearing them, finding the
checkpoint to resume, and publishing the final outputs so that a folder never looks like a finished adapter
before it is one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .cli import UsageError
from .modeling import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from .run_lock import LOCK_FILE, is_main_process
from .training import checkpoint_step, clear_incomplete_checkpoints, latest_checkpoint, latest_loadable_checkpoint

# What makes a folder a previous run's: its checkpoints, its logs (appended to by a new run) or its adapter.
RUN_OUTPUTS = ("checkpoints", "train_log.jsonl", "runs", ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
FINAL_STAGING = ".final-staging"


def previous_run_outputs(folder: str | Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (Path(folder) / name).exists()]


def remove_entries(folder: str | Path, names: Iterable[str]) -> None:
    for name in names:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def clear_folder(folder: str | Path) -> None:
    """Delete everything in `folder` except the lock of the run that is clearing it."""
    remove_entries(folder, [path.name for path in Path(folder).iterdir() if path.name != LOCK_FILE])


def fresh_staging_folder(folder: str | Path) -> Path:
    """An empty `.final-staging/` inside `folder` (a leftover of an interrupted save is discarded)."""
    staging = Path(folder) / FINAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_staged(staging: Path, folder: str | Path) -> None:
    """Move every file of `staging` into `folder`, adapter_config.json last, and remove `staging`.

    evaluate.py takes a folder with adapter_config.json and the weights for a finished adapter, so the old
    config goes first and the new one last: a crash in between leaves a folder that is not an adapter.
    """
    folder = Path(folder)
    (folder / ADAPTER_CONFIG_FILE).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == ADAPTER_CONFIG_FILE):
        os.replace(path, folder / path.name)
    staging.rmdir()


def checkpoints_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def refuse_previous_run(output_dir: str | Path, resume: bool, overwrite_output_dir: bool) -> None:
    """A fresh run must not continue or append to an old one: refuse its folder unless asked to clear it."""
    output_dir = Path(output_dir)
    found = previous_run_outputs(output_dir)
    if found and not (resume or overwrite_output_dir):
        raise UsageError(
            f"--output-dir {output_dir} holds a previous run ({', '.join(found)}); "
            "pass --resume to continue it or --overwrite-output-dir to delete it first"
        )


def clear_previous_run(output_dir: str | Path, start_afresh: bool, dry_run: bool) -> None:
    """Clear a run that is started afresh (--overwrite-output-dir, or --resume with no checkpoint yet) once the
    model and data have loaded: a typo in a flag must not cost the old run."""
    output_dir = Path(output_dir)
    if start_afresh and not dry_run and (found := previous_run_outputs(output_dir)):
        print(f"deleting the previous run's {', '.join(found)} in {output_dir}")
        clear_folder(output_dir)


def check_output_dir(output_dir: str | Path, resume: bool, overwrite_output_dir: bool) -> str | None:
    refuse_previous_run(output_dir, resume, overwrite_output_dir)
    return resume_checkpoint(output_dir, resume)


def resume_checkpoint(output_dir: str | Path, resume: bool) -> str | None:
    """The checkpoint --resume continues; None to start afresh, which --resume does when the run has none yet
    (killed before its first checkpoint, or never started), so that a requeued job can repeat one command."""
    checkpoint_dir = checkpoints_folder(output_dir)
    clear_incomplete_checkpoints(checkpoint_dir)
    if not resume:
        return None
    if latest_checkpoint(checkpoint_dir) is None:
        return start_afresh_on_resume(output_dir)
    checkpoint = latest_loadable_checkpoint(checkpoint_dir, set_aside=is_main_process())
    if checkpoint is None:
        raise UsageError(
            f"--resume: no checkpoint in {checkpoint_dir} can be loaded (each is set aside as broken-checkpoint-N); "
            "start afresh with --overwrite-output-dir instead of --resume"
        )
    print(f"resuming from {checkpoint}")
    return checkpoint


def start_afresh_on_resume(output_dir: str | Path) -> None:
    """--resume with no checkpoint: start afresh, unless the folder holds an adapter, which that would delete."""
    adapter = [name for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if (Path(output_dir) / name).exists()]
    if adapter:
        raise UsageError(
            f"--resume: {output_dir} holds an adapter ({', '.join(adapter)}) but no checkpoint to continue from; "
            "pass --overwrite-output-dir to train it again from the start"
        )
    print(f"--resume: no checkpoint in {checkpoints_folder(output_dir)} yet; starting afresh")


def final_outputs_saved(output_dir: str | Path, checkpoint: str, last_step: int) -> bool:
    """Whether the run already ended: its checkpoint is at the last step and the final save from it is complete
    (publish_staged moves adapter_config.json in last)."""
    output_dir = Path(output_dir)
    summary_file = output_dir / "training_summary.json"
    step = checkpoint_step(checkpoint)
    if step < last_step or not (output_dir / ADAPTER_CONFIG_FILE).exists() or not summary_file.exists():
        return False
    return json.loads(summary_file.read_text(encoding="utf-8"))["optimizer_steps"] == step
