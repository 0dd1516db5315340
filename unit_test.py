"""Stage 2: a 5-minute pipeline smoke test. Trains a LoRA adapter on 80% of data/unit_test_data.json and
checks that the content loss (summary text and end token, without the `Summary:` prefix) on the held-out 20% falls.

    python unit_test.py                      # exit 0 PASSED, exit 1 FAILED, exit 2 bad input
    python unit_test.py --learning-rate 0    # must report FAILED: proves the check can fail

Writes finetune_100_model/: the adapter (PEFT safetensors), unit_test_report.json and its training logs. It is a
scratch folder: a run first deletes what the previous run wrote there, and holds a lock file while it runs.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments, set_seed

from lora_summarization import data, modeling, run_folder
from lora_summarization.cli import EXIT_CHECK_FAILED, config_as_dict, run_stage, write_json
from lora_summarization.disk_space import DiskFull, disk_full_reported, tensor_bytes
from lora_summarization.run_lock import output_dir_lock
from lora_summarization.training import (
    build_trainer,
    core_training_arguments,
    encode_records,
    out_of_memory_reported,
)


@dataclass
class UnitTestConfig:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or local model folder"})
    data_dir: str = field(default="data", metadata={"help": "folder written by data_preparation.py"})
    output_dir: str = field(default="finetune_100_model", metadata={"help": "where the adapter and report go"})
    steps: int = field(default=80, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={"help": "examples per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    min_improvement: float = field(
        default=0.02, metadata={"help": "PASSED when the held-out content loss falls by at least this fraction"}
    )
    held_out_fraction: float = field(default=0.2, metadata={"help": "share of the examples held out"})
    max_length: int = field(default=512, metadata={"help": "token budget; long dialogues are shortened"})
    precision: str = field(default="fp32", metadata={"help": "fp32, tf32 or bf16"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message; None = template default"})
    seed: int = field(default=42, metadata={"help": "seed for the split, LoRA init, data order and dropout"})
    debug: bool = field(default=False, metadata={"help": "show tracebacks for usage errors"})


REPORT_FILE = "unit_test_report.json"
# What a run writes (PEFT adds a README.md), removed first so logs are not appended to the last run's.
OWN_OUTPUTS = (*run_folder.RUN_OUTPUTS, "README.md", REPORT_FILE)


def split_records(records: list[dict], held_out_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    held_out = max(1, round(len(shuffled) * held_out_fraction))
    return shuffled[held_out:], shuffled[:held_out]


def training_arguments(config: UnitTestConfig) -> TrainingArguments:
    return core_training_arguments(
        output_dir=str(Path(config.output_dir) / "checkpoints"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=config.learning_rate,
        warmup_steps=config.steps // 10,
        max_grad_norm=1.0,
        bf16=config.precision == "bf16",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        seed=config.seed,
    )


def verdict(loss_before: float, loss_after: float, min_improvement: float) -> tuple[bool, float]:
    improvement = (loss_before - loss_after) / loss_before
    return math.isfinite(loss_after) and improvement >= min_improvement, improvement


def memory_remedies(config: UnitTestConfig) -> list[str]:
    remedies = ["--precision bf16"] if config.precision != "bf16" and modeling.bf16_supported() else []
    return remedies + ([f"--batch-size {config.batch_size // 2}"] if config.batch_size > 1 else [])


def held_out_losses(trainer) -> tuple[float, float]:
    """(content loss, whole-response loss), each a token-weighted mean over the held-out examples."""
    metrics = trainer.evaluate()
    return metrics["eval_content_loss"], metrics["eval_loss"]


def main(config: UnitTestConfig) -> int:
    modeling.pin_one_gpu_unless_distributed()
    with output_dir_lock(config.output_dir, "unit_test.py"):
        run_folder.remove_entries(config.output_dir, OWN_OUTPUTS)
        return smoke_test(config)


def encode_split(config: UnitTestConfig, records: list[dict], tokenizer):
    train_records, held_out_records = split_records(records, config.held_out_fraction, config.seed)
    train = encode_records(tokenizer, train_records, config.max_length, config.system_prompt)
    held_out = encode_records(tokenizer, held_out_records, config.max_length, config.system_prompt)
    return train, held_out


def train_and_measure(config: UnitTestConfig, trainer) -> dict:
    """The held-out losses before and after training."""
    with out_of_memory_reported("unit_test.py", trainer, memory_remedies(config), checkpoint_dir=None):
        content_before, response_before = held_out_losses(trainer)
        trainer.train()
        content_after, response_after = held_out_losses(trainer)
    return {
        "held_out_content_loss_before": content_before,
        "held_out_content_loss_after": content_after,
        "held_out_response_loss_before": response_before,
        "held_out_response_loss_after": response_after,
    }


def adapter_disk_full(output_dir: Path, model) -> DiskFull:
    needed = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return DiskFull(output_dir, "the adapter", needed, "free space, then rerun unit_test.py")


def smoke_test(config: UnitTestConfig) -> int:
    started = time.perf_counter()
    records = data.read_records(Path(config.data_dir) / data.UNIT_TEST_FILE)  # before anything is downloaded
    tokenizer = modeling.load_tokenizer(config.model)
    train, held_out = encode_split(config, records, tokenizer)
    base = modeling.load_base_model(config.model, modeling.configure_precision(config.precision))
    set_seed(config.seed)
    model = modeling.apply_lora(base)
    print(f"{len(train)} training and {len(held_out)} held-out examples; {modeling.describe_parameters(model)}")

    output_dir = Path(config.output_dir)
    trainer, _ = build_trainer(model, tokenizer, train, held_out, training_arguments(config), output_dir)
    losses = train_and_measure(config, trainer)
    before, after = losses["held_out_content_loss_before"], losses["held_out_content_loss_after"]
    passed, improvement = verdict(before, after, config.min_improvement)
    report = {
        "verdict": "PASSED" if passed else "FAILED",
        **losses,
        "relative_improvement": improvement,
        "min_improvement": config.min_improvement,
        "steps": trainer.state.global_step,
        "train_examples": len(train),
        "held_out_examples": len(held_out),
        "runtime_seconds": round(time.perf_counter() - started, 1),
        "settings": config_as_dict(config),
    }
    with disk_full_reported(output_dir, lambda: adapter_disk_full(output_dir, trainer.model)):
        trainer.model.save_pretrained(output_dir)
        write_json(output_dir / REPORT_FILE, report)
    change = f"{100 * improvement:+.1f}%, need {100 * config.min_improvement:.0f}%"
    print(f"held-out content loss {before:.4f} -> {after:.4f} ({change})")
    print(report["verdict"])
    return 0 if passed else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(run_stage(main, UnitTestConfig))
