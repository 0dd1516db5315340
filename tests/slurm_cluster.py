"""A real one-node SLURM cluster for tests: Debian's munged, slurmctld and slurmd, started as root.

Everything lives in one temporary folder: munge's key and socket, slurm.conf (used through SLURM_CONF),
state, spool, logs and pid files; the TCP ports are free ones picked at start, so pytest-xdist workers
each run their own cluster. There is no slurmdbd: `sacct` does not work, read jobs with `scontrol show job`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
PARTITION = "debug"
START_TIMEOUT = 30.0
# `scontrol show job -o` prints `Key=Value` pairs; a value may hold spaces (Reason, Command, WorkDir).
FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=(.*?)(?=\s[A-Za-z][\w/:]*=|$)")


def missing_requirement() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs jobs as root without cgroups)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return f"SLURM test cluster needs {', '.join(missing)} (tests/install_slurm.sh installs them)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def slurm_conf(root: Path, munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=test{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
MessageTimeout=10
KillWait=30
ReturnToService=2
MinJobAge=600
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={int(available_memory_mb() * 0.8)} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def parse_job_lines(text: str) -> list[dict[str, str]]:
    return [dict(FIELD.findall(line)) for line in text.splitlines() if line.strip()]


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    partition: str = PARTITION

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, *args: str) -> str:
        """Submits and returns the job id (`--parsable`)."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` records: one for a job or an array task, one per task for an array's id."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return parse_job_lines(result.stdout) if result.returncode == 0 else []

    def job(self, job_id: str) -> dict[str, str]:
        (record,) = self.jobs(job_id)
        return record

    def wait_until(
        self, job_id: str, predicate: Callable[[list[dict[str, str]]], bool], timeout: float = 30.0
    ) -> list[dict[str, str]]:
        """Polls the job's records until `predicate(records)` holds; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and predicate(records):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} after {timeout}s: {records}")
            time.sleep(0.1)

    def wait_for_states(self, job_id: str, *states: str, timeout: float = 30.0) -> list[dict[str, str]]:
        """Waits until every record of the job is in one of `states` (e.g. "COMPLETED", "FAILED")."""
        return self.wait_until(job_id, lambda records: all(r["JobState"] in states for r in records), timeout)

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)
        deadline = time.monotonic() + 60
        while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)


def wait_for(condition: Callable[[], bool], what: str, daemons: list[subprocess.Popen], logs: list[Path]) -> None:
    """Waits until `condition()` holds; raises with the daemons' log tails if one exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        exited = [daemon.args[0] for daemon in daemons if daemon.poll() is not None]
        if exited or time.monotonic() > deadline:
            tails = "\n".join(f"{log}:\n{log.read_text()[-2000:]}" for log in logs if log.exists())
            problem = f"{', '.join(exited)} exited" if exited else f"not ready after {START_TIMEOUT}s"
            raise RuntimeError(f"SLURM test cluster: waiting for {what}, {problem}\n{tails}")
        time.sleep(0.05)


def start_daemon(stack: ExitStack, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    stack.callback(stop_daemon, process)
    return process


def stop_daemon(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_munge(stack: ExitStack, root: Path, env: dict[str, str]) -> Path:
    """Starts munged with a new key on its own socket in `root`, apart from any system munged."""
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = root / "munge.socket"
    command = ["munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}"]
    command += [f"--{name}-file={root}/munged.{name}" for name in ("pid", "seed", "log")]
    daemon = start_daemon(stack, command, env, root / "munged.out")
    wait_for(socket_path.exists, "munged", [daemon], [root / "munged.log", root / "munged.out"])
    return socket_path


@contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    """Starts munged, slurmctld and slurmd in a new folder; cancels every job, stops them and removes it on exit."""
    # Under /tmp, not pytest's tmp_path: munged wants every folder above its socket searchable by all.
    with tempfile.TemporaryDirectory(prefix="slurm-") as folder, ExitStack() as stack:
        root = Path(folder)
        root.chmod(0o755)  # munged wants its socket's folder searchable by all and writable only by root
        for name in ("state", "spool"):
            (root / name).mkdir()
        (root / "plugstack.conf").write_text("")
        env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        munge_socket = start_munge(stack, root, env)
        (root / "slurm.conf").write_text(slurm_conf(root, munge_socket))
        logs = [root / "slurmctld.log", root / "slurmd.log", root / "slurmctld.out", root / "slurmd.out"]
        daemons = [start_daemon(stack, [name, "-D"], env, root / f"{name}.out") for name in ("slurmctld", "slurmd")]
        cluster = SlurmCluster(root, env)
        stack.callback(cluster.cancel_all)
        wait_for(lambda: node_state(cluster) == "idle", "node", daemons, logs)
        yield cluster


def node_state(cluster: SlurmCluster) -> str:
    return cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One real SLURM cluster per pytest process (each xdist worker has its own)."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    with running_cluster() as cluster:
        yield cluster
