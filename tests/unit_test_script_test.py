"""unit_test.py, the pipeline smoke test: it must pass when learning works and fail when it cannot."""

import json
import math
import os

import pytest
import torch
from conftest import load_script, run_in_process, run_script

from lora_summarization import run_lock
from lora_summarization.cli import run_stage

SMOKE = ("--steps", "30", "--batch-size", "4")


def test_smoke_test_passes_on_learnable_data(tiny_model_dir, data_dir, tmp_path):
    output_dir = tmp_path / "finetune_100_model"
    args = ("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", output_dir, *SMOKE)
    result = run_script("unit_test.py", *args, "--learning-rate", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("PASSED")
    report = json.loads((output_dir / "unit_test_report.json").read_text())
    assert report["verdict"] == "PASSED" and report["steps"] == 30
    before, after = report["held_out_content_loss_before"], report["held_out_content_loss_after"]
    assert after < before * (1 - report["min_improvement"])
    # The response loss also counts the fixed "Summary:" prefix, so it differs from the content loss.
    assert report["held_out_response_loss_before"] != pytest.approx(before, abs=1e-3)
    assert (report["train_examples"], report["held_out_examples"]) == (32, 8)  # 80/20 of 40 unit-test examples
    assert (output_dir / "adapter_model.safetensors").exists()


def test_smoke_test_fails_when_nothing_is_learned(tiny_model_dir, data_dir, tmp_path, capsys):
    unit_test = load_script("unit_test.py")
    output_dir = tmp_path / "finetune_100_model"
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--output-dir", str(output_dir), *SMOKE]
    output_dir.mkdir()
    (output_dir / "train_log.jsonl").write_text('{"step": 999, "loss": 1.0}\n')  # a previous run's log
    assert run_stage(unit_test.main, unit_test.UnitTestConfig, [*argv, "--learning-rate", "0"]) == 1
    assert capsys.readouterr().out.strip().endswith("FAILED")
    report = json.loads((output_dir / "unit_test_report.json").read_text())
    assert report["verdict"] == "FAILED"
    assert report["held_out_content_loss_after"] == report["held_out_content_loss_before"]
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert log and all(entry["step"] <= 30 for entry in log), "the previous run's log was appended to"
    assert not (output_dir / run_lock.LOCK_FILE).exists()


def test_a_folder_in_use_by_a_running_smoke_test_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    unit_test = load_script("unit_test.py")
    output_dir = tmp_path / "finetune_100_model"
    output_dir.mkdir()
    (output_dir / run_lock.LOCK_FILE).write_text(json.dumps(run_lock.this_process("unit_test.py")))
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--output-dir", str(output_dir)]
    assert run_stage(unit_test.main, unit_test.UnitTestConfig, argv) == 2
    assert f"is used by a running unit_test.py (PID {os.getpid()} on host" in capsys.readouterr().err


def test_smoke_test_in_bf16_reports_finite_losses(tiny_model_dir, data_dir, tmp_path):
    output_dir = tmp_path / "finetune_100_model"
    args = ("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", output_dir, *SMOKE)
    result = run_in_process("unit_test.py", *args, "--learning-rate", "1e-2", "--precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output_dir / "unit_test_report.json").read_text())
    assert report["settings"]["precision"] == "bf16"
    assert all(math.isfinite(report[key]) for key in report if key.startswith("held_out_"))
    assert (output_dir / "adapter_model.safetensors").exists()


def test_several_gpus_are_pinned_to_one_before_anything_runs(tmp_path, monkeypatch, capsys):
    unit_test = load_script("unit_test.py")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    argv = ["--data-dir", str(tmp_path / "no_data"), "--output-dir", str(tmp_path / "out")]
    assert run_stage(unit_test.main, unit_test.UnitTestConfig, argv) == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # the Trainer then sees one GPU, not DataParallel over two
    assert "2 GPUs visible; this single process uses one of them" in capsys.readouterr().out
