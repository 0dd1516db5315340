"""The benchmark scripts the README quotes run end to end at the smallest size and print their JSON.

Speed is never asserted here (benchmarks/README.md holds the measurements); this only keeps the scripts
working as the code they time changes.
"""

import json
import subprocess
import sys

from conftest import ROOT, requires_qwen_tokenizer, script_env


def run_benchmark(script: str, *flags) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *flags]
    result = subprocess.run(command, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@requires_qwen_tokenizer
def test_training_throughput_benchmark_compares_the_project_with_the_published_step():
    flags = ("--steps", "1", "--repeats", "1", "--corpus-size", "64", "--peak-tflops", "10")
    report = run_benchmark("train_throughput.py", *flags)
    assert (report["baseline"]["micro_batch"], report["baseline"]["grad_accum"]) == (2, 4)
    for variant in ("baseline", "project"):  # MFU against the given peak; the reserved peak exists on a GPU only
        assert 0 < report[variant]["mfu"] < 1 and report[variant]["peak_memory_reserved_mib"] is None
    assert report["project"]["micro_batch"] * report["project"]["grad_accum"] == 8
    assert report["project"]["padded_tokens_per_example"] < 512 == report["baseline"]["padded_tokens_per_example"]
    assert all(value > 0 for value in report["ratios"].values())


@requires_qwen_tokenizer
def test_generation_throughput_benchmark_times_both_ways_on_the_same_prompts():
    flags = ("--examples", "4", "--repeats", "1", "--max-new-tokens", "4", "--batch-size", "4")
    report = run_benchmark("eval_throughput.py", *flags)
    assert set(report["seconds_per_run"]) == {"one_at_a_time", "batched"}
    assert report["examples"] == 4 and report["ratio_batched_vs_one_at_a_time"] > 0
