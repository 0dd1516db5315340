"""What a run cost: train.py's summary, model card and final line give throughput and peak memory; MFU on CUDA."""

import json

import pytest
import torch
from conftest import TINY_TRAINING_FLAGS, build_fallback_tokenizer, run_in_process, run_script, save_tiny_model
from torch.utils import flop_counter

from lora_summarization import hardware, run_summary
from lora_summarization.training import SummaryTrainer

STEPS = 4  # of 8 examples each


@pytest.fixture(scope="session")
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
    assert summary["peak_memory_reserved_mib"] is None  # a GPU's allocator only
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


# FlopCounterMode has formulas for the GPU kernels of scaled_dot_product_attention, not the CPU's; its arguments
# come in the same order, so torch's own formulas (unwrapped: FlopCounterMode wraps them again) count it.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,
}


def test_the_summary_counts_the_flops_that_the_training_steps_compute(tmp_path, data_dir, monkeypatch):
    """training_flops against torch's FlopCounterMode over every training step of a train.py run (forward and
    backward), on a model whose matrix products are mostly its body, as in Qwen2.5-1.5B: a 600-token vocabulary,
    width 256, 8 layers. One example per micro-batch, so nothing is padded: padding is computed but not counted."""
    model_dir = save_tiny_model(tmp_path / "model", build_fallback_tokenizer(), hidden_size=256, layers=8)
    counted = []

    def counted_training_step(trainer, *args, **kwargs):
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            loss = training_step(trainer, *args, **kwargs)
        counted.append(counter.get_total_flops())
        return loss

    training_step = SummaryTrainer.training_step
    monkeypatch.setattr(SummaryTrainer, "training_step", counted_training_step)
    flags = ("--max-steps", 2, "--batch-size", 1, "--grad-accum", 4, "--eval-examples", 2, "--report-to", "none")
    result = run_in_process(
        "train.py", "--model", model_dir, "--data-dir", data_dir, "--output-dir", tmp_path / "run", *flags
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert len(counted) == 8
    assert summary["model_flops"] == pytest.approx(sum(counted), rel=0.05)


def test_training_flops_count_the_body_lora_attention_and_the_head_where_it_runs():
    # Qwen2.5-1.5B with the default adapter, on one 205-token example with 29 label tokens.
    shape = hardware.ModelShape(
        frozen_linear_weights=1_310_195_712,
        trainable_linear_weights=2_179_072,
        attention_width=28 * 12 * 128,
        lm_head_weights=151_936 * 1536,
    )
    flops = hardware.training_flops(shape, tokens=205, squared_lengths=205**2, lm_head_positions=29)
    body = 4 * 1_310_195_712 * 205 + 6 * 2_179_072 * 205
    assert flops == body + 12 * 43_008 * 205**2 + 4 * 233_373_696 * 29
    old_formula = 4 * (2_179_072 + 1_543_714_304) * 205  # 4 x (trainable + base parameters) x tokens
    assert 1.10 < old_formula / flops < 1.15
    assert hardware.model_flops_utilization(2e15, 10.0, 989.4, devices=2) == pytest.approx(2e14 / 1978.8e12)


@pytest.mark.parametrize(
    ("cuda_name", "listed_as"),
    [
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
    ],
)
def test_each_gpu_gets_its_own_peak_not_its_familys(cuda_name, listed_as):
    for precision in ("fp32", "tf32", "bf16"):
        assert hardware.peak_tflops(cuda_name, precision) == hardware.PEAK_TFLOPS[listed_as][precision]
    assert hardware.peak_tflops("NVIDIA H100 NVL", "bf16") < hardware.peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    assert hardware.peak_tflops("Tesla T4", "fp32") is None


def test_train_py_mfu_names_the_gpu_it_ran_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "NVIDIA H100 NVL")  # no GPU here
    plan = {"device": "cuda", "precision": "bf16", "processes": 2}
    this_run = {"model_flops": 3.342e15, "training_step_seconds": 4.0}
    assert run_summary.model_flops_utilization(plan, this_run) == 0.5  # 3.342e15 / 4 s / (2 x 835.5 TFLOPS)
    assert run_summary.model_flops_utilization({**plan, "device": "cpu"}, this_run) is None


def test_the_closing_line_gives_the_reserved_peak_beside_the_allocated_one_on_a_gpu():
    this_run = {"examples_per_second": 3.5, "tokens_per_second": 700.0, "peak_memory_mib": [10_000.0, 10_100.0]}
    this_run |= {"peak_memory_reserved_mib": [12_000.0, 12_500.0], "peak_memory_measure": "CUDA max_memory_allocated"}
    line = run_summary.cost_line(this_run, 0.41)
    assert "peak memory 10,000, 10,100 MiB (CUDA max_memory_allocated; reserved 12,000, 12,500 MiB), MFU 41.0%" in line
