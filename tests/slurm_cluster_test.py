"""The SLURM mechanics a study launcher relies on, proven on the real one-node test cluster with shell jobs."""

from __future__ import annotations

import time
from pathlib import Path

TASK_SCRIPT = """\
#!/bin/bash
#SBATCH --array=0-3%2
echo "start $(date +%s.%N)"
echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"
sleep 1
echo "end $(date +%s.%N)"
test "$SLURM_ARRAY_TASK_ID" != 2
"""


def write_script(folder: Path, text: str) -> Path:
    script = folder / "job.sh"
    script.write_text(text)
    return script


def stamps(path: Path) -> dict[str, str]:
    """The `key value` lines a job script printed."""
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def test_array_tasks_run_and_an_afterany_job_waits_for_all_of_them(slurm_cluster, tmp_path):
    submitted = time.time()
    array = slurm_cluster.sbatch(
        "--chdir", str(tmp_path), "-o", "out_%A_%a.txt", str(write_script(tmp_path, TASK_SCRIPT))
    )
    after = slurm_cluster.sbatch(
        "--chdir",
        str(tmp_path),
        "-o",
        "after.txt",
        f"--dependency=afterany:{array}",
        "--wrap",
        "echo start $(date +%s.%N)",
    )
    assert slurm_cluster.job(after)["Reason"] == "Dependency"

    slurm_cluster.wait_for_states(after, "COMPLETED")
    tasks = {record["ArrayTaskId"]: record for record in slurm_cluster.jobs(array)}
    assert {task: record["JobState"] for task, record in tasks.items()} == {
        "0": "COMPLETED",
        "1": "COMPLETED",
        "2": "FAILED",
        "3": "COMPLETED",
    }
    outputs = {task: stamps(tmp_path / f"out_{array}_{task}.txt") for task in range(4)}
    assert all(output["task"] == f"{task} of {array}" for task, output in outputs.items())
    last_end = max(float(output["end"]) for output in outputs.values())
    assert float(stamps(tmp_path / "after.txt")["start"]) > last_end
    first_start = min(float(output["start"]) for output in outputs.values())
    assert first_start - submitted < 5, "a job should start within seconds of its submission"
