import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    QWEN_DIR,
    ROOT,
    TINY_TRAINING_FLAGS,
    load_script,
    requires_qwen_tokenizer,
    run_in_process,
    run_script,
    script_env,
)
from safetensors.torch import load_file

from lora_summarization import modeling, run_folder, run_lock, training
from lora_summarization.cli import UsageError, parse_config, run_stage
from lora_summarization.model_card import NOT_EVALUATED
from lora_summarization.prompts import encode_example
from lora_summarization.synthetic import make_examples

FAST = ("--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1")


def train_args(model_dir, data_dir, output_dir, *extra) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(output_dir), *extra]


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def planned_steps(stdout: str) -> int:
    return int(re.search(r"optimizer steps: ([\d,]+)", stdout).group(1).replace(",", ""))


def test_training_lowers_the_loss_and_writes_a_peft_adapter(trained_adapter_dir):
    summary = json.loads((trained_adapter_dir / "training_summary.json").read_text())
    assert summary["last_train_loss"] < 0.8 * summary["first_train_loss"]
    assert summary["last_validation_loss"] < summary["first_validation_loss"]
    assert summary["last_validation_content_loss"] < summary["first_validation_content_loss"]
    assert summary["optimizer_steps"] == 80
    assert summary["tokens_trained_on"] > 80 * 8 * 50
    assert summary["settings"]["lora_r"] == 8 and summary["precision"] == "fp32"
    config = json.loads((trained_adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert any(
        "lora_B" in name and weight.abs().sum() > 0 for name, weight in adapter_weights(trained_adapter_dir).items()
    )
    assert not list(trained_adapter_dir.glob("*.bin"))
    assert (trained_adapter_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (trained_adapter_dir / "tokenizer_config.json").exists()
    decoding = json.loads((trained_adapter_dir / "generation_config.json").read_text())
    assert decoding["do_sample"] is False and decoding.get("repetition_penalty", 1.0) == 1.0  # what evaluate.py scores
    card = (trained_adapter_dir / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and NOT_EVALUATED in card and "| `--learning-rate` | `0.01` |" in card
    assert run_folder.FINAL_STAGING not in card and not (trained_adapter_dir / run_folder.FINAL_STAGING).exists()
    assert list((trained_adapter_dir / "runs").glob("events.out.tfevents*"))
    log = [json.loads(line) for line in (trained_adapter_dir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "eval_loss" in entry] == [40, 80]


def test_dry_run_plans_the_steps_that_training_takes(tiny_model_dir, data_dir, tmp_path):
    config_only = tmp_path / "config_only"
    shutil.copytree(tiny_model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    schedule = ("--batch-size", "3", "--grad-accum", "2", "--epochs", "2")
    dry = run_in_process("train.py", *train_args(config_only, data_dir, tmp_path / "dry", "--dry-run", *schedule))
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "dry").exists()

    real = run_in_process("train.py", *train_args(tiny_model_dir, data_dir, tmp_path / "real", *schedule, *FAST))
    assert real.returncode == 0, real.stderr
    trained = json.loads((tmp_path / "real" / "training_summary.json").read_text())
    assert planned_steps(dry.stdout) == trained["optimizer_steps"] == 2 * 11  # 64 examples: 22 batches of 3 per epoch


@requires_qwen_tokenizer
def test_dry_run_on_the_real_qwen_config_counts_the_published_parameters(data_dir, tmp_path):
    result = run_in_process("train.py", *train_args(QWEN_DIR, data_dir, tmp_path / "out", "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "trainable parameters: 2,179,072 of 1,543,714,304 (0.14%)" in result.stdout


RESUME_SCHEDULE = ("--max-steps", "24", "--save-steps", "4", "--eval-steps", "1000", "--logging-steps", "1")


def assert_same_adapter(expected_dir, actual_dir):
    expected, actual = adapter_weights(expected_dir), adapter_weights(actual_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6), name


@pytest.fixture(scope="session")
def uninterrupted_dir(tiny_model_dir, data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_in_process(
        "train.py", *train_args(tiny_model_dir, data_dir, output_dir, *RESUME_SCHEDULE, *TINY_TRAINING_FLAGS)
    )
    assert result.returncode == 0, result.stderr
    return output_dir


def logged_steps(output_dir) -> int:
    log = output_dir / "train_log.jsonl"
    return sum('"loss"' in line for line in log.read_text().splitlines()) if log.exists() else 0


SLOWED = {"SECONDS_PER_CALL": "0.1"}  # so that a signal reliably lands in the middle of a tiny run


def interrupt(command: list[str], output_dir, number: int, ready) -> subprocess.CompletedProcess:
    """Start `command` slowed down, send signal `number` once `ready(output_dir)` holds, and collect its output."""
    env = {**script_env(), **SLOWED}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ready(output_dir) and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


INJECT = ROOT / "tests" / "fault_injection.py"


STOP_LINE = re.compile(r"stopped at optimizer step (\d+); checkpoint saved; continue with: (.*)")


# A SIGKILL mid-run and its resume: resume_test.py::test_the_log_of_a_killed_and_resumed_run_holds_each_step_once.
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=lambda n: n.name)
def test_an_interrupted_run_resumes_to_the_uninterrupted_adapter(
    tiny_model_dir, data_dir, tmp_path, uninterrupted_dir, number
):
    output_dir = tmp_path / "interrupted"
    flags = train_args(tiny_model_dir, data_dir, output_dir, *RESUME_SCHEDULE, *TINY_TRAINING_FLAGS)
    ready = lambda folder: logged_steps(folder) >= 2  # noqa: E731
    stopped = interrupt([sys.executable, str(INJECT), str(ROOT / "train.py"), *flags], output_dir, number, ready)
    assert not (output_dir / "adapter_model.safetensors").exists()
    assert stopped.returncode == 128 + number, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    step, command = STOP_LINE.search(stopped.stderr.strip().splitlines()[-1]).groups()
    assert training.latest_checkpoint(output_dir / "checkpoints").endswith(f"checkpoint-{step}")
    assert int(step) < 24
    launcher, script, *resume_flags = shlex.split(command)
    assert (launcher, script, resume_flags) == ("python", "train.py", [*flags, "--resume"])

    resumed = run_in_process("train.py", *resume_flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_same_adapter(uninterrupted_dir, output_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_SCHEDULE = ("--max-steps", "12", "--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1")


def torchrun_command(*script_and_args) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    return [*launcher, str(free_port()), *map(str, script_and_args)]


def run_torchrun(*script_and_args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(*script_and_args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**script_env(), **(env or {})},
    )


@pytest.fixture(scope="session")
def ddp_dir(tiny_model_dir, data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp")
    result = run_torchrun(ROOT / "train.py", *train_args(tiny_model_dir, data_dir, output_dir, *DDP_SCHEDULE))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_torchrun_with_two_cpu_processes_writes_one_adapter(ddp_dir):
    summary = json.loads((ddp_dir / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["optimizer_steps"] == 12
    assert len(list(ddp_dir.glob("adapter_model.safetensors"))) == 1
    log = [json.loads(line) for line in (ddp_dir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == list(range(1, 13))  # written once, by rank 0
    assert log[0]["epoch"] == 8 / 64  # each optimizer step consumed 8 examples across the two processes


def test_sigterm_under_torchrun_stops_both_processes_at_one_step_and_resumes_exactly(
    tiny_model_dir, data_dir, tmp_path, ddp_dir
):
    output_dir = tmp_path / "ddp_interrupted"
    flags = train_args(tiny_model_dir, data_dir, output_dir, *DDP_SCHEDULE)
    command = torchrun_command(INJECT, ROOT / "train.py", *flags)
    stopped = interrupt(command, output_dir, signal.SIGTERM, lambda folder: logged_steps(folder) >= 2)
    step = STOP_LINE.search(stopped.stderr).group(1)
    assert stopped.stderr.count("stopped at optimizer step") == 1  # rank 0 speaks for both
    assert training.latest_checkpoint(output_dir / "checkpoints").endswith(f"checkpoint-{step}")
    assert not (output_dir / "adapter_model.safetensors").exists()

    resumed = run_torchrun(ROOT / "train.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(ddp_dir, output_dir)


def test_nan_on_one_process_stops_both_at_the_same_step_without_saving(tiny_model_dir, data_dir, tmp_path):
    output_dir = tmp_path / "ddp_nan"
    flags = train_args(tiny_model_dir, data_dir, output_dir, *DDP_SCHEDULE, "--save-steps", "2")
    injected = {"NAN_ON_RANK": "1", "NAN_FROM_CALL": "9"}  # two micro-batches per step and process: step 5
    result = run_torchrun(INJECT, ROOT / "train.py", *flags, env=injected)
    assert result.returncode != 0
    assert "the loss became NaN or infinite at optimizer step 5" in result.stderr
    checkpoints = sorted(path.name for path in (output_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(output_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (output_dir / "adapter_model.safetensors").exists()


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys
):
    calls = {"n": 0}
    real_losses = training.response_token_losses

    def losses_turning_nan(*args):
        calls["n"] += 1
        losses = real_losses(*args)
        return losses * float("nan") if calls["n"] > 6 * 2 else losses  # from optimizer step 7 (2 micro-batches)

    monkeypatch.setattr(training, "response_token_losses", losses_turning_nan)
    train = load_script("train.py")
    output_dir = tmp_path / "nan"
    config = parse_config(train.TrainConfig, train_args(tiny_model_dir, data_dir, output_dir, *TINY_TRAINING_FLAGS))
    config.max_steps, config.save_steps, config.eval_steps = 20, 3, 1000
    assert train.main(config) == 1
    assert "optimizer step 7" in capsys.readouterr().err
    assert not (output_dir / "adapter_model.safetensors").exists()
    last_good = training.latest_checkpoint(output_dir / "checkpoints")
    assert last_good.endswith("checkpoint-6")
    weights = load_file(f"{last_good}/adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_memory_ends_with_one_line_of_advice(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_losses = training.response_token_losses

    def losses_running_out_of_memory(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of optimizer step 3
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_losses(*args)

    monkeypatch.setattr(training, "response_token_losses", losses_running_out_of_memory)
    train = load_script("train.py")
    output_dir = tmp_path / "oom"
    argv = train_args(tiny_model_dir, data_dir, output_dir, *TINY_TRAINING_FLAGS, "--max-steps", "6", *FAST)
    assert run_stage(train.main, train.TrainConfig, [*argv, "--save-steps", "2"]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    line = error.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: out of GPU memory in train.py at optimizer step 3 on a micro-batch of 4 examples x \d+ tokens; "
        r"try, in this order: --gradient-checkpointing; --precision bf16; --batch-size 2 --grad-accum 4; "
        r"the last complete checkpoint is .*checkpoint-2",
        line,
    ), line


def test_unreachable_hub_exits_2_with_one_line(data_dir, tmp_path):
    result = run_script("train.py", "--model", "Qwen/Qwen2.5-1.5B-Instruct", "--data-dir", data_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert "pass --model with a local copy" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, messages",
    [
        (("--report-to", "tensorboard,nonexistent"), ["--report-to nonexistent is unknown"]),
        (("--report-to", "comet_ml"), ["--report-to comet_ml needs its package installed"]),
        (
            ("--grad-accum", "0", "--precision", "fp8"),
            ["--grad-accum must be at least 1", "--precision must be one of"],
        ),
        (("--data-dir", "missing_data_dir"), ["run data_preparation.py first"]),
    ],
)
def test_bad_input_is_reported_as_a_usage_error(tiny_model_dir, data_dir, tmp_path, flags, messages, capsys):
    train = load_script("train.py")
    argv = train_args(tiny_model_dir, data_dir, tmp_path / "out") + list(flags)
    assert run_stage(train.main, train.TrainConfig, argv) == 2
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and all(message in last_line for message in messages)
    assert "Traceback" not in error


def test_several_gpus_without_torchrun_are_refused_before_loading(
    tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    train = load_script("train.py")
    assert run_stage(train.main, train.TrainConfig, train_args(tiny_model_dir, data_dir, tmp_path / "out")) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "4 GPUs are visible to one process" in message
    assert "torchrun --nproc_per_node 4 train.py" in message and "CUDA_VISIBLE_DEVICES=0" in message


def run_train(argv: list[str], capsys, **replacements) -> tuple[int, str, str]:
    """train.py in this process, as the command line would run it; `replacements` swap its module functions."""
    train = load_script("train.py")
    for name, replacement in replacements.items():
        setattr(train, name, replacement)
    code = run_stage(train.main, train.TrainConfig, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_lock(output_dir, pid: int) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    holder = {**run_lock.this_process("train.py"), "pid": pid, "start_time": run_lock.start_time(pid)}
    (output_dir / run_lock.LOCK_FILE).write_text(json.dumps(holder))


def test_a_folder_locked_by_a_live_run_is_refused_and_never_cleared(tiny_model_dir, data_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    write_lock(output_dir, os.getpid())  # this test's process is alive
    (output_dir / "train_log.jsonl").write_text("{}\n")
    argv = train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "2", "--overwrite-output-dir")
    code, _, err = run_train(argv, capsys)
    assert code == 2
    assert err == (
        f"error: --output-dir {output_dir} is used by a running train.py (PID {os.getpid()} on host "
        f"{socket.gethostname()}); wait for it or pass another --output-dir\n"
    )
    assert sorted(p.name for p in output_dir.iterdir()) == [run_lock.LOCK_FILE, "train_log.jsonl"]


def test_stale_lock_is_taken_over_and_a_used_folder_needs_overwrite(tiny_model_dir, data_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    finished = subprocess.Popen(["true"])
    finished.wait()
    write_lock(output_dir, finished.pid)
    argv = train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "2", *FAST)
    code, _, err = run_train(argv, capsys)
    assert code == 0, err
    assert f"taking over {output_dir / run_lock.LOCK_FILE} from train.py (PID {finished.pid}" in err
    assert not (output_dir / run_lock.LOCK_FILE).exists(), "the lock was not released"

    code, _, err = run_train(argv, capsys)
    assert code == 2
    assert err.startswith(f"error: --output-dir {output_dir} holds a previous run (checkpoints, train_log.jsonl, runs,")
    assert err.rstrip().endswith("pass --resume to continue it or --overwrite-output-dir to delete it first")
    assert err.count("\n") == 1

    (output_dir / "notes.txt").write_text("from the first run")
    code, out, err = run_train([*argv, "--max-steps", "3", "--overwrite-output-dir"], capsys)
    assert code == 0, err
    assert not (output_dir / "notes.txt").exists()
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3]  # not appended to the first run's
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-3"]


@pytest.fixture(scope="session")
def checkpointed_run(tmp_path_factory, tiny_model_dir, data_dir):
    """A 4-step run with checkpoints at steps 2 and 4, on its own copy of the data; copy it before changing it."""
    folder = tmp_path_factory.mktemp("checkpointed")
    shutil.copytree(data_dir, folder / "data")
    schedule = ("--max-steps", "4", "--save-steps", "2", "--eval-steps", "1000", *TINY_TRAINING_FLAGS)
    train = load_script("train.py")
    argv = train_args(tiny_model_dir, folder / "data", folder / "out", *schedule)
    assert run_stage(train.main, train.TrainConfig, [str(arg) for arg in argv]) == 0
    return folder, schedule


def copy_of(checkpointed_run, tmp_path):
    folder, schedule = checkpointed_run
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    return tmp_path / "data", tmp_path / "out", schedule


def test_resume_refuses_changed_settings_and_data_before_loading_the_model(
    checkpointed_run, tiny_model_dir, tmp_path, capsys
):
    data_copy, output_dir, schedule = copy_of(checkpointed_run, tmp_path)
    train_file = data_copy / "train_data.json"
    train_file.write_text(json.dumps(json.loads(train_file.read_text())[:-1]))
    changed = ("--learning-rate", "2e-2", "--batch-size", "2", "--grad-accum", "4")

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    argv = train_args(tiny_model_dir, data_copy, output_dir, *schedule, *changed, "--resume")
    code, _, err = run_train(argv, capsys, build_model=no_model)
    assert code == 2
    assert err == (
        "error: --resume: the checkpoint was made with other settings: --batch-size: checkpoint 4, now 2; "
        "--grad-accum: checkpoint 2, now 4; --learning-rate: checkpoint 0.01, now 0.02; "
        "train_data.json: changed since the checkpoint; pass --resume-anyway to continue regardless\n"
    )


def test_resume_allows_other_intervals_and_resume_anyway_records_what_it_overrode(
    checkpointed_run, tiny_model_dir, tmp_path, capsys
):
    data_copy, output_dir, schedule = copy_of(checkpointed_run, tmp_path)
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")  # so the resumed run trains steps 3 and 4
    argv = train_args(tiny_model_dir, data_copy, output_dir, *schedule, "--resume")
    code, out, err = run_train([*argv, "--eval-steps", "1", "--logging-steps", "3"], capsys)
    assert code == 0, err
    assert "resuming from" in out and "checkpoint-2" in out
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["optimizer_steps"] == 4 and summary["resume_overrides"] == []

    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")  # at the last step it would only be saved again
    code, _, err = run_train([*argv, "--lora-dropout", "0.1", "--resume-anyway"], capsys)
    assert code == 0, err
    assert "warning: --resume-anyway: continuing although --lora-dropout: checkpoint 0.05, now 0.1" in err
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["resume_overrides"] == ["--lora-dropout: checkpoint 0.05, now 0.1"]


@pytest.mark.parametrize(
    "changed", [("--learning-rate", "2e-2"), ("--weight-decay", "0.1"), ("--loraplus-lr-ratio", "4")]
)
def test_resume_anyway_refuses_what_the_checkpoints_optimizer_state_would_silently_undo(
    checkpointed_run, tiny_model_dir, tmp_path, capsys, changed
):
    """The optimizer's and scheduler's saved state restores the learning rates and weight decay on resume, so a
    new value would be recorded as trained but never used."""
    data_copy, output_dir, schedule = copy_of(checkpointed_run, tmp_path)
    argv = train_args(tiny_model_dir, data_copy, output_dir, *schedule, *changed, "--resume", "--resume-anyway")
    code, _, err = run_train(argv, capsys)
    assert code == 2
    assert only_error_line(err) == (
        f"error: --resume-anyway cannot change {changed[0]}: the checkpoint's optimizer and scheduler state restore "
        f"it; train with it from the start instead (--overwrite-output-dir, or another --output-dir)"
    )


def only_error_line(stderr: str) -> str:
    """The one `error:` line; progress bars may come before it on stderr, a traceback must not."""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert stderr.rstrip().endswith(line)
    return line


def test_bf16_on_a_gpu_without_bf16_is_refused_before_loading(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    code, _, err = run_train(train_args(tiny_model_dir, data_dir, tmp_path / "out", "--precision", "bf16"), capsys)
    assert code == 2
    assert err == (
        "error: --precision bf16 needs a GPU with bfloat16 support, which this one lacks; pass --precision fp32 "
        "(tf32 also needs an Ampere or newer GPU)\n"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--precision fp32"):  # the check unit_test.py and evaluate.py go through
        modeling.configure_precision("bf16")


def test_a_run_shorter_than_the_logging_interval_still_reports_its_train_loss(
    tiny_model_dir, data_dir, tmp_path, capsys
):
    output_dir = tmp_path / "out"
    argv = train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "2", *FAST, "--logging-steps", "10")
    code, _, err = run_train(argv, capsys)
    assert code == 0, err
    summary = json.loads((output_dir / "training_summary.json").read_text())
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert not [entry for entry in log if "loss" in entry] and log[-1]["train_loss"] > 0
    assert summary["last_train_loss"] == log[-1]["train_loss"]


def test_a_loss_without_a_token_count_is_still_scaled_for_accumulation(tiny_model_dir, tokenizer, tmp_path):
    """Some models take no loss kwargs, and the Trainer then passes no num_items_in_batch."""
    examples = [encode_example(tokenizer, ex["dialogue"], ex["summary"], 512) for ex in make_examples(4, seed=7)]
    batch = training.ResponseCollator(tokenizer.pad_token_id)(training.as_features(examples))
    model = modeling.apply_lora(modeling.load_base_model(str(tiny_model_dir)), 8, 16, 0.0, "q_proj,v_proj", False)
    args = training.core_training_arguments(output_dir=str(tmp_path), gradient_accumulation_steps=2)
    trainer = training.SummaryTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets for each optimizer step
    parameter = next(p for name, p in model.named_parameters() if "lora_B" in name)

    def accumulated_gradient(num_items_in_batch):
        model.zero_grad()
        for _ in range(2):  # the same micro-batch twice: its own token mean is the whole batch's
            trainer.training_step(model, batch, num_items_in_batch)
        return parameter.grad.clone()

    label_tokens = (batch["labels"][:, 1:] != -100).sum()
    assert torch.allclose(accumulated_gradient(None), accumulated_gradient(2 * label_tokens), atol=1e-6)


def test_torchrun_aimed_at_a_live_runs_folder_leaves_it_alone_and_refuses_once(tiny_model_dir, data_dir, tmp_path):
    output_dir = tmp_path / "live"
    flags = train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "10000", *FAST)
    live = subprocess.Popen(
        [sys.executable, str(INJECT), str(ROOT / "train.py"), *flags],
        cwd=ROOT,
        env={**script_env(), "SECONDS_PER_CALL": "0.5"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while logged_steps(output_dir) < 1:  # past its own folder checks, holding the lock
            assert live.poll() is None, "the live run ended early"
            time.sleep(0.1)
        incomplete = output_dir / "checkpoints" / training.CHECKPOINT_STAGING
        incomplete.mkdir(parents=True)
        (incomplete / "optimizer.pt").write_bytes(b"being written")
        second = run_torchrun(ROOT / "train.py", *flags)
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()
    output = second.stdout + second.stderr
    assert (incomplete / "optimizer.pt").read_bytes() == b"being written"
    assert output.count(f"error: --output-dir {output_dir} is used by a running train.py (PID {live.pid}") == 1
    assert output.count("Traceback") == 1  # torchrun's own, ending in its failure summary; none from a worker
    assert re.search(r"Traceback \(most recent call last\):\n(  .*\n)+torch\.\S*\.ChildFailedError", output)
    # Its summary lists every rank that had exited when it looked (the other may still be leaving): all with 2.
    assert set(re.findall(r"^\s+exitcode\s+: (\d+)", output, re.MULTILINE)) == {"2"}


def truncate(path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


@pytest.mark.parametrize("fault", ["missing model folder", "truncated train_data.json"])
def test_overwrite_output_dir_keeps_the_previous_run_when_the_model_or_data_fail_to_load(
    checkpointed_run, tiny_model_dir, tmp_path, capsys, fault
):
    data_copy, output_dir, schedule = copy_of(checkpointed_run, tmp_path)
    model_dir = tmp_path / "no_such_model" if fault == "missing model folder" else tiny_model_dir
    if fault == "truncated train_data.json":
        truncate(data_copy / "train_data.json")
    previous_run = sorted(path.relative_to(output_dir) for path in output_dir.rglob("*"))
    code, _, err = run_train(train_args(model_dir, data_copy, output_dir, *schedule, "--overwrite-output-dir"), capsys)
    assert code == 2
    assert only_error_line(err)
    assert sorted(path.relative_to(output_dir) for path in output_dir.rglob("*")) == previous_run


@requires_qwen_tokenizer
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot be used")
def test_a_large_model_without_a_usable_gpu_is_refused_before_its_weights_load(data_dir, tmp_path, capsys):
    code, _, err = run_train(train_args(QWEN_DIR, data_dir, tmp_path / "out"), capsys)  # QWEN_DIR holds no weights
    assert code == 2
    line = only_error_line(err)
    assert "1,543,714,304 parameters" in line and "nvidia-smi" in line and "torch.cuda.is_available()" in line
    assert line.endswith("or pass --allow-cpu to train on the CPU anyway")
    assert not (tmp_path / "out").exists()
    for flags in (["--dry-run"], ["--dry-run", "--allow-cpu"]):  # a plan needs no GPU; --allow-cpu passes the check
        code, out, err = run_train(train_args(QWEN_DIR, data_dir, tmp_path / "out", *flags), capsys)
        assert code == 0, err
        assert "device: cpu" in out
