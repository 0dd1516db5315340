"""The SLURM mechanics a study launcher relies on, proven on the real one-node test cluster with shell jobs.

slurm_cluster.py's docstring sums up what these tests found.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from slurm_cluster import missing_requirement, poll, running_cluster

ARRAY_SCRIPT = """\
#!/bin/bash
#SBATCH --array=0-3%2
echo "start $(date +%s.%N)"
echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"
sleep 1
echo "end $(date +%s.%N)"
test "$SLURM_ARRAY_TASK_ID" != 2
"""

# A batch shell and its child, each logging the signals it gets to events_<task>. The child stops on SIGTERM
# after a fifth of a second (its checkpoint), so that SIGTERMs sent to both reach the shell while it waits.
# The shell stops with it; on SIGUSR1 (the pre-time-limit signal) it stops the child and requeues its own
# array task, the way a training script checkpoints before the time limit and comes back.
SIGNAL_SCRIPT = """\
#!/bin/bash
events=events_${SLURM_ARRAY_TASK_ID:-0}
on_usr1() {
  echo "shell USR1" >> $events
  kill -TERM $child; wait $child
  scontrol requeue ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} && echo "requeued" >> $events
  exit 0
}
trap on_usr1 USR1
trap 'echo "shell TERM" >> $events' TERM
bash -c "trap 'echo child TERM >> $events; sleep 0.2; kill \\$!; exit' TERM
echo start ${SLURM_RESTART_COUNT:-0} >> $events; sleep 60 & wait" &
child=$!
while kill -0 $child 2>/dev/null; do wait $child; done
"""


def write_script(folder: Path, text: str) -> Path:
    script = folder / "job.sh"
    script.write_text(text)
    return script


def stamps(path: Path) -> dict[str, str]:
    """The `key value` lines a job script printed."""
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def events(folder: Path, task: int = 0) -> list[str]:
    path = folder / f"events_{task}"
    return path.read_text().splitlines() if path.exists() else []


def wait_for_events(folder: Path, task: int, *expected: str) -> None:
    """Waits until the task's events end with `expected` (in order)."""
    tail = list(expected)
    poll(lambda: events(folder, task)[-len(tail) :] == tail, 30, lambda: f"task {task}: {events(folder, task)}")


def submit_signal_job(slurm_cluster, folder: Path, *args: str) -> str:
    return slurm_cluster.sbatch("--chdir", str(folder), "-o", "out_%a", *args, str(write_script(folder, SIGNAL_SCRIPT)))


def test_array_tasks_run_and_an_afterany_job_waits_for_all_of_them(slurm_cluster, tmp_path):
    submitted = time.time()
    array = slurm_cluster.sbatch("--chdir", str(tmp_path), "-o", "out_%A_%a", str(write_script(tmp_path, ARRAY_SCRIPT)))
    after = slurm_cluster.sbatch(
        "--chdir", str(tmp_path), "-o", "after", f"--dependency=afterany:{array}", "--wrap", "echo start $(date +%s.%N)"
    )
    assert slurm_cluster.job(after)["Reason"] == "Dependency"

    slurm_cluster.wait_for_states(after, "COMPLETED")
    tasks = {record["ArrayTaskId"]: record["JobState"] for record in slurm_cluster.jobs(array)}
    assert tasks == {"0": "COMPLETED", "1": "COMPLETED", "2": "FAILED", "3": "COMPLETED"}
    outputs = {task: stamps(tmp_path / f"out_{array}_{task}") for task in range(4)}
    assert all(output["task"] == f"{task} of {array}" for task, output in outputs.items())
    assert float(stamps(tmp_path / "after")["start"]) > max(float(output["end"]) for output in outputs.values())
    first_start = min(float(output["start"]) for output in outputs.values())
    assert first_start - submitted < 5, "a job should start within seconds of its submission"


def test_scontrol_requeue_terminates_a_task_which_reruns_once_its_start_time_is_now(slurm_cluster, tmp_path):
    array = submit_signal_job(slurm_cluster, tmp_path, "--array=0-1", "--requeue")
    after = slurm_cluster.sbatch("--dependency", f"afterany:{array}", "-o", "/dev/null", "--wrap", "true")
    try:
        for task in (0, 1):
            wait_for_events(tmp_path, task, "start 0")
        slurm_cluster.run("scontrol", "requeue", f"{array}_1")
        slurm_cluster.wait_until(f"{array}_1", lambda records: records[0]["Reason"] == "BeginTime")

        assert sorted(events(tmp_path, 1)) == ["child TERM", "shell TERM", "start 0"]
        assert (slurm_cluster.state(f"{array}_1"), slurm_cluster.restarts(f"{array}_1")) == ("PENDING", 1)
        assert (events(tmp_path, 0), slurm_cluster.state(f"{array}_0")) == (["start 0"], "RUNNING")
        assert slurm_cluster.job(after)["Reason"] == "Dependency"
        slurm_cluster.release(f"{array}_1")
        wait_for_events(tmp_path, 1, "start 1")
    finally:
        slurm_cluster.cancel(array, after)


def test_scancel_signal_reaches_the_batch_shell_with_batch_and_every_process_with_full(slurm_cluster, tmp_path):
    job = submit_signal_job(slurm_cluster, tmp_path)
    try:
        wait_for_events(tmp_path, 0, "start 0")
        slurm_cluster.run("scancel", "--signal=TERM", "--batch", job)
        wait_for_events(tmp_path, 0, "start 0", "shell TERM")
        slurm_cluster.run("scancel", "--signal=TERM", job)  # signals job steps (srun) only: there are none
        slurm_cluster.run("scancel", "--signal=TERM", "--full", job)
        poll(lambda: len(events(tmp_path)) == 4, 30, lambda: str(events(tmp_path)))
        assert sorted(events(tmp_path)[2:]) == ["child TERM", "shell TERM"]
    finally:
        slurm_cluster.cancel(job)


def test_a_task_requeues_itself_on_the_time_limit_signal(slurm_cluster, tmp_path):
    array = submit_signal_job(slurm_cluster, tmp_path, "--array=0-1", "--requeue", "--time=10", "--signal=B:USR1@60")
    try:
        for task in (0, 1):
            wait_for_events(tmp_path, task, "start 0")
        # What the time limit does 60 s before its end: signal the batch shell only.
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", f"{array}_1")
        slurm_cluster.wait_until(f"{array}_1", lambda records: records[0]["Reason"] == "BeginTime")
        # The requeue sends SIGTERM to what is left of the task: a "shell TERM" may come before or after "requeued".
        poll(lambda: "requeued" in events(tmp_path, 1), 30, lambda: str(events(tmp_path, 1)))
        assert [event for event in events(tmp_path, 1) if event != "shell TERM"] == [
            "start 0",
            "shell USR1",
            "child TERM",
            "requeued",
        ]
        assert slurm_cluster.restarts(f"{array}_1") == 1
        assert (events(tmp_path, 0), slurm_cluster.state(f"{array}_0")) == (["start 0"], "RUNNING")
        slurm_cluster.release(f"{array}_1")
        wait_for_events(tmp_path, 1, "start 1")
    finally:
        slurm_cluster.cancel(array)


def test_a_stopped_cluster_leaves_no_process_and_no_folder(slurm_cluster, tmp_path):
    """A second cluster beside the fixture's: it starts on other ports, and stopping it ends even a running job."""
    with running_cluster() as cluster:
        job = cluster.sbatch("--chdir", str(tmp_path), "-o", "/dev/null", "--wrap", "echo $$ > job.pid; sleep 60")
        poll(lambda: (tmp_path / "job.pid").exists(), 30, lambda: str(cluster.jobs(job)))
        pid_files = [tmp_path / "job.pid", *cluster.root.glob("*.pid")]
        pids = [int(path.read_text()) for path in pid_files]
        assert len(pids) == 4  # the job, munged, slurmctld and slurmd
    assert not cluster.root.exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_the_cluster_needs_root_and_the_slurm_commands(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert all(name in missing_requirement() for name in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in missing_requirement()
