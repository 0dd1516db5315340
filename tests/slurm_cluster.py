"""A real one-node SLURM cluster for tests: Debian's munged, slurmctld and slurmd (22.05), started as root.

The session fixture `slurm_cluster` (one cluster per pytest process: one per xdist worker) yields a SlurmCluster:
`env` (os.environ with SLURM_CONF) for sbatch/squeue/scontrol/scancel subprocesses and study scripts,
`partition`, `sbatch(*args) -> id`, `jobs(id)`/`job(id)` (`scontrol show job -o` records as dicts: JobState,
Reason, Restarts, ArrayTaskId, BatchFlag...), `state(id)`, `restarts(id)`, `wait_until(id, predicate)`,
`wait_for_states(id, *states)`, `release(id)` and `cancel(*ids)`. It skips, saying why, without root or the
binaries (tests/install_slurm.sh installs them). It starts in about 1 s and cancels every job when it stops.

Everything lives in one folder under /tmp, removed at the end: munge's key and socket, slurm.conf, state, spool,
logs, pid files. Its TCP ports are free ones picked at start. There is no slurmdbd: `sacct` does not work, read
jobs with `scontrol show job` (finished ones stay for MinJobAge, 10 minutes). The node has CPUs=nproc and
80% of the free memory; memory is not a consumable, so nproc one-CPU jobs run at once.

What slurm_cluster_test.py shows (SLURM 22.05, proctrack/linuxproc):
- A job's script starts about 1 s after sbatch (2 s for the cluster's first; SchedulerParameters'
  batch_sched_delay is 0 here, 3 s by default).
- `--array=0-3%2` with `-o out_%A_%a` runs its tasks with SLURM_ARRAY_TASK_ID and SLURM_ARRAY_JOB_ID. Each task
  has its own SLURM_JOB_ID, and the highest task's equals SLURM_ARRAY_JOB_ID, which names the WHOLE array for
  `scontrol requeue` and `scancel`: always name a task `${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}`.
- `--dependency=afterany:<array id>` waits (Reason=Dependency) for every task to end, a failed one included,
  and for the rerun of a requeued one.
- `scontrol requeue A_T` on a running task (it must be requeueable: JobRequeue=1 or --requeue; with --no-requeue
  "Requested operation is presently disabled") sends SIGTERM at once to every process of the task, the batch
  shell and its children, and SIGKILL after KillWait (30 s); the children may outlive the shell until then (a
  child that took 2 s to checkpoint after SIGTERM finished, with no trap in the shell). The task goes COMPLETING,
  then PENDING (not REQUEUE_HOLD: that is `scontrol requeuehold`) with Reason=BeginTime, BeginTime = requeue
  + 121 s (cred_expire + 1) and Restarts=1; the rerun sees SLURM_RESTART_COUNT=1 (unset in a first run).
- `scontrol update jobid=A_T StartTime=now` starts it at once, but not in the second of the requeue: slurmd then
  refuses the launch ("Job credential revoked") and the task ends FAILED. `release` waits for the next second.
- `scancel --signal=S --batch A_T` signals the batch shell only; `--full` the shell and all its children; without
  either it signals srun steps only, so nothing in a script that runs its program without srun. A signal sent
  before the script runs is lost (a job shows RUNNING slightly before): wait for a sign from the script itself.
- `--signal=B:USR1@60` (with `--time`) signals the batch shell alone before the time limit (without `B:`, srun
  steps only). SLURM checks this periodically: with --time=1 (due at once) it came 20 s after the start.
- A task requeues itself from its shell's USR1 trap: stop the program (kill -TERM, wait), then `scontrol requeue
  ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}`; it comes back as above. Use USR1, not TERM, for the time-limit
  signal: scancel and `scontrol requeue` send TERM to the shell too, and a TERM trap that requeues turns
  `scancel` into a requeue (a cancelled array came back pending).
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
KILL_TIMEOUT = 45.0  # KillWait (30 s) and some: a job that ignores SIGTERM gets SIGKILL after KillWait
ACTIVE = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD")
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


def free_ports(count: int) -> list[int]:
    """Ports free now, all different: each socket stays bound until all are picked."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def slurm_conf(root: Path, munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]
    slurmctld_port, slurmd_port = free_ports(2)
    return f"""\
ClusterName=test{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={slurmctld_port}
SlurmdPort={slurmd_port}
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


Records = Callable[[list[dict[str, str]]], bool]


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

    def state(self, job_id: str) -> str:
        """JobState of one job or array task ("A_T"): PENDING, RUNNING, COMPLETING, COMPLETED, FAILED..."""
        return self.job(job_id)["JobState"]

    def restarts(self, job_id: str) -> int:
        """How many times the job or array task was requeued (its reruns see it as SLURM_RESTART_COUNT)."""
        return int(self.job(job_id)["Restarts"])

    def release(self, job_id: str) -> None:
        """Starts a requeued job now rather than at its BeginTime (requeue time + 121 s: cred_expire + 1).

        `StartTime=now` schedules it at once, but slurmd refuses a launch in the same second as the requeue
        ("Job credential revoked") and the job FAILS; so this waits for the next second first. Call it once the
        job shows Reason=BeginTime, i.e. after the requeue.
        """
        time.sleep(1.01 - time.time() % 1)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def wait_until(self, job_id: str, predicate: Records, timeout: float = 30.0) -> list[dict[str, str]]:
        """Polls the job's records until `predicate(records)` holds; returns them."""
        records: list[dict[str, str]] = []

        def holds() -> bool:
            nonlocal records
            records = self.jobs(job_id)
            return bool(records) and predicate(records)

        poll(holds, timeout, lambda: f"job {job_id}: {records}")
        return records

    def wait_for_states(self, job_id: str, *states: str, timeout: float = 30.0) -> list[dict[str, str]]:
        """Waits until every record of the job (every task of an array) is in one of `states`."""
        return self.wait_until(job_id, lambda records: all(r["JobState"] in states for r in records), timeout)

    def cancel(self, *job_ids: str) -> None:
        """Cancels the jobs and waits until their processes are gone, so that they free their CPUs."""
        self.run("scancel", *job_ids, check=False)
        for job_id in job_ids:
            self.wait_until(job_id, lambda records: not any(r["JobState"] in ACTIVE for r in records), KILL_TIMEOUT)

    def cancel_all(self) -> None:
        self.run("scancel", "--user", "root", check=False)
        poll(
            lambda: not self.run("squeue", "-h", check=False).stdout.strip(), KILL_TIMEOUT, lambda: "jobs still active"
        )


def poll(condition: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Waits until `condition()` holds; raises TimeoutError with `describe()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout}s: {describe()}")
        time.sleep(0.05)


def wait_for(condition: Callable[[], bool], what: str, daemons: list[subprocess.Popen], logs: list[Path]) -> None:
    """Waits until `condition()` holds; raises with the daemons' log tails if one exits or time runs out."""

    def ready() -> bool:
        if any(daemon.poll() is not None for daemon in daemons):
            raise RuntimeError(f"SLURM test cluster: a daemon exited while waiting for {what}\n{tails(logs)}")
        return condition()

    poll(ready, START_TIMEOUT, lambda: f"SLURM test cluster: waiting for {what}\n{tails(logs)}")


def tails(logs: list[Path]) -> str:
    return "\n".join(f"{log}:\n{log.read_text()[-2000:]}" for log in logs if log.exists())


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
