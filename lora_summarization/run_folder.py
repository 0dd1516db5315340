"""What a run leaves in its output folder: finding a previous run's outputs, clearing them, and publishing
the final outputs so that a folder never looks like a finished adapter before it is one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .modeling import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from .run_lock import LOCK_FILE

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
