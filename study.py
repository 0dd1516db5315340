"""Stage 5: a study, arms x seeds of train.py and one evaluation of them all, on this machine or a SLURM cluster.

    python study.py learning_rate=5e-5,1e-4 seed=42,43,44,45,46 precision=bf16 --output-dir studies/lr
    python study.py learning_rate=5e-5,1e-4 seed=42,43,44,45,46 precision=bf16 --output-dir studies/lr \\
        --launcher slurm --partition gpu --time 04:00:00
    python study.py --output-dir studies/lr --status
    python study.py --config study.yaml      # train.py settings as field: value or list, and study.py's flags

Any train.py setting is FIELD=V1,V2,... (dashes or underscores; put them before the flags); `seed=` lists the seeds
(default 42,43,44). A setting with several values is a dimension of the grid and the arms are their product; one with
a single value is fixed. Each run is `python train.py --output-dir <study>/runs/<arm>_seed<S> --resume ...`, its log
beside its folder; then evaluate.py scores every finished run at once and report.md gives the arms table, the
comparisons with their intervals, the failed runs and evaluate.py's chart.

--launcher local trains one run per visible GPU at a time (each pinned with CUDA_VISIBLE_DEVICES), or one at a time
on the CPU; SIGTERM or Ctrl-C stops the running ones with a checkpoint. --launcher slurm submits one job array (a
task per run still to train) and an evaluation job that runs when the array has ended; the job scripts are in
<study>/slurm/. Rerunning the same command continues the study: finished runs are kept, interrupted or failed ones
resume, running or queued ones are left alone; added seeds or values train only the new runs.
Exit codes: 0 done (local) or submitted (slurm), 1 a run or the evaluation failed, 2 bad input.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lora_summarization import launchers
from lora_summarization.cli import EXIT_CHECK_FAILED, UsageError, run_stage
from lora_summarization.study import (
    EVALUATE_SCRIPT,
    EVALUATION,
    STUDY_FILE,
    Study,
    last_line,
    of_state,
    open_study,
    requested_values,
    states,
)
from lora_summarization.study_report import evaluation_up_to_date, write_report


@dataclass
class StudyConfig:
    POSITIONAL: ClassVar[str] = "settings"
    settings: list[str] = field(
        default_factory=list,
        metadata={"help": "FIELD=V1,V2,... for any train.py setting (positional); seed=42,43,44 lists the seeds"},
    )
    output_dir: str = field(default="study", metadata={"help": "the study folder; rerun with it to continue"})
    launcher: str = field(default="local", metadata={"help": "local (this machine's GPUs, or its CPU) or slurm"})
    gpus_per_run: int = field(
        default=1, metadata={"help": "GPUs of each run (torchrun when more than 1); 0: the CPU (no --gres)"}
    )
    partition: str | None = field(default=None, metadata={"help": "slurm: the partition of the jobs"})
    time: str | None = field(default=None, metadata={"help": "slurm: each job's time limit (04:00:00)"})
    account: str | None = field(default=None, metadata={"help": "slurm: the account charged"})
    max_parallel: int = field(default=0, metadata={"help": "slurm: at most this many runs at once (0: no cap)"})
    sbatch_arg: list[str] = field(
        default_factory=list,
        metadata={
            "help": "slurm: a further sbatch option, as --sbatch-arg=--mem=32G; repeat for more",
            "action": "extend",
        },
    )
    requeue: bool = field(default=True, metadata={"help": "slurm: requeue a preempted run (--no-requeue: do not)"})
    signal_seconds: int = field(
        default=120, metadata={"help": "slurm: seconds before the time limit when a run checkpoints and requeues"}
    )
    status: bool = field(default=False, metadata={"help": "print each run's state and where the report is; no run"})
    evaluate_only: bool = field(
        default=False, metadata={"help": "evaluate every finished run and write the report; no training"}
    )
    max_examples: int = field(default=0, metadata={"help": "evaluate.py: the first N test examples only (0 = all)"})
    max_new_tokens: int = field(default=128, metadata={"help": "evaluate.py: longest generated summary, in tokens"})
    batch_size: int = field(default=16, metadata={"help": "evaluate.py: examples per batch"})
    debug: bool = field(default=False, metadata={"help": "show tracebacks for usage errors"})


def main(config: StudyConfig) -> int:
    check_flags(config)
    launching = not (config.status or config.evaluate_only)
    study = open_study(
        Path(config.output_dir).resolve(),
        requested_values(config.settings),
        launcher_options(config) if launching else None,
        evaluation_options(config) if launching else None,
    )
    if not (launching or config.settings or (study.folder / STUDY_FILE).exists()):
        raise UsageError(f"{config.output_dir} holds no study; start one with its settings (FIELD=V1,V2 ...)")
    if config.status:
        return print_status(study)
    study.save()
    if config.evaluate_only:
        return evaluate_and_report(study, device=None)
    if config.launcher == "slurm":
        return submit_to_slurm(study)
    return train_here(study)


def check_flags(config: StudyConfig) -> None:
    rules = [
        ("--launcher", config.launcher in ("local", "slurm"), "local or slurm"),
        ("--gpus-per-run", config.gpus_per_run >= 0, "0 (the CPU) or more"),
        ("--max-parallel", config.max_parallel >= 0, "0 (no cap) or more"),
        ("--signal-seconds", config.signal_seconds > 0, "positive"),
    ]
    problems = [f"{flag} must be {rule}" for flag, ok, rule in rules if not ok]
    if problems:
        raise UsageError("; ".join(problems))


def launcher_options(config: StudyConfig) -> dict:
    names = ("gpus_per_run", "partition", "time", "account", "max_parallel", "requeue", "signal_seconds")
    options = {name: getattr(config, name) for name in names}
    return {"name": config.launcher, **options, "sbatch_args": config.sbatch_arg}


def evaluation_options(config: StudyConfig) -> dict:
    return {
        "max_examples": config.max_examples,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
    }


def print_status(study: Study) -> int:
    queued, evaluations = launchers.queued_jobs(study)
    for state in states(study, queued):
        print(state.line())
    for job, state in evaluations.items():
        print(f"evaluation: job {job}, {state}")
    report = study.folder / "report.md"
    print(f"report: {report}" if report.exists() else f"report: not written yet ({report})")
    return 0


def train_here(study: Study) -> int:
    """Train every run that is not finished or running here, then evaluate whatever finished."""
    to_train = [state.run for state in of_state(states(study, {}), "not started", "interrupted", "failed")]
    devices = launchers.visible_devices()
    slots = launchers.device_slots(devices, study.launcher["gpus_per_run"])
    processes = study.launcher["gpus_per_run"] if devices else 1
    print(f"{len(to_train)} of {len(study.runs())} runs to train, {len(slots)} at a time")
    stopped = launchers.run_locally(to_train, slots, lambda run, slot: launchers.train_command(run, processes))
    if stopped:
        return stopped
    return evaluate_and_report(study, device=slots[0] and slots[0].split(",")[0])  # evaluate.py uses one GPU


def submit_to_slurm(study: Study) -> int:
    """Submit the runs SLURM does not hold and that are not finished or running, and an evaluation after them."""
    queued, evaluations = launchers.queued_jobs(study)
    to_train = [state.run for state in of_state(states(study, queued), "not started", "interrupted", "failed")]
    if not to_train and (evaluations or evaluation_up_to_date(study)):
        print(f"nothing to submit: every run is finished, queued or running; see {status_command(study)}")
        return 0
    evaluate = [sys.executable, str(Path(__file__).resolve()), "--output-dir", str(study.folder), "--evaluate-only"]
    submission = launchers.submit(study, to_train, study.launcher, evaluate)
    study.submissions.append(submission)
    study.save()
    array = f"job array {submission['array']} ({len(to_train)} runs)" if to_train else "no training job"
    print(f"submitted {array} and evaluation job {submission['evaluation']}; follow them with {status_command(study)}")
    return 0


def status_command(study: Study) -> str:
    return f"python study.py --output-dir {study.folder} --status"


def evaluate_and_report(study: Study, device: str | None) -> int:
    """One evaluate.py call over every finished run (unless it already covers them), then report.md; exit 1 when a
    run or the evaluation failed, each named with its log's last line."""
    found = states(study, {})
    finished = [state.run for state in of_state(found, "finished")]
    evaluation_failed = None
    if finished and not evaluation_up_to_date(study):
        evaluation_failed = run_evaluation(study, finished, device)
    report = write_report(study, found, evaluation_failed)
    failed = of_state(found, "failed")
    for state in failed:
        print(f"failed: {state.line()}", file=sys.stderr)
    if evaluation_failed:
        print(f"failed: the evaluation: {evaluation_failed}", file=sys.stderr)
    print(f"report: {report}")
    return EXIT_CHECK_FAILED if failed or evaluation_failed else 0


def run_evaluation(study: Study, finished, device: str | None) -> str | None:
    """evaluate.py over `finished` into evaluation/; None when it succeeded, else its log's last line."""
    folder = study.folder / EVALUATION
    folder.mkdir(parents=True, exist_ok=True)
    options = [f"--{key.replace('_', '-')}={value}" for key, value in study.evaluation.items()]
    command = [
        *(sys.executable, str(EVALUATE_SCRIPT), "--output-dir", str(folder), *options),
        *("--model", study.setting("model"), "--data-dir", study.setting("data_dir")),
        *("--adapter", *(str(run.folder) for run in finished)),
    ]
    log = folder / "evaluate.log"
    env = launchers.pinned_environment(device)
    with log.open("w", encoding="utf-8") as output:
        code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env).returncode
    return None if code == 0 else f"{log}: {last_line(log)}"


if __name__ == "__main__":
    sys.exit(run_stage(main, StudyConfig))
