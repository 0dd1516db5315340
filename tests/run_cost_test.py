"""What a run cost: train.py's summary, model card and final line give throughput and peak memory; MFU on CUDA."""

import json

import pytest
import torch
from conftest import TINY_TRAINING_FLAGS, run_script

from lora_summarization import hardware, run_summary

STEPS = 4  # of 8 examples each


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_model_dir, data_dir):
    output_dir = tmp_path_factory.mktemp("cost") / "run"
    flags = ("--max-steps", STEPS, "--eval-steps", 2, "--save-steps", 2, "--logging-steps", 1, "--report-to", "none")
    result = run_script(
        "train.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", output_dir, *flags,
        *TINY_TRAINING_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def test_summary_card_and_final_line_report_throughput_and_peak_memory(short_run):
    output_dir, result = short_run
    summary = json.loads((output_dir / "training_summary.json").read_text())
    seconds = summary["training_step_seconds"]
    assert 0 < seconds < summary["runtime_seconds"]  # evaluation and the two checkpoints are not in it
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens_trained_on"] / seconds, rel=1e-3)
    assert summary["examples_per_second"] == pytest.approx(STEPS * 8 / seconds, rel=1e-3)
    (peak,) = summary["peak_memory_mib"]
    assert 100 < peak < 64 * 1024 and summary["peak_memory_measure"] == "peak resident set (VmHWM)"
    assert summary["mfu"] is None  # CPU
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert (
        f"| training throughput | {summary['examples_per_second']:,.2f} examples/s, "
        f"{summary['tokens_per_second']:,.0f} non-padding tokens/s over"
    ) in card
    assert f"| peak memory | {peak:,.0f} MiB (peak resident set (VmHWM)) |" in card
    assert "| model FLOPs utilisation | n/a |" in card
    final_line = result.stdout.strip().splitlines()[-1]
    assert final_line.startswith(f"adapter saved to {output_dir} after {STEPS} optimizer steps; ")
    assert (
        f"{summary['examples_per_second']:,.2f} examples/s, {summary['tokens_per_second']:,.0f} tokens/s" in final_line
    )
    assert f"peak memory {peak:,.0f} MiB" in final_line and final_line.endswith("MFU n/a")


def test_progress_bar_shows_tokens_per_second(short_run):
    _, result = short_run
    assert "tokens/s=" in result.stderr


def test_mfu_is_four_flops_per_parameter_and_token_over_the_listed_peak():
    # 4 x 1.5e9 parameters x 20,000 tokens/s = 1.2e14 FLOP/s, on 2 GPUs of 989.4 TFLOPS (H100 bf16).
    assert hardware.model_flops_utilization(1_500_000_000, 20_000, 989.4, devices=2) == pytest.approx(0.0606428, 1e-5)
    assert hardware.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert hardware.peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.2
    assert hardware.peak_tflops("Tesla T4", "fp32") is None


def test_train_py_mfu_names_the_gpu_it_ran_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "NVIDIA H100 80GB HBM3")  # no GPU here
    plan = {"device": "cuda", "precision": "bf16", "processes": 2, "trainable_parameters": 0}
    plan["base_parameters"] = 1_500_000_000
    assert run_summary.model_flops_utilization(plan, {"tokens_per_second": 20_000}) == 0.0606
    assert run_summary.model_flops_utilization({**plan, "device": "cpu"}, {"tokens_per_second": 20_000}) is None
