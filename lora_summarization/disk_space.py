"""A full disk while saving, reported as one line that names the folder, what is free and what is needed."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .cli import RunFailed

# How ENOSPC reads once a Rust writer (tokenizers, safetensors) has turned it into text.
DISK_FULL_MESSAGES = ("no space left on device", "os error 28")
# torch.save to a path fails in its C++ writer with "unexpected pos ...", the errno lost on the way.
TORCH_WRITER_FAILURE = "inline_container"
NO_ROOM_LEFT = 1 << 20  # bytes free below which a failed torch write is taken for a full disk


def is_disk_full(error: BaseException, folder: str | Path | None = None) -> bool:
    """Whether `error`, or an error in its chain, is ENOSPC; a torch writer's failure counts when the disk
    holding `folder` has (almost) no room left."""
    for link in exception_chain(error):
        message = str(link).lower()
        if isinstance(link, OSError) and link.errno == errno.ENOSPC:
            return True
        if any(text in message for text in DISK_FULL_MESSAGES):
            return True
        if folder is not None and TORCH_WRITER_FAILURE in message and free_space(folder) < NO_ROOM_LEFT:
            return True
    return False


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from or while handling (`__cause__`, `__context__`)."""
    pending, seen = [error], set()
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending += [link.__cause__, link.__context__]


@contextlib.contextmanager
def disk_full_reported(folder: str | Path, disk_full: Callable[[], DiskFull]) -> Iterator[None]:
    """Turn a full disk under the writes inside into `disk_full()`'s one-line error; anything else passes."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, folder):
            raise
        raise disk_full() from error


def folder_size(path: str | Path) -> int:
    """Bytes in the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def tensor_bytes(tensors) -> int:
    """What saving `tensors` (e.g. a model's parameters) writes, about."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


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
