"""study.py on this machine: a 2 x 2 study end to end, rerun, grown by a failing value; on the test cluster the same
study preempted, signalled, rerun and grown by a seed and a failing value; bad input; the GPU slots for 1, 2 and 4
GPUs and the processes that get them; SIGTERM passed on to the running runs."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import run_in_process
from train_test import assert_same_adapter

from lora_summarization import launchers
from lora_summarization.run_lock import output_dir_lock
from lora_summarization.study import Run, Study, run_state

# The same tiny schedule as TINY_TRAINING_FLAGS, as study settings; two learning rates x two seeds.
TINY = ("max_steps=4", "save_steps=2", "eval_steps=1000", "logging_steps=1", "warmup_steps=0")
TINY += ("batch_size=4", "grad_accum=2", "learning_rate=1e-2,5e-3")
EVALUATION = ("--max-examples", "4", "--max-new-tokens", "4")
RUNS = [f"learning_rate={rate}_seed{seed}" for rate in ("0.01", "0.005") for seed in (42, 43)]


# The tests that read or grow the local study run on one pytest-xdist worker, which trains it once.
ON_THE_LOCAL_STUDYS_WORKER = pytest.mark.xdist_group("local_study")


def study_args(model_dir, data_dir, study_dir, *settings) -> list[str]:
    return [f"model={model_dir}", f"data_dir={data_dir}", *TINY, *settings, "--output-dir", study_dir, *EVALUATION]


def evaluated_runs(study_dir) -> list[str]:
    results = json.loads((study_dir / "evaluation" / "evaluation_results.json").read_text())
    return sorted(results["adapters"])


def log_headers(study_dir, name: str) -> list[str]:
    return [line for line in (study_dir / "runs" / f"{name}.log").read_text().splitlines() if line.startswith("# ")]


def adapter_times(study_dir, names: list[str]) -> dict[str, int]:
    return {name: (study_dir / "runs" / name / "adapter_model.safetensors").stat().st_mtime_ns for name in names}


@pytest.fixture(scope="session")
def local_study(tiny_model_dir, data_dir, tmp_path_factory):
    """The 2 x 2 study on two (pretended) GPUs: on this CPU each run gets CUDA_VISIBLE_DEVICES=0 or 1 and trains on
    the CPU, two at a time. Session-scoped: its tests share a worker, which may run other modules' tests between
    them, and a module fixture would be trained again after each."""
    study_dir = tmp_path_factory.mktemp("study") / "lr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        started = time.perf_counter()
        result = run_in_process("study.py", "seed=42,43", *study_args(tiny_model_dir, data_dir, study_dir))
        print(f"\n2 x 2 tiny study on this machine: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stderr + result.stdout
    return study_dir


@ON_THE_LOCAL_STUDYS_WORKER
def test_a_2x2_study_trains_each_run_on_its_own_gpu_and_reports_one_evaluation_of_all(local_study):
    assert sorted(path.name for path in (local_study / "runs").iterdir() if path.is_dir()) == sorted(RUNS)
    assert evaluated_runs(local_study) == sorted(RUNS)
    devices = {name: log_headers(local_study, name)[0].split()[3] for name in RUNS}
    assert set(devices.values()) == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    study = json.loads((local_study / "study.json").read_text())
    assert study["grid"] == {"learning_rate": [0.01, 0.005]} and study["seeds"] == [42, 43]
    assert study["fixed"]["max_steps"] == 4 and study["launcher"]["name"] == "local"
    report = (local_study / "report.md").read_text()
    assert "4 runs: 4 finished" in report
    for arm in ("learning_rate=0.01", "learning_rate=0.005"):
        assert any(line.startswith(arm) and "42,43" in line and "+-" in line for line in report.splitlines())
    assert "learning_rate=0.005 minus learning_rate=0.01" in report
    assert "![" in report and (local_study / "evaluation" / "evaluation_chart.png").exists()


@ON_THE_LOCAL_STUDYS_WORKER
def test_rerunning_the_study_trains_and_evaluates_nothing_and_a_changed_fixed_setting_is_refused(
    local_study, tiny_model_dir, data_dir
):
    results = local_study / "evaluation" / "evaluation_results.json"
    before = results.stat().st_mtime_ns, [log_headers(local_study, name) for name in RUNS]
    again = run_in_process("study.py", "seed=42,43", *study_args(tiny_model_dir, data_dir, local_study))
    assert again.returncode == 0, again.stderr
    assert "0 of 4 runs to train" in again.stdout
    assert (results.stat().st_mtime_ns, [log_headers(local_study, name) for name in RUNS]) == before
    changed = run_in_process("study.py", *study_args(tiny_model_dir, data_dir, local_study, "max_steps=5"))
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1
    assert "max_steps: the study has 4, this command 5" in changed.stderr
    status = run_in_process("study.py", "--output-dir", local_study, "--status")
    assert [line.split(": ")[1] for line in status.stdout.splitlines()[:4]] == ["finished"] * 4
    assert f"report: {local_study / 'report.md'}" in status.stdout


@ON_THE_LOCAL_STUDYS_WORKER
def test_an_added_failing_value_trains_only_its_runs_and_the_failures_are_reported(
    local_study, tiny_model_dir, data_dir, monkeypatch
):
    """Runs after the two tests above: the study grows by a learning rate train.py refuses (an added seed is grown on
    the test cluster, below)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    finished_before = adapter_times(local_study, RUNS)
    args = study_args(tiny_model_dir, data_dir, local_study, "learning_rate=1e-2,5e-3,-1")
    grown = run_in_process("study.py", "seed=42,43", *args)
    assert grown.returncode == 1, grown.stderr
    assert "2 of 6 runs to train" in grown.stdout
    failed = [f"learning_rate=-1.0_seed{seed}" for seed in (42, 43)]
    for name in failed:
        assert f"failed: {name}: failed" in grown.stderr and "--learning-rate must not be negative" in grown.stderr
    assert evaluated_runs(local_study) == sorted(RUNS)
    assert adapter_times(local_study, RUNS) == finished_before
    report = (local_study / "report.md").read_text()
    assert "## Failed runs" in report and all(name in report for name in failed)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (["learning_rat=1e-4"], "learning_rat is not a train.py setting"),
        (["output_dir=elsewhere"], "output_dir is set by the study"),
        (["lora-r=8,eight"], "lora-r=8,eight: each value must be a number (int)"),
        (["use_dora=maybe"], "use_dora=maybe: each value must be true or false"),
        (["model=a,b"], "model takes one value"),
        (["learning_rate"], "settings are FIELD=V1,V2"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_them(settings, named, tmp_path):
    result = run_in_process("study.py", *settings, "--output-dir", tmp_path / "study")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr
    assert not (tmp_path / "study").exists()


def test_settings_come_from_a_config_file_and_the_command_line_wins(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(
        "learning_rate: [1e-4, 2e-4]\ntarget_modules: ['q_proj,v_proj', all-linear]\nseed: 7\nmax_examples: 3\n"
    )
    result = run_in_process("study.py", "--config", config, "seed=8,9", "--output-dir", tmp_path / "s", "--status")
    assert result.returncode == 0, result.stderr
    assert "learning_rate=0.0002_target_modules=q_proj-v_proj_seed9: not started" in result.stdout
    assert len(result.stdout.splitlines()) == 2 * 2 * 2 + 1 and "seed7" not in result.stdout
    assert not (tmp_path / "s").exists()  # --status changes nothing


@pytest.mark.parametrize(
    ("devices", "per_run", "slots"),
    [
        ([], 1, [None]),
        (["0"], 1, ["0"]),
        (["0", "1"], 1, ["0", "1"]),
        (["0", "1", "2", "3"], 1, ["0", "1", "2", "3"]),
        (["0", "1", "2", "3"], 2, ["0,1", "2,3"]),
        (["GPU-a", "GPU-b"], 0, [None]),
    ],
)
def test_each_run_that_trains_at_once_gets_gpus_of_its_own(devices, per_run, slots):
    assert launchers.device_slots(devices, per_run) == slots


def test_visible_gpus_are_read_as_cuda_reads_them(monkeypatch):
    for listed, devices in [("0,1", ["0", "1"]), ("2, 3,-1,4", ["2", "3"]), ("", [])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        assert launchers.visible_devices() == devices


PRINT_DEVICE_AND_SPAN = (
    "import os, time; start = time.time(); time.sleep(0.3)\n"
    "print(os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu'), start, time.time())"
)


def fake_runs(tmp_path, count: int) -> list[Run]:
    return [Run(tmp_path, {}, seed, {}) for seed in range(count)]


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_the_processes_started_see_only_their_gpu_and_as_many_run_at_once_as_there_are_gpus(gpus, tmp_path):
    runs = fake_runs(tmp_path, 6)
    slots = launchers.device_slots([str(index) for index in range(gpus)], 1)
    command = lambda run, slot: [sys.executable, "-c", PRINT_DEVICE_AND_SPAN]  # noqa: E731
    assert launchers.run_locally(runs, slots, command) == 0
    spans = []
    for run in runs:
        header, *_, last = run.log.read_text().splitlines()
        device, start, end = last.split()
        assert header.split()[3] == f"CUDA_VISIBLE_DEVICES={device}"
        spans.append((device, float(start), float(end)))
    assert {device for device, _, _ in spans} == set(slots)
    for (device, start, end), (other, other_start, other_end) in itertools.combinations(spans, 2):
        assert not (start < other_end and other_start < end and device == other), "two runs at once on one GPU"
    most_at_once = max(sum(start <= moment < end for _, start, end in spans) for _, moment, _ in spans)
    assert most_at_once <= gpus and (gpus == 1 or most_at_once > 1)


SIGTERM_RECORDED = (
    "import signal, sys, time; from pathlib import Path\n"
    "signal.signal(signal.SIGTERM, lambda *_: (Path(sys.argv[1]).write_text('checkpointed'), sys.exit(143)))\n"
    "Path(sys.argv[1] + '.started').write_text(''); time.sleep(60)"
)


def test_sigterm_to_the_launcher_stops_the_running_runs_with_sigterm_and_starts_no_other(tmp_path):
    runs = fake_runs(tmp_path, 3)
    marker = lambda run: tmp_path / f"{run.name}.marker"  # noqa: E731
    command = lambda run, slot: [sys.executable, "-c", SIGTERM_RECORDED, str(marker(run))]  # noqa: E731

    def terminate_once_both_run():
        while not all(marker(run).with_suffix(".marker.started").exists() for run in runs[:2]):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_both_run, daemon=True).start()
    assert launchers.run_locally(runs, ["0", "1"], command) == 143
    assert [marker(run).read_text() for run in runs[:2]] == ["checkpointed"] * 2
    assert not marker(runs[2]).with_suffix(".marker.started").exists()


# --- the same study on a real one-node SLURM cluster

ON_SLURM = ("--launcher", "slurm", "--gpus-per-run", "0")


def run_log(run_dir):
    return run_dir.parent / f"{run_dir.name}.log"


def run_pid(run_dir) -> int:
    return json.loads((run_dir / ".run.lock").read_text())["pid"]


def stop_after_first_checkpoint(run_dirs, timeout: float = 300) -> dict:
    """SIGSTOP each run's train.py once its first checkpoint is written, so that the test interrupts it after that
    checkpoint and before its end, however fast the machine; returns the PIDs."""
    stopped, deadline = {}, time.monotonic() + timeout
    while len(stopped) < len(run_dirs):
        assert time.monotonic() < deadline, f"no checkpoint-2 in {run_dirs} after {timeout} s"
        for run_dir in run_dirs:
            if run_dir not in stopped and (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
                stopped[run_dir] = run_pid(run_dir)
                os.kill(stopped[run_dir], signal.SIGSTOP)
        time.sleep(0.02)
    return stopped


def continue_once_terminated(pid: int, timeout: float = 60) -> None:
    """SIGCONT a stopped process once a SIGTERM waits for it (or something else has continued it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
        pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
        if pending & (1 << (signal.SIGTERM - 1)) or not status["State"].strip().startswith("T"):
            break
        time.sleep(0.02)
    os.kill(pid, signal.SIGCONT)


def release_when_requeued(cluster, task: str) -> None:
    """A requeued task waits (Reason=BeginTime) before it may start again; let it start now."""
    cluster.wait_until(task, lambda records: records[0].get("Reason") == "BeginTime", timeout=120)
    cluster.release(task)


def submissions(study_dir) -> list[dict]:
    return json.loads((study_dir / "study.json").read_text())["submissions"]


def wait_for_evaluation(cluster, study_dir) -> None:
    cluster.wait_for_states(submissions(study_dir)[-1]["evaluation"], "COMPLETED", "FAILED", timeout=900)


@ON_THE_LOCAL_STUDYS_WORKER
def test_on_slurm_the_study_survives_preemption_and_the_time_limit_and_ends_as_the_local_one(
    slurm_cluster, local_study, tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    study_dir = tmp_path / "lr"
    args = [*study_args(tiny_model_dir, data_dir, study_dir), *ON_SLURM]
    submitted = time.time()
    result = run_in_process("study.py", "seed=42,43", *args)
    assert result.returncode == 0, result.stderr
    (submission,) = submissions(study_dir)
    assert submission["runs"] == RUNS
    preempted, signalled = (study_dir / "runs" / name for name in RUNS[:2])
    first_step = wait_for_first_step(study_dir)
    print(f"\nsubmission to a first optimizer step on the test cluster: {first_step - submitted:.1f} s")
    pids = stop_after_first_checkpoint([preempted, signalled])
    status = run_in_process("study.py", "--output-dir", study_dir, "--status").stdout.splitlines()
    assert [line.split(" (")[0] for line in status[:4]] == [
        f"{name}: {state}" for name, state in zip(RUNS, ["running"] * 2 + ["queued"] * 2, strict=True)
    ]
    assert "at step 2 of 4" in status[0] and f"job {submission['array']}_3, pending" in status[3]

    array = submission["array"]
    slurm_cluster.run("scontrol", "requeue", f"{array}_0")  # preemption: SIGTERM, then back in the queue
    continue_once_terminated(pids[preempted])
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", f"{array}_1")  # the warning before the time limit
    continue_once_terminated(pids[signalled])
    for task in (f"{array}_0", f"{array}_1"):
        release_when_requeued(slurm_cluster, task)
    wait_for_evaluation(slurm_cluster, study_dir)
    print(f"2 x 2 tiny study on the test cluster: {time.time() - submitted:.1f} s")

    for name in RUNS:
        assert_same_adapter(local_study / "runs" / name, study_dir / "runs" / name)
    for run_dir in (preempted, signalled):
        log = run_log(run_dir).read_text()
        assert "SIGTERM: stopped at optimizer step" in log and "resuming from" in log
        assert len([line for line in log.splitlines() if line.startswith("# ") and " on " in line]) == 2
    assert "time limit near, checkpointed; requeued" in run_log(signalled).read_text()
    assert evaluated_runs(study_dir) == sorted(RUNS)
    assert "4 runs: 4 finished" in (study_dir / "report.md").read_text()

    again = run_in_process("study.py", "seed=42,43", *args)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len(submissions(study_dir)) == 1

    grown = run_in_process("study.py", "seed=42,43,44", *args, "learning_rate=1e-2,5e-3,-1")
    assert grown.returncode == 0, grown.stderr
    failing = [f"learning_rate=-1.0_seed{seed}" for seed in (42, 43, 44)]
    assert submissions(study_dir)[-1]["runs"] == ["learning_rate=0.01_seed44", "learning_rate=0.005_seed44", *failing]
    wait_for_evaluation(slurm_cluster, study_dir)
    status = run_in_process("study.py", "--output-dir", study_dir, "--status").stdout
    for name in failing:
        assert f"{name}: failed (" in status and "--learning-rate must not be negative" in status
    assert evaluated_runs(study_dir) == sorted([*RUNS, "learning_rate=0.01_seed44", "learning_rate=0.005_seed44"])
    assert "## Failed runs" in (study_dir / "report.md").read_text()


def wait_for_first_step(study_dir, timeout: float = 300) -> float:
    """When a run's train_log.jsonl first holds a record: its first optimizer step is done (time.time())."""
    deadline = time.monotonic() + timeout
    while not any(path.read_text().strip() for path in (study_dir / "runs").glob("*/train_log.jsonl")):
        assert time.monotonic() < deadline, f"no optimizer step in {study_dir} after {timeout} s"
        time.sleep(0.05)
    return time.time()


def test_a_runs_state_is_read_from_its_folder_and_log(tmp_path):
    run = Run(tmp_path, {"learning_rate": 0.01}, 42, {})
    assert run_state(run, {}).line() == "learning_rate=0.01_seed42: not started"
    assert run_state(run, {run.name: "job 7_1, pending"}).line().endswith("queued (job 7_1, pending)")
    (run.folder / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    run.log.write_text("optimizer steps: 12 at an effective batch of 8\nSIGTERM: stopped at optimizer step 6; ...\n")
    assert run_state(run, {}).line().endswith("interrupted (at checkpoint 6)")
    (run.folder / "train_log.jsonl").write_text('{"step": 5, "loss": 1.0}\n{"step": 7, "loss": 0.9}\n{"st')
    with output_dir_lock(run.folder, "train.py"):
        assert (
            run_state(run, {})
            .line()
            .endswith(f"running (at step 7 of 12; PID {os.getpid()} on {socket.gethostname()})")
        )
    with run.log.open("a") as log:
        log.write("  3%|#  | 1/12 [00:01<00:11]\rerror: the loss became NaN or infinite at optimizer step 7; ...\n")
    assert (
        run_state(run, {})
        .line()
        .endswith(f"failed ({run.log}: error: the loss became NaN or infinite at optimizer step 7; ...)")
    )
    for name in ("adapter_config.json", "training_summary.json"):
        (run.folder / name).write_text("{}")
    assert run_state(run, {}).state == "finished"


def test_the_job_scripts_carry_every_slurm_option_and_are_valid_bash(tmp_path):
    study = Study(tmp_path / "lr", {"learning_rate": [0.01, 0.005]}, ["learning_rate"], [42, 43], {}, {}, [])
    options = {
        "gpus_per_run": 2,
        "partition": "gpu",
        "time": "04:00:00",
        "account": "lab",
        "max_parallel": 2,
        "requeue": True,
        "signal_seconds": 300,
        "sbatch_args": ["--mem=64G", "--qos=high"],
    }
    array = launchers.array_job(study, study.runs(), options, tmp_path)
    evaluation = launchers.evaluation_job(study, options, tmp_path, [sys.executable, "study.py", "--evaluate-only"])
    directives = [line.removeprefix("#SBATCH ") for line in array.splitlines() if line.startswith("#SBATCH")]
    expected = ["--array=0-3%2", "--requeue", "--signal=B:USR1@300", "--gres=gpu:2", "--partition=gpu"]
    expected += ["--time=04:00:00", "--account=lab", "--mem=64G", "--qos=high"]
    assert set(expected) <= set(directives)
    assert "--gres=gpu:1" in evaluation and "--array" not in evaluation and "--mem=64G" in evaluation
    assert "-m torch.distributed.run --nproc_per_node 2" in array and array.count("--resume") == 4
    for arm in ("learning_rate=0.01", "learning_rate=0.005"):  # each seed's tracker run grouped by its arm
        assert array.count(f"env WANDB_RUN_GROUP={arm} {sys.executable}") == 2
    for name, text in (("train.sbatch", array), ("evaluate.sbatch", evaluation)):
        (tmp_path / name).write_text(text)
        assert subprocess.run(["bash", "-n", str(tmp_path / name)]).returncode == 0
