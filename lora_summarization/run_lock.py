"""One run per output folder: a lock file naming the process of the stage that writes there.

    with output_dir_lock("fine_tuned_model", "train.py"):
        ...  # train and save

Under torchrun only the main process takes the lock and checks the folder; the others wait for its outcome
(`main_process_decides`) and write nothing of their own.

Is the holder of an existing lock still running? Containers restart PIDs at 1 and get a new hostname, so the lock
records, beside the PID and host, the holder's start time (field 22 of /proc/<pid>/stat), the kernel's boot id and
the holder's PID namespace:
- same boot id and PID namespace: the holder runs if its PID exists with the recorded start time;
- another boot id on the same host: the machine has rebooted since, so the holder has ended;
- otherwise (another container on this machine, or another host) its process cannot be seen. The holder refreshes
  the lock file's modification time every HEARTBEAT_SECONDS, and a lock not refreshed for STALE_AFTER_SECONDS
  counts as ended.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from .cli import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError

LOCK_FILE = ".run.lock"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 5 * 60  # ten missed heartbeats: a holder slowed by a busy disk is not taken over

T = TypeVar("T")


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate job, or a process started without one."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def main_process_decides(decide: Callable[[], T]) -> T | None:
    """Run `decide` on the main process alone and hand its result to every process of the job.

    If it raises, every process ends: the main process with that error (one line for a UsageError), the others
    silently with the same exit code, so a refusal is said once.
    """
    import torch.distributed  # here, not at the top: the lock alone should not cost the seconds torch takes to load

    if not torch.distributed.is_initialized():
        return decide() if is_main_process() else None
    error, outcome = None, [None]
    if is_main_process():
        try:
            outcome = [(decide(), None)]
        except Exception as failure:
            error = failure
            # torchrun sends SIGTERM to the workers still running once one exits; the main process is ending anyway,
            # with the exit code and the line that say why, so it lets that signal pass.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            outcome = [(None, EXIT_USAGE if isinstance(failure, UsageError) else EXIT_CHECK_FAILED)]
    torch.distributed.broadcast_object_list(outcome, src=0)
    result, exit_code = outcome[0]
    if exit_code is None:
        return result
    torch.distributed.destroy_process_group()  # all leave together: gloo aborts a process left serving the others
    if error is not None:
        raise error
    raise SystemExit(exit_code)


@contextmanager
def output_dir_lock(output_dir: str | Path, script: str) -> Iterator[None]:
    """Hold `output_dir`'s lock while the block runs; refuse a folder locked by a live process."""
    lock = Path(output_dir) / LOCK_FILE
    main_process_decides(lambda: acquire(lock, script))
    if not is_main_process():
        yield
        return
    try:
        with heartbeat(lock):
            yield
    finally:
        release(lock)


@contextmanager
def heartbeat(lock: Path) -> Iterator[None]:
    """Refresh the lock's modification time while the block runs, for checkers that cannot see this process."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with suppress(OSError):
                os.utime(lock)

    threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def this_process(script: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "script": script,
        "start_time": start_time(os.getpid()),
        "boot_id": boot_id(),
        "pid_namespace": pid_namespace(),
    }


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # after "pid (name)", which may hold spaces, fields 3, 4, ...


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


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
    if holder.get("boot_id") == boot_id() and holder.get("pid_namespace") == pid_namespace():
        if "pid" in holder and same_process_running(holder["pid"], holder.get("start_time")):
            raise UsageError(
                f"--output-dir {folder} is used by a running {describe(holder)}; "
                "wait for it or pass another --output-dir"
            )
        return
    if holder.get("boot_id") and holder.get("host") == socket.gethostname():
        return  # rebooted since the lock was taken
    seconds_left = seconds_until_stale(lock)
    if seconds_left > 0:
        raise UsageError(
            f"--output-dir {folder} is used by {describe(holder)}, which cannot be checked from here (another "
            f"container or host); it counts as ended if its heartbeat stops, in {seconds_left:.0f} s at the "
            f"earliest; wait for it or pass another --output-dir (delete {lock} if that run has ended)"
        )


def live_holder(folder: str | Path) -> dict | None:
    """The holder of `folder`'s lock while it runs (as `acquire` would judge it), else None."""
    lock = Path(folder) / LOCK_FILE
    if not lock.exists():
        return None
    holder = read_holder(lock)
    try:
        refuse_if_running(lock, holder)
    except UsageError:
        return holder
    return None


def seconds_until_stale(lock: Path) -> float:
    try:
        refreshed = lock.stat().st_mtime
    except FileNotFoundError:
        return 0.0  # released meanwhile
    return STALE_AFTER_SECONDS - (time.time() - refreshed)


def same_process_running(pid: int, recorded_start_time: int | None) -> bool:
    """`pid` exists and is the process that took the lock, not a later one given the same PID."""
    return process_exists(pid) and start_time(pid) == recorded_start_time


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
