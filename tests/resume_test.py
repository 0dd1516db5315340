"""Stopping and resuming train.py for real: signals to a real subprocess, a kill in the final save, GNU timeout."""

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, TINY_TRAINING_FLAGS, run_in_process, script_env
from train_test import INJECT, STOP_LINE, assert_same_adapter, logged_steps, train_args

from lora_summarization import run_folder, run_lock, training

# A constant learning rate, so that a step past the last one would change the adapter as much as any other.
SCHEDULE = ("--max-steps", "6", "--save-steps", "3", "--lr-scheduler", "constant", "--eval-steps", "1000")
FLAGS = (*SCHEDULE, "--logging-steps", "1", *TINY_TRAINING_FLAGS)


@pytest.fixture(scope="session")
def uninterrupted_dir(tiny_model_dir, data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_in_process("train.py", *train_args(tiny_model_dir, data_dir, output_dir, *FLAGS))
    assert result.returncode == 0, result.stderr
    return output_dir


def start(command: list[str], **env) -> subprocess.Popen:
    """`command` with fault_injection.py's settings in `env` (SECONDS_PER_CALL, SECONDS_BEFORE_PUBLISH)."""
    env = {**script_env(), **env}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def injected_train(flags: list[str]) -> list[str]:
    return [sys.executable, str(INJECT), str(ROOT / "train.py"), *flags]


def wait_until(process: subprocess.Popen, ready) -> None:
    while not ready() and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def checkpoint_names(output_dir) -> list[str]:
    return sorted(path.name for path in (output_dir / "checkpoints").glob("checkpoint-*"))


def assert_finished_like(uninterrupted_dir, output_dir):
    assert_same_adapter(uninterrupted_dir, output_dir)
    assert json.loads((output_dir / "training_summary.json").read_text())["optimizer_steps"] == 6
    assert checkpoint_names(output_dir) == ["checkpoint-3", "checkpoint-6"]


def resume_from_stop_line(stopped: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Run the `--resume` command that the stopped run printed."""
    step, command = STOP_LINE.search(stopped.stderr).groups()
    launcher, script, *flags = shlex.split(command)
    assert (launcher, script) == ("python", "train.py")
    return run_in_process("train.py", *flags)


def test_resuming_a_finished_run_says_so_and_trains_nothing(tiny_model_dir, data_dir, uninterrupted_dir, tmp_path):
    output_dir = tmp_path / "finished"
    shutil.copytree(uninterrupted_dir, output_dir)
    resumed = run_in_process("train.py", *train_args(tiny_model_dir, data_dir, output_dir, *FLAGS), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{output_dir} already holds the adapter of the last step (6); nothing to train" in resumed.stdout
    assert_finished_like(uninterrupted_dir, output_dir)


def test_sigterm_on_the_last_step_then_the_printed_command_saves_the_last_checkpoint(
    tiny_model_dir, data_dir, uninterrupted_dir, tmp_path
):
    output_dir = tmp_path / "stopped_last"
    process = start(injected_train(train_args(tiny_model_dir, data_dir, output_dir, *FLAGS)), SECONDS_PER_CALL="0.3")
    wait_until(process, lambda: logged_steps(output_dir) >= 5)  # step 6 is in progress
    process.send_signal(signal.SIGTERM)
    stopped = finish(process)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert STOP_LINE.search(stopped.stderr).group(1) == "6"

    resumed = resume_from_stop_line(stopped)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "adapter saved to" in resumed.stdout
    assert_finished_like(uninterrupted_dir, output_dir)


def test_sigkill_in_the_final_save_then_resume_saves_the_last_checkpoint(
    tiny_model_dir, data_dir, uninterrupted_dir, tmp_path
):
    output_dir = tmp_path / "killed_saving"
    flags = train_args(tiny_model_dir, data_dir, output_dir, *FLAGS)
    process = start(injected_train(flags), SECONDS_BEFORE_PUBLISH="60")
    wait_until(process, lambda: (output_dir / run_folder.FINAL_STAGING / "training_summary.json").exists())
    process.send_signal(signal.SIGKILL)
    assert finish(process).returncode == -signal.SIGKILL
    assert not (output_dir / "adapter_model.safetensors").exists()

    resumed = run_in_process("train.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_finished_like(uninterrupted_dir, output_dir)


def loss_records(output_dir) -> list[tuple[int, float]]:
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return [(entry["step"], entry["loss"]) for entry in log if "loss" in entry]


def test_the_log_of_a_killed_and_resumed_run_holds_each_step_once(
    tiny_model_dir, data_dir, uninterrupted_dir, tmp_path
):
    output_dir = tmp_path / "killed"
    flags = train_args(tiny_model_dir, data_dir, output_dir, *FLAGS)
    process = start(injected_train(flags), SECONDS_PER_CALL="0.1")
    wait_until(process, lambda: logged_steps(output_dir) >= 5)  # steps 4 and 5 logged after checkpoint-3
    process.send_signal(signal.SIGKILL)
    assert finish(process).returncode == -signal.SIGKILL

    resumed = run_in_process("train.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint-3" in resumed.stdout
    records, expected = loss_records(output_dir), loss_records(uninterrupted_dir)
    assert [step for step, _ in records] == [step for step, _ in expected] == list(range(1, 7))
    assert [loss for _, loss in records] == pytest.approx([loss for _, loss in expected], abs=1e-5)
    assert_finished_like(uninterrupted_dir, output_dir)  # and the same adapter as the run that was never killed


def assert_stopped_with_a_checkpoint(stopped: subprocess.CompletedProcess, output_dir) -> str:
    """One stop message, the checkpoint it names, the lock released; returns the step."""
    assert stopped.stderr.count("stopped at optimizer step") == 1, stopped.stderr[-3000:]
    step = STOP_LINE.search(stopped.stderr).group(1)
    assert training.latest_checkpoint(output_dir / "checkpoints").endswith(f"checkpoint-{step}")
    assert not (output_dir / run_lock.LOCK_FILE).exists(), "the lock was not released"
    return step


def test_two_sigterms_a_few_milliseconds_apart_stop_once_with_a_checkpoint(
    tiny_model_dir, data_dir, uninterrupted_dir, tmp_path
):
    output_dir = tmp_path / "two_sigterms"
    process = start(injected_train(train_args(tiny_model_dir, data_dir, output_dir, *FLAGS)), SECONDS_PER_CALL="0.1")
    wait_until(process, lambda: logged_steps(output_dir) >= 1)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.005)  # as GNU timeout, SLURM or torchrun deliver them
    process.send_signal(signal.SIGTERM)
    stopped = finish(process)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert_stopped_with_a_checkpoint(stopped, output_dir)

    resumed = resume_from_stop_line(stopped)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_adapter(uninterrupted_dir, output_dir)


def test_gnu_timeout_stops_the_run_with_a_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """GNU timeout sends its signal to the command and then again to its whole process group: two SIGTERMs."""
    output_dir = tmp_path / "timed_out"
    flags = train_args(tiny_model_dir, data_dir, output_dir, *FLAGS)
    process = start(["timeout", "-s", "TERM", "600", *injected_train(flags)], SECONDS_PER_CALL="0.1")
    wait_until(process, lambda: logged_steps(output_dir) >= 1)
    process.send_signal(signal.SIGALRM)  # what timeout's own timer sends it when the time is up
    stopped = finish(process)
    assert stopped.returncode == 124, stopped.stderr[-3000:]  # timeout's code for "the command timed out"
    assert "SIGTERM: stopped at optimizer step" in stopped.stderr
    assert int(assert_stopped_with_a_checkpoint(stopped, output_dir)) < 6


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint_and_resume_starts_afresh(
    uninterrupted_dir, tiny_model_dir, data_dir, tmp_path
):
    output_dir = tmp_path / "two_ctrl_c"
    process = start(injected_train(train_args(tiny_model_dir, data_dir, output_dir, *FLAGS)), SECONDS_PER_CALL="0.3")
    wait_until(process, lambda: logged_steps(output_dir) >= 1)  # step 2 in progress, no checkpoint yet
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stopped = finish(process)
    assert stopped.returncode == 128 + signal.SIGINT
    assert "stopped at optimizer step" not in stopped.stderr
    assert training.latest_checkpoint(output_dir / "checkpoints") is None
    assert_resume_starts_afresh(uninterrupted_dir, output_dir, train_args(tiny_model_dir, data_dir, output_dir, *FLAGS))


def assert_resume_starts_afresh(uninterrupted_dir, output_dir, flags: list[str]) -> None:
    """A run killed before its first checkpoint continues with the one command a requeued job repeats: --resume."""
    assert (output_dir / "train_log.jsonl").exists()  # a fresh command is refused: the folder holds a previous run
    resumed = run_in_process("train.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume: no checkpoint in {output_dir / 'checkpoints'} yet; starting afresh" in resumed.stdout
    assert_finished_like(uninterrupted_dir, output_dir)
    assert logged_steps(output_dir) == 6  # the killed run's log lines were cleared, not appended to


def test_resume_of_a_folder_with_an_adapter_but_no_checkpoint_is_refused(uninterrupted_dir, tmp_path):
    """Starting afresh there would delete a finished adapter: one line, exit 2, nothing deleted."""
    output_dir = shutil.copytree(uninterrupted_dir, tmp_path / "no_checkpoints")
    shutil.rmtree(output_dir / "checkpoints")
    before = sorted(path.name for path in output_dir.iterdir())
    settings = yaml.safe_load((output_dir / "train_config.yaml").read_text())
    result = run_in_process(
        "train.py", "--config", output_dir / "train_config.yaml", "--output-dir", output_dir, "--resume"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --resume: {output_dir} holds an adapter (adapter_config.json, adapter_model.safetensors) but no "
        "checkpoint to continue from; pass --overwrite-output-dir to train it again from the start"
    ]
    assert sorted(path.name for path in output_dir.iterdir()) == before
    assert settings["output_dir"] == str(uninterrupted_dir) and "resume" not in settings


def test_a_run_reruns_exactly_from_the_config_file_it_wrote(uninterrupted_dir, tmp_path):
    again = tmp_path / "again"
    result = run_in_process("train.py", "--config", uninterrupted_dir / "train_config.yaml", "--output-dir", again)
    assert result.returncode == 0, result.stderr
    assert_finished_like(uninterrupted_dir, again)
