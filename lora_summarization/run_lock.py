"""One run per output folder: a lock file holding the PID and host of the stage that writes there.

    with output_dir_lock("fine_tuned_model", "train.py"):
        ...  # train and save

Under torchrun only the main process takes the lock; the others write nothing of their own.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .cli import UsageError

LOCK_FILE = ".run.lock"


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate job, or a process started without one."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


@contextmanager
def output_dir_lock(output_dir: str | Path, script: str) -> Iterator[None]:
    """Hold `output_dir`'s lock while the block runs; refuse a folder locked by a live process."""
    if not is_main_process():
        yield
        return
    lock = Path(output_dir) / LOCK_FILE
    acquire(lock, script)
    try:
        yield
    finally:
        release(lock)


def this_process(script: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "script": script}


def acquire(lock: Path, script: str) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    mine.write_text(json.dumps(this_process(script)), encoding="utf-8")
    try:
        # A hard link appears whole or not at all, and fails if the lock exists: no reader sees half a lock.
        while not link_if_absent(mine, lock):
            holder = read_holder(lock)
            refuse_if_running(lock, holder)
            print(f"warning: taking over {lock} from {describe(holder)}, which is no longer running", file=sys.stderr)
            lock.unlink(missing_ok=True)
    finally:
        mine.unlink()


def link_if_absent(source: Path, lock: Path) -> bool:
    try:
        os.link(source, lock)
    except FileExistsError:
        return False
    return True


def read_holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # vanished or unreadable: nobody can be shown to hold it


def describe(holder: dict) -> str:
    return f"{holder.get('script', 'a run')} (PID {holder.get('pid', '?')} on host {holder.get('host', '?')})"


def refuse_if_running(lock: Path, holder: dict) -> None:
    folder = lock.parent
    if holder.get("host", socket.gethostname()) != socket.gethostname():
        raise UsageError(
            f"--output-dir {folder} is used by {describe(holder)}, which this host cannot check; "
            f"wait for it or pass another --output-dir (delete {lock} if that run has ended)"
        )
    if "pid" in holder and process_exists(holder["pid"]):
        raise UsageError(
            f"--output-dir {folder} is used by a running {describe(holder)}; wait for it or pass another --output-dir"
        )


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def release(lock: Path) -> None:
    if read_holder(lock).get("pid") == os.getpid():
        lock.unlink()
