"""The benchmark scripts the README quotes run end to end at the smallest size and print their JSON.

Speed is never asserted here (benchmarks/README.md holds the measurements); this only keeps the scripts
working as the code they time changes.
"""

import io
import json
from contextlib import redirect_stdout

from conftest import requires_qwen_tokenizer

from benchmarks import eval_throughput, train_throughput
from lora_summarization.cli import run_stage


def run_benchmark(script, config_class, *flags) -> dict:
    """The script's entry point in this process (the seconds of a new process's imports prove nothing here)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_stage(script.main, config_class, list(flags)) == 0
    return json.loads(out.getvalue())


@requires_qwen_tokenizer
def test_training_throughput_benchmark_compares_the_project_with_the_published_step():
    flags = ("--steps", "1", "--repeats", "1", "--corpus-size", "64", "--peak-tflops", "10")
    report = run_benchmark(train_throughput, train_throughput.TrainBenchConfig, *flags)
    assert (report["baseline"]["micro_batch"], report["baseline"]["grad_accum"]) == (2, 4)
    for variant in ("baseline", "project"):  # MFU against the given peak; the reserved peak exists on a GPU only
        assert 0 < report[variant]["mfu"] < 1 and report[variant]["peak_memory_reserved_mib"] is None
    assert report["project"]["micro_batch"] * report["project"]["grad_accum"] == 8
    assert report["project"]["padded_tokens_per_example"] < 512 == report["baseline"]["padded_tokens_per_example"]
    assert all(value > 0 for value in report["ratios"].values())


@requires_qwen_tokenizer
def test_generation_throughput_benchmark_times_both_ways_on_the_same_prompts():
    flags = ("--examples", "4", "--repeats", "1", "--max-new-tokens", "4", "--batch-size", "4")
    report = run_benchmark(eval_throughput, eval_throughput.EvalBenchConfig, *flags)
    assert set(report["seconds_per_run"]) == {"one_at_a_time", "batched"}
    assert report["examples"] == 4 and report["ratio_batched_vs_one_at_a_time"] > 0
