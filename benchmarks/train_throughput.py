"""Training throughput: the project's training step against the published recipe's, on the same examples.

    python benchmarks/train_throughput.py                        # proxy, project at 8 x 1: ~3 min on 2 CPU cores
    python benchmarks/train_throughput.py --batch-size 1 --grad-accum 8
    python benchmarks/train_throughput.py --model qwen2.5-1.5b --steps 2 --repeats 2 --batch-size 1 --grad-accum 8
    python benchmarks/train_throughput.py --model qwen2.5-1.5b --precision bf16   # on a GPU; --peak-tflops if unlisted

The 1.5B run takes ~20 min on 2 CPU cores and ~18 GB of RAM; in fp32 its longest 8 x 512 micro-batch
would need ~35 GB, so use micro-batch 1 or 2 on a CPU.

The project's step is the real code path: optimizer steps drawn from one length-grouped epoch over a
SAMSum-shaped synthetic training set (LengthGroupedEpochSampler), each micro-batch right-padded to
its own longest example (ResponseCollator), the LM head only on labelled positions (model_hidden_states +
response_token_losses), the loss normalised over the label tokens of the accumulated batch.
The baseline is written the published way: every example padded to 512, the loss over every non-pad
position (prompt included) from full 151,936-way logits, micro-batch 2 x accumulation 4, always fp32.
Both train the same examples (8 per optimizer step), AdamW on the LoRA parameters with clipping at 1.0,
each variant in its own process (repeats interleaved; medians reported). The warm-up micro-batch is each
variant's first one; the length-grouped sampler puts the longest examples first, so the peak memory
measured is the peak of a whole epoch. Peak memory: CUDA max_memory_allocated (and max_memory_reserved, what
nvidia-smi shows), or on the CPU the peak resident set (VmHWM, reset after the model is loaded); "training memory"
is the peak minus the memory after loading. On CUDA the output adds model FLOPs utilisation: the model FLOPs of the
timed steps (hardware.training_flops: non-pad tokens, attention over each example's length, the LM head where the
variant's loss needs it) per second over the GPU's dense peak.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable
from benchmarks import workload  # noqa: E402
from lora_summarization import hardware, modeling, training  # noqa: E402
from lora_summarization.cli import UsageError, run_stage  # noqa: E402
from lora_summarization.prompts import IGNORE_INDEX  # noqa: E402

PUBLISHED_BATCH, PUBLISHED_GRAD_ACCUM, PUBLISHED_LENGTH = 2, 4, 512
EFFECTIVE_BATCH = PUBLISHED_BATCH * PUBLISHED_GRAD_ACCUM
LEARNING_RATE, MAX_GRAD_NORM = 5e-5, 1.0
SAMSUM_TRAIN_EXAMPLES, EPOCHS = 14_731, 3
IndexStep = list[list[int]]  # an optimizer step: micro-batches of example indices
MicroBatch = list[dict]  # features: input_ids and labels
Step = list[MicroBatch]


@dataclass
class TrainBenchConfig:
    model: str = field(default="proxy", metadata={"help": "proxy (Qwen2, real vocabulary, small body) or qwen2.5-1.5b"})
    tokenizer: str = field(default=str(workload.QWEN_DIR), metadata={"help": "Qwen2.5 tokenizer and config folder"})
    steps: int = field(default=4, metadata={"help": "timed optimizer steps per run (8 examples each)"})
    batch_size: int = field(default=8, metadata={"help": "project micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "project accumulation; batch x accumulation must be 8"})
    precision: str = field(default="fp32", metadata={"help": "project precision: fp32, tf32 or bf16 (baseline: fp32)"})
    repeats: int = field(default=3, metadata={"help": "runs per variant, interleaved; medians are reported"})
    corpus_size: int = field(default=2000, metadata={"help": "synthetic training set the epoch order is drawn from"})
    seed: int = field(default=42, metadata={"help": "seed for data, order and weights"})
    peak_tflops: float = field(
        default=0.0, metadata={"help": "the device's peak TFLOPS for MFU (a CPU's too); 0 looks a GPU up in a table"}
    )


@dataclass
class Variant:
    name: str
    precision: str
    micro_batch: int
    grad_accum: int
    warmup: MicroBatch
    steps: list[Step]
    padded_tokens_per_example: float  # in the timed steps
    epoch_padded_tokens_per_example: float  # over a whole epoch
    lm_head_positions: int  # in the timed steps, where the variant's loss needs the LM head


@dataclass
class RunSettings:
    model: str
    source: str
    pad_token_id: int
    seed: int


def validate(config: TrainBenchConfig) -> None:
    problems = []
    if config.model not in workload.MODELS:
        problems.append(f"--model must be one of {', '.join(workload.MODELS)}")
    if config.batch_size < 1 or config.batch_size * config.grad_accum != EFFECTIVE_BATCH:
        problems.append(f"--batch-size x --grad-accum must be {EFFECTIVE_BATCH}, the published effective batch")
    if config.precision not in modeling.PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(modeling.PRECISIONS)}")
    if config.steps < 1 or config.repeats < 1:
        problems.append("--steps and --repeats must be at least 1")
    if config.corpus_size < EFFECTIVE_BATCH * config.steps:
        problems.append(f"--corpus-size must be at least {EFFECTIVE_BATCH} x --steps")
    if problems:
        raise UsageError("; ".join(problems))


# --- the workload: one length-grouped epoch, and the steps both variants train -------------------------


def epoch_steps(lengths: list[int], batch_size: int, grad_accum: int, seed: int) -> list[IndexStep]:
    """Example indices of one epoch as the Trainer forms them: optimizer steps of micro-batches, length-grouped."""
    step_size = batch_size * grad_accum
    sampler = training.LengthGroupedEpochSampler(lengths, step_size, training.LENGTH_GROUP_STEPS, seed)
    return [[step[start : start + batch_size] for start in range(0, step_size, batch_size)] for step in sampler.steps()]


def padded_tokens(step: IndexStep, lengths: list[int]) -> int:
    return sum(len(micro) * max(lengths[i] for i in micro) for micro in step)


def padded_tokens_per_example(steps: list[IndexStep], lengths: list[int]) -> float:
    return sum(padded_tokens(step, lengths) for step in steps) / (len(steps) * EFFECTIVE_BATCH)


def representative_steps(steps: list[IndexStep], lengths: list[int], n: int) -> list[IndexStep]:
    """`n` steps in epoch order, one per stratum of padded size (n equal strata), each the nearest to its
    stratum's mean: the sample costs per step what the whole epoch costs, its long tail included."""
    sizes = sorted((padded_tokens(step, lengths), index) for index, step in enumerate(steps))
    strata = [sizes[k * len(sizes) // n : (k + 1) * len(sizes) // n] for k in range(n)]
    chosen = [nearest_to_mean(stratum) for stratum in strata]
    return [steps[index] for index in sorted(chosen)]


def nearest_to_mean(stratum: list[tuple[int, int]]) -> int:
    mean = statistics.mean(size for size, _ in stratum)
    return min(stratum, key=lambda entry: abs(entry[0] - mean))[1]


def published_steps(example_indices: list[int], seed: int) -> list[IndexStep]:
    """The same examples in a random order, as micro-batches of 2 and steps of 4 micro-batches."""
    shuffled = random.Random(seed).sample(example_indices, len(example_indices))
    micro = [shuffled[start : start + PUBLISHED_BATCH] for start in range(0, len(shuffled), PUBLISHED_BATCH)]
    return [micro[start : start + PUBLISHED_GRAD_ACCUM] for start in range(0, len(micro), PUBLISHED_GRAD_ACCUM)]


def label_positions(feature: dict) -> int:
    """Positions whose next token is labelled: where response_token_losses runs the LM head."""
    return sum(label != IGNORE_INDEX for label in feature["labels"][1:])


def as_steps(steps: list[IndexStep], features: list[dict]) -> list[Step]:
    return [[[features[i] for i in micro] for micro in step] for step in steps]


def build_variants(config: TrainBenchConfig, features: list[dict], lengths: list[int]) -> tuple[Variant, Variant]:
    """Both variants on the same examples; each warms up on its own first micro-batch."""
    epoch = epoch_steps(lengths, config.batch_size, config.grad_accum, config.seed)
    timed = representative_steps(epoch, lengths, config.steps)
    published = published_steps([i for step in timed for micro in step for i in micro], config.seed)
    baseline = Variant(
        "baseline",
        "fp32",
        PUBLISHED_BATCH,
        PUBLISHED_GRAD_ACCUM,
        warmup=[features[i] for i in published[0][0]],
        steps=as_steps(published, features),
        padded_tokens_per_example=PUBLISHED_LENGTH,
        epoch_padded_tokens_per_example=PUBLISHED_LENGTH,
        lm_head_positions=sum(len(features[i]["input_ids"]) - 1 for step in published for micro in step for i in micro),
    )
    project = Variant(
        "project",
        config.precision,
        config.batch_size,
        config.grad_accum,
        warmup=[features[i] for i in epoch[0][0]],
        steps=as_steps(timed, features),
        padded_tokens_per_example=padded_tokens_per_example(timed, lengths),
        epoch_padded_tokens_per_example=padded_tokens_per_example(epoch, lengths),
        lm_head_positions=sum(label_positions(features[i]) for step in timed for micro in step for i in micro),
    )
    return baseline, project


# --- one optimizer step, each way ---------------------------------------------------------------------


def published_collate(features: MicroBatch, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every example padded to 512; labels on every non-pad token, the prompt included."""
    input_ids = torch.full((len(features), PUBLISHED_LENGTH), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, feature in enumerate(features):
        ids = feature["input_ids"][:PUBLISHED_LENGTH]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
    }


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        return batch
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def published_step(model, step: Step, optimizer, settings: RunSettings, precision: str) -> None:
    device = model.device
    for micro_batch in step:
        loss = model(**to_device(published_collate(micro_batch, settings.pad_token_id), device)).loss
        (loss / len(step)).backward()
    finish_step(model, optimizer)


def project_step(model, step: Step, optimizer, settings: RunSettings, precision: str) -> None:
    collate, lm_head = training.ResponseCollator(settings.pad_token_id), model.get_output_embeddings()
    batches = [to_device(collate(micro_batch), model.device) for micro_batch in step]
    label_tokens = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches)  # as the Trainer counts
    for batch in batches:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden_states = training.model_hidden_states(model, batch)
            token_losses = training.response_token_losses(hidden_states, batch["labels"], lm_head)
        (token_losses.sum() / label_tokens).backward()
    finish_step(model, optimizer)


def finish_step(model, optimizer) -> None:
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


STEP_FUNCTIONS = {"baseline": published_step, "project": project_step}


# --- measuring one variant in a fresh process ---------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)


def memory_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else hardware.proc_status_mib("VmRSS")


def measure_variant(variant: Variant, settings: RunSettings) -> dict:
    """Load the model, train the warm-up micro-batch and then the timed steps; seconds and memory."""
    device = workload.device()
    dtype = modeling.configure_precision(variant.precision)
    model = workload.random_weight_lora_model(settings.model, settings.source, dtype, device, settings.seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    train_step = STEP_FUNCTIONS[variant.name]
    after_load = memory_mib(device)
    reset_peak_memory(device)
    train_step(model, [variant.warmup], optimizer, settings, variant.precision)
    workload.synchronize(device)
    started = time.perf_counter()
    for step in variant.steps:
        train_step(model, step, optimizer, settings, variant.precision)
    workload.synchronize(device)
    return {
        "seconds": time.perf_counter() - started,
        "memory_after_load_mib": after_load,
        "peak_memory_mib": hardware.peak_memory_mib(device),
        "peak_memory_reserved_mib": hardware.peak_memory_reserved_mib(device),
        "parameters": sum(modeling.parameter_counts(model)),
        "shape": hardware.model_shape(model),
    }


def measure_in_fresh_process(variant: Variant, settings: RunSettings) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure_variant, variant, settings).result()


# --- reporting ----------------------------------------------------------------------------------------


def peak_tflops(config: TrainBenchConfig, device: torch.device, precision: str) -> float | None:
    if config.peak_tflops > 0:
        return config.peak_tflops
    if device.type != "cuda":
        return None
    return hardware.peak_tflops(torch.cuda.get_device_name(device), precision)


def timed_examples(variant: Variant) -> list[dict]:
    return [example for step in variant.steps for micro in step for example in micro]


def summarize(variant: Variant, runs: list[dict], peak: float | None) -> dict:
    examples = timed_examples(variant)
    non_pad = sum(len(example["input_ids"]) for example in examples)
    seconds = statistics.median(run["seconds"] for run in runs)
    best_seconds = min(run["seconds"] for run in runs)  # the least disturbed run on a shared machine
    summary = {
        "micro_batch": variant.micro_batch,
        "grad_accum": variant.grad_accum,
        "precision": variant.precision,
        "examples_per_s": round(len(examples) / seconds, 3),
        "examples_per_s_best": round(len(examples) / best_seconds, 3),
        "non_pad_tokens_per_s": round(non_pad / seconds, 1),
        "padded_tokens_per_example": round(variant.padded_tokens_per_example, 1),
        "epoch_padded_tokens_per_example": round(variant.epoch_padded_tokens_per_example, 1),
        "training_memory_mib": round(
            statistics.median(r["peak_memory_mib"] - r["memory_after_load_mib"] for r in runs)
        ),
        "peak_memory_mib": round(statistics.median(r["peak_memory_mib"] for r in runs)),
        "peak_memory_reserved_mib": median_or_none([r["peak_memory_reserved_mib"] for r in runs]),
        "seconds_per_run": [round(run["seconds"], 2) for run in runs],
        "projected_3_epoch_hours": round(projected_hours(variant, len(examples) / seconds), 2),
    }
    if peak is not None:
        lengths = [len(example["input_ids"]) for example in examples]
        squared = sum(length**2 for length in lengths)
        flops = hardware.training_flops(runs[0]["shape"], non_pad, squared, variant.lm_head_positions)
        summary["mfu"] = round(hardware.model_flops_utilization(flops, seconds, peak), 4)
    return summary


def median_or_none(values: list[float | None]) -> float | None:
    """The rounded median, or None where the device has no such measure (the reserved peak on the CPU)."""
    return None if None in values else round(statistics.median(values))


def projected_hours(variant: Variant, examples_per_s: float) -> float:
    """3 epochs of SAMSum's 14,731 examples at this run's padded tokens/s, padded as a whole epoch pads."""
    padded_tokens_per_s = examples_per_s * variant.padded_tokens_per_example
    return EPOCHS * SAMSUM_TRAIN_EXAMPLES * variant.epoch_padded_tokens_per_example / padded_tokens_per_s / 3600


def data_facts(examples, variant: Variant) -> dict:
    lengths = sorted(len(ex.input_ids) for ex in examples)
    timed = timed_examples(variant)
    return {
        "corpus_examples": len(examples),
        "corpus_mean_tokens": round(statistics.mean(lengths), 1),
        "corpus_p50_tokens": lengths[len(lengths) // 2],
        "corpus_p99_tokens": lengths[int(0.99 * len(lengths))],
        "corpus_label_share": round(sum(ex.num_label_tokens for ex in examples) / sum(lengths), 3),
        "timed_examples_per_run": len(timed),
        "timed_mean_tokens": round(statistics.mean(len(ex["input_ids"]) for ex in timed), 1),
    }


def measure_interleaved(variants: tuple[Variant, Variant], settings: RunSettings, repeats: int) -> dict[str, list]:
    runs = {variant.name: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            runs[variant.name].append(measure_in_fresh_process(variant, settings))
    return runs


def report(config: TrainBenchConfig, source: str, examples, variants: tuple[Variant, Variant], runs: dict) -> dict:
    device = workload.device()
    baseline, project = (summarize(v, runs[v.name], peak_tflops(config, device, v.precision)) for v in variants)
    compared = (
        "examples_per_s",
        "examples_per_s_best",
        "non_pad_tokens_per_s",
        "training_memory_mib",
        "peak_memory_mib",
    )
    return {
        "model": config.model,
        "parameters": runs["project"][0]["parameters"],
        "device": workload.describe_device(device),
        "tokenizer": source,
        "steps": config.steps,
        "repeats": config.repeats,
        "data": data_facts(examples, variants[1]),
        "baseline": baseline,
        "project": project,
        "ratios": {key: round(project[key] / baseline[key], 3) for key in compared},
    }


def main(config: TrainBenchConfig) -> int:
    validate(config)
    source, tokenizer = workload.load_qwen_tokenizer(config.tokenizer)
    examples = workload.samsum_like_examples(tokenizer, config.corpus_size, config.seed)
    variants = build_variants(config, training.as_features(examples), [len(ex.input_ids) for ex in examples])
    settings = RunSettings(config.model, source, tokenizer.pad_token_id, config.seed)
    runs = measure_interleaved(variants, settings, config.repeats)
    workload.print_json(report(config, source, examples, variants, runs))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, TrainBenchConfig))
