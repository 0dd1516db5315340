"""Where a study's runs execute: this machine (one run per visible GPU, or one at a time on the CPU) or a SLURM
cluster (one job array, requeued on preemption and before its time limit, and an evaluation job after it).

Either way a run is the same train.py command with --resume, so whatever stopped it, the same command continues it.
"""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .cli import UsageError
from .logging_integrations import GROUP_VARIABLE
from .study import TRAIN_SCRIPT, Run, Study

# --- this machine


def visible_devices() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries up to the first invalid one (as CUDA reads
    it), else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        import torch  # here: the rest of a study needs no torch in this process

        return [str(index) for index in range(torch.cuda.device_count())]
    devices = []
    for entry in (entry.strip() for entry in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def device_slots(devices: list[str], gpus_per_run: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each run that may train at once: groups of `gpus_per_run` GPUs (the rest idle),
    or one run at a time on the CPU (None)."""
    if not devices or gpus_per_run == 0:
        return [None]
    if gpus_per_run > len(devices):
        raise UsageError(f"--gpus-per-run {gpus_per_run} but {len(devices)} GPUs are visible; pass at most that")
    groups = len(devices) // gpus_per_run
    return [",".join(devices[group * gpus_per_run : (group + 1) * gpus_per_run]) for group in range(groups)]


def train_command(run: Run, processes: int) -> list[str]:
    """The run's train.py command with this interpreter (torchrun for several GPUs), its arm named for the
    experiment trackers (logging_integrations.arm_group)."""
    launcher = ["env", f"{GROUP_VARIABLE}={run.arm_name}", sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return [*launcher, str(TRAIN_SCRIPT), *run.train_flags()]


def run_locally(runs: list[Run], slots: list[str | None], command: Callable[[Run, str | None], list[str]]) -> int:
    """Train `runs`, each on the next free slot, its output appended to its log. SIGTERM or Ctrl-C stops every
    running one with its checkpoint (SIGTERM to each, then wait) and returns 143 or 130; else 0."""
    pending: queue.Queue[Run] = queue.Queue()
    for run in runs:
        pending.put(run)
    stop = StopRequest()
    workers = [threading.Thread(target=work_on, args=(pending, slot, command, stop), daemon=True) for slot in slots]
    with stop.on_signals():
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            time.sleep(0.2)  # signal handlers run between sleeps
    return 128 + stop.signal_number if stop.signal_number else 0


class StopRequest:
    """The first SIGTERM or SIGINT: no run starts after it and every running one gets SIGTERM."""

    def __init__(self):
        self.signal_number: int | None = None
        self.processes: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    @contextmanager
    def on_signals(self):
        previous = {number: signal.signal(number, self.request) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def request(self, number: int, frame) -> None:
        with self.lock:
            if self.signal_number is None:
                self.signal_number = number
                print(f"{signal.Signals(number).name}: stopping the running runs at their next checkpoint", flush=True)
                for process in self.processes:
                    process.send_signal(signal.SIGTERM)

    def start(self, command: list[str], env: dict, log) -> subprocess.Popen | None:
        with self.lock:
            if self.signal_number is not None:
                return None
            # A session of its own: a terminal's Ctrl-C reaches study.py alone, which sends each run one SIGTERM.
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.processes.add(process)
            return process


def pinned_environment(slot: str | None) -> dict:
    """This process's environment, with the slot's GPUs as the only visible ones (unchanged on the CPU)."""
    return {**os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {})}


def work_on(pending: queue.Queue, slot: str | None, command, stop: StopRequest) -> None:
    while stop.signal_number is None:
        try:
            run = pending.get_nowait()
        except queue.Empty:
            return
        argv = command(run, slot)
        env = pinned_environment(slot)
        run.log.parent.mkdir(parents=True, exist_ok=True)
        with run.log.open("a", encoding="utf-8") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} CUDA_VISIBLE_DEVICES={slot or ''} {shlex.join(argv)}\n")
            log.flush()
            process = stop.start(argv, env, log)
            if process is None:
                return
            print(f"{run.name}: training on {f'GPU {slot}' if slot is not None else 'the CPU'} (log {run.log})")
            process.wait()
        print(f"{run.name}: train.py exited with code {process.returncode}")


# --- SLURM

SLURM_FOLDER = "slurm"
TIME_LIMIT_SIGNAL = "USR1"  # SLURM's warning before the time limit: checkpoint, then requeue; SIGTERM is preemption


def submit(study: Study, runs: list[Run], options: dict, evaluate: list[str]) -> dict:
    """Write the array and evaluation job scripts into the study folder and submit them; their ids for study.json.

    `runs` may be empty (nothing to train): then the evaluation job alone is submitted."""
    number = len(study.submissions) + 1
    folder = study.folder / SLURM_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    submission = {"runs": [run.name for run in runs], "array": None}
    dependency = []
    if runs:
        array_script = folder / f"train-{number}.sbatch"
        array_script.write_text(array_job(study, runs, options, folder), encoding="utf-8")
        submission["array"] = sbatch(array_script)
        dependency = [f"--dependency=afterany:{submission['array']}"]
    evaluation_script = folder / f"evaluate-{number}.sbatch"
    evaluation_script.write_text(evaluation_job(study, options, folder, evaluate), encoding="utf-8")
    submission["evaluation"] = sbatch(evaluation_script, *dependency)
    return submission


def sbatch(script: Path, *flags: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", *flags, str(script)], capture_output=True, text=True)
    if result.returncode:
        raise UsageError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def directives(options: dict, name: str, output: str, gpus: int) -> list[str]:
    lines = [f"--job-name={name}", f"--output={output}", "--open-mode=append", f"--chdir={Path.cwd()}"]
    lines += [f"--gres=gpu:{gpus}"] if gpus else []
    lines += [f"--{key}={options[key]}" for key in ("partition", "time", "account") if options.get(key)]
    return [*lines, *options.get("sbatch_args", [])]


def script_text(header: str, flags: list[str], body: str) -> str:
    return "\n".join(["#!/bin/bash", header, *(f"#SBATCH {shlex.quote(flag)}" for flag in flags), "", body])


def array_job(study: Study, runs: list[Run], options: dict, folder: Path) -> str:
    """One task per run: train.py in the background, so that the batch shell can pass on SLURM's signals."""
    gpus = options["gpus_per_run"]
    cap = f"%{options['max_parallel']}" if options.get("max_parallel") else ""
    flags = [f"--array=0-{len(runs) - 1}{cap}", *(["--requeue"] if options["requeue"] else ["--no-requeue"])]
    flags.append(f"--signal=B:{TIME_LIMIT_SIGNAL}@{options['signal_seconds']}")
    flags += directives(options, f"study-{study.folder.name}", str(folder / "train-%A_%a.out"), gpus)
    cases = "\n".join(
        f"  {index}) log={shlex.quote(str(run.log))}; command=({shlex.join(train_command(run, gpus))}) ;;"
        for index, run in enumerate(runs)
    )
    body = ARRAY_BODY.replace("{cases}", cases).replace("{signal}", TIME_LIMIT_SIGNAL)
    header = f"# Study {study.folder}: train.py for each run still to train. Rerun by hand: sbatch {folder}/<this file>"
    return script_text(header, flags, body)


ARRAY_BODY = """case "$SLURM_ARRAY_TASK_ID" in
{cases}
esac
task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
# Before the time limit: train.py checkpoints on SIGTERM, then the task goes back in the queue and resumes there.
# On preemption (SIGTERM from SLURM) train.py checkpoints and SLURM requeues the task itself.
requeue_before_time_limit() {
  kill -TERM "$train" 2>/dev/null; wait "$train"
  echo "# $(date -u '+%F %T') job $task: time limit near, checkpointed; requeued" >> "$log"
  scontrol requeue "$task"
}
trap requeue_before_time_limit {signal}
trap 'kill -TERM "$train" 2>/dev/null' TERM
mkdir -p "$(dirname "$log")"
echo "# $(date -u '+%F %T') job $task on $(hostname) CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES ${command[*]}" >> "$log"
"${command[@]}" >> "$log" 2>&1 &
train=$!
wait "$train"
status=$?
while kill -0 "$train" 2>/dev/null; do wait "$train"; status=$?; done  # a trapped signal ended `wait` early
exit $status
"""


def evaluation_job(study: Study, options: dict, folder: Path, evaluate: list[str]) -> str:
    name, output = f"study-{study.folder.name}-evaluation", str(folder / "evaluate-%j.out")
    flags = directives(options, name, output, min(1, options["gpus_per_run"]))
    header = f"# Study {study.folder}: evaluate every finished run and write the report, once the array has ended"
    return script_text(header, flags, f"exec {shlex.join(evaluate)}\n")


def queued_jobs(study: Study) -> tuple[dict[str, str], dict[str, str]]:
    """What SLURM still holds of the study's jobs: each run's task id with its state, and each evaluation job's."""
    arrays = {submission["array"]: submission["runs"] for submission in study.submissions if submission["array"]}
    evaluations = {submission["evaluation"] for submission in study.submissions}
    if not arrays and not evaluations:
        return {}, {}
    result = subprocess.run(
        ["squeue", "--me", "--array", "--noheader", "--format=%F|%K|%T"], capture_output=True, text=True
    )
    if result.returncode:
        raise UsageError(f"squeue failed: {result.stderr.strip()}; the study's jobs cannot be checked")
    runs, jobs = {}, {}
    for line in result.stdout.splitlines():
        job, task, state = line.strip().split("|")
        if job in arrays and task.isdigit() and int(task) < len(arrays[job]):
            runs[arrays[job][int(task)]] = f"job {job}_{task}, {state.lower()}"
        elif job in evaluations:
            jobs[job] = state.lower()
    return runs, jobs
