"""A full disk while saving, reported as one line that names the folder, what is free and what is needed."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .cli import RunFailed


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


def folder_size(path: str | Path) -> int:
    """Bytes in the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def free_space(path: str | Path) -> int:
    existing = next(folder for folder in [Path(path), *Path(path).parents] if folder.exists())
    return shutil.disk_usage(existing).free


def human_size(num_bytes: int) -> str:
    size, unit = float(num_bytes), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{size:.1f} {unit}" if unit != "B" and size < 10 else f"{size:.0f} {unit}"


class DiskFull(RunFailed):
    """The disk holding `folder` filled up while writing `what` (about `needed` bytes); `then` says how to go on."""

    def __init__(self, folder: str | Path, what: str, needed: int, then: str):
        free = human_size(free_space(folder))
        super().__init__(
            f"the disk holding {folder} is full ({free} free, {what} needs about {human_size(needed)}); {then}"
        )
