"""Generation throughput: evaluation's batched greedy generation against one summary at a time.

    python benchmarks/eval_throughput.py                                   # proxy model, ~1.5 min on 2 CPU cores
    python benchmarks/eval_throughput.py --model qwen2.5-1.5b --examples 8 --repeats 1

Both ways call `evaluation.generate_summaries` (greedy, KV cache, prompts sorted by length, left
padding) on the same SAMSum-shaped prompts: once with --batch-size, once with batch size 1. The model
has random weights, so it never emits <|im_end|> early and every summary is exactly --max-new-tokens
long (32 by default: a SAMSum summary with its `Summary:` prefix is ~25 tokens). Runs are interleaved;
medians are reported, with the best runs beside them (other work on a shared machine only slows a run down).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable
from benchmarks import workload  # noqa: E402
from lora_summarization import evaluation, modeling, synthetic  # noqa: E402
from lora_summarization.cli import UsageError, run_stage  # noqa: E402


@dataclass
class EvalBenchConfig:
    model: str = field(default="proxy", metadata={"help": "proxy (Qwen2, real vocabulary, small body) or qwen2.5-1.5b"})
    tokenizer: str = field(default=str(workload.QWEN_DIR), metadata={"help": "Qwen2.5 tokenizer and config folder"})
    examples: int = field(default=32, metadata={"help": "summaries generated per run"})
    batch_size: int = field(default=16, metadata={"help": "prompts per batch in the batched run"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per summary"})
    precision: str = field(default="fp32", metadata={"help": "fp32, tf32 or bf16"})
    repeats: int = field(default=3, metadata={"help": "runs of each way, interleaved; medians are reported"})
    seed: int = field(default=42, metadata={"help": "seed for the dialogues and the weights"})


def validate(config: EvalBenchConfig) -> None:
    problems = []
    if config.model not in workload.MODELS:
        problems.append(f"--model must be one of {', '.join(workload.MODELS)}")
    if config.precision not in modeling.PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(modeling.PRECISIONS)}")
    if min(config.examples, config.batch_size, config.max_new_tokens, config.repeats) < 1:
        problems.append("--examples, --batch-size, --max-new-tokens and --repeats must be at least 1")
    if problems:
        raise UsageError("; ".join(problems))


def samsum_like_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    records = synthetic.make_examples(n, seed=seed, realistic_lengths=True)
    return evaluation.encode_test_set(tokenizer, records, max_length=512, system_prompt=None).prompts


def seconds_to_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> float:
    workload.synchronize(model.device)
    started = time.perf_counter()
    evaluation.generate_summaries(model, tokenizer, prompts, max_new_tokens, batch_size, name=f"batch {batch_size}")
    workload.synchronize(model.device)
    return time.perf_counter() - started


def seconds_both_ways(model, tokenizer, prompts: list[list[int]], config: EvalBenchConfig) -> dict[str, list[float]]:
    """Seconds per run, one at a time and batched, interleaved, after a short warm-up."""
    seconds_to_generate(model, tokenizer, prompts[: config.batch_size], 4, config.batch_size)
    seconds = {"one_at_a_time": [], "batched": []}
    for _ in range(config.repeats):
        for way, batch_size in (("one_at_a_time", 1), ("batched", config.batch_size)):
            seconds[way].append(seconds_to_generate(model, tokenizer, prompts, config.max_new_tokens, batch_size))
    return seconds


def report(config: EvalBenchConfig, device, source: str, prompts: list[list[int]], seconds: dict) -> dict:
    rates = {way: config.examples / statistics.median(runs) for way, runs in seconds.items()}
    best_rates = {way: config.examples / min(runs) for way, runs in seconds.items()}  # the least disturbed runs
    return {
        "model": config.model,
        "device": workload.describe_device(device),
        "tokenizer": source,
        "precision": config.precision,
        "examples": config.examples,
        "mean_prompt_tokens": round(statistics.mean(len(prompt) for prompt in prompts), 1),
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "summaries_per_s": {way: round(rate, 3) for way, rate in rates.items()},
        "summaries_per_s_best": {way: round(rate, 3) for way, rate in best_rates.items()},
        "seconds_per_run": {way: [round(s, 2) for s in runs] for way, runs in seconds.items()},
        "ratio_batched_vs_one_at_a_time": round(rates["batched"] / rates["one_at_a_time"], 2),
        "ratio_best": round(best_rates["batched"] / best_rates["one_at_a_time"], 2),
    }


def main(config: EvalBenchConfig) -> int:
    validate(config)
    source, tokenizer = workload.load_qwen_tokenizer(config.tokenizer)
    prompts = samsum_like_prompts(tokenizer, config.examples, config.seed)
    device = workload.device()
    dtype = modeling.configure_precision(config.precision)
    model = workload.random_weight_lora_model(config.model, source, dtype, device, config.seed).eval()
    seconds = seconds_both_ways(model, tokenizer, prompts, config)
    workload.print_json(report(config, device, source, prompts, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, EvalBenchConfig))
