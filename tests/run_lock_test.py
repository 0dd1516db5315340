"""The output folder's lock against the real ways a holder disappears: PID reuse, containers, a stopped heartbeat."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import script_env

from lora_summarization import run_lock


def write_lock(folder, holder: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run_lock.LOCK_FILE).write_text(json.dumps(holder))


def test_a_lock_naming_a_live_pid_with_another_start_time_is_taken_over(tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])  # alive, but not the process that took the lock
    try:
        taker = {**run_lock.this_process("train.py"), "pid": sleeper.pid}
        write_lock(tmp_path, {**taker, "start_time": run_lock.start_time(sleeper.pid)})
        with pytest.raises(run_lock.UsageError, match=f"used by a running train.py \\(PID {sleeper.pid} "):
            run_lock.acquire(tmp_path / run_lock.LOCK_FILE, "unit_test.py")

        write_lock(tmp_path, {**taker, "start_time": run_lock.start_time(sleeper.pid) - 1})
        with run_lock.output_dir_lock(tmp_path, "unit_test.py"):
            holder = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
            assert holder["pid"] == os.getpid() and holder["script"] == "unit_test.py"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"taking over {tmp_path / run_lock.LOCK_FILE} from train.py (PID {sleeper.pid}" in capsys.readouterr().err


def test_the_holder_refreshes_the_lock_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = tmp_path / run_lock.LOCK_FILE
    with run_lock.output_dir_lock(tmp_path, "train.py"):
        os.utime(lock, (time.time() - 3600,) * 2)
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5


HOLD = """
import sys, time
from lora_summarization.run_lock import output_dir_lock
with output_dir_lock(sys.argv[1], "holder.py"):
    print("locked", flush=True)
    time.sleep(600)
"""
TAKE = """
import sys
from lora_summarization.cli import UsageError
from lora_summarization.run_lock import output_dir_lock
try:
    with output_dir_lock(sys.argv[1], "taker.py"):
        print("taken")
except UsageError as error:
    sys.exit(f"error: {error}")
"""


def in_container(hostname: str, code: str, folder) -> list[str]:
    """A command running `code` in its own PID namespace (PIDs from 1) under its own hostname, as Docker does."""
    unshare = ["unshare", "--pid", "--uts", "--fork", "--mount-proc", "--kill-child"]
    return [*unshare, "sh", "-c", 'hostname "$0" && exec "$@"', hostname, sys.executable, "-c", code, str(folder)]


def skip_unless_containers_can_be_made() -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    probe = subprocess.run(in_container("probe", "pass", "."), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make PID and UTS namespaces here (needs root): {probe.stderr.strip()}")


def run_in_container(hostname: str, code: str, folder) -> subprocess.CompletedProcess:
    return subprocess.run(in_container(hostname, code, folder), env=script_env(), capture_output=True, text=True)


def test_a_holder_in_another_container_is_refused_while_alive_and_taken_over_once_its_heartbeat_is_stale(tmp_path):
    skip_unless_containers_can_be_made()
    lock = tmp_path / run_lock.LOCK_FILE
    command = in_container("box-a", HOLD, tmp_path)
    holder = subprocess.Popen(command, env=script_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert json.loads(lock.read_text())["host"] == "box-a"
        alive = run_in_container("box-b", TAKE, tmp_path)
    finally:
        holder.kill()  # unshare --kill-child takes the holder with it, leaving its lock behind
        holder.wait()
    assert alive.returncode == 1 and "cannot be checked from here" in alive.stderr

    dead = run_in_container("box-c", TAKE, tmp_path)  # the dead holder's heartbeat is still fresh
    assert dead.returncode == 1
    (line,) = dead.stderr.splitlines()
    seconds_left = int(line.split(" s at the earliest")[0].rsplit(" ", 1)[1])
    assert 0 < seconds_left <= run_lock.STALE_AFTER_SECONDS and f"delete {lock}" in line

    stale = time.time() - run_lock.STALE_AFTER_SECONDS - 1
    os.utime(lock, (stale, stale))
    taken = run_in_container("box-c", TAKE, tmp_path)
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout == "taken\n"
    assert "taking over" in taken.stderr and "holder.py (PID 1 on host box-a)" in taken.stderr
    assert not lock.exists()
