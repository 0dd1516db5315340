"""Merge a trained LoRA adapter into its base model and save one plain model folder for serving.

    python -m lora_summarization.export --adapter fine_tuned_model --output-dir merged_model
    python -m lora_summarization.export --model /models/Qwen2.5-1.5B-Instruct --precision fp32

The folder holds safetensors weights, config, tokenizer (with its chat template) and the generation config that
evaluate.py scores (greedy, no repetition penalty; not the base model's sampling one), the adapter's
training_summary.json (whose system prompt and max length evaluate.py and summarize follow), and loads without PEFT:
`AutoModelForCausalLM.from_pretrained("merged_model")`, `vllm serve merged_model`, or TGI's
`--model-id /data/merged_model` (servers sample unless asked otherwise: request temperature 0 for the evaluated
decoding). The merge is done in fp32; `--precision` sets the saved dtype.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import PeftConfig

from . import modeling
from .cli import UsageError, config_as_dict, run_stage, write_json
from .disk_space import DiskFull, disk_full_reported, tensor_bytes
from .evaluation import TRAINING_SUMMARY_FILE, save_generation_config

EXPORT_SETTINGS_FILE = "export_settings.json"
SAVED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportConfig:
    model: str = field(
        default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or local folder of the adapter's base model"}
    )
    adapter: str = field(default="fine_tuned_model", metadata={"help": "adapter folder written by train.py"})
    output_dir: str = field(default="merged_model", metadata={"help": "where the merged model goes"})
    precision: Literal["bf16", "fp32"] = field(
        default="bf16", metadata={"help": "dtype of the saved weights: bf16 (the base's own, half the size) or fp32"}
    )
    debug: bool = field(default=False, metadata={"help": "show tracebacks for usage errors"})


def check_folders(config: ExportConfig) -> None:
    """Every problem with the folders at once, before the base model is loaded."""
    problems = []
    try:
        modeling.check_adapter_folder(config.adapter)
    except UsageError as error:
        problems.append(str(error))
    if Path(config.output_dir).resolve() == Path(config.adapter).resolve():
        problems.append("--output-dir must differ from --adapter, or the merged model would mix with the adapter")
    if problems:
        raise UsageError("; ".join(problems))


def trained_on(adapter_dir: str) -> str:
    """The base model named in the adapter's config when it was saved."""
    return PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path or "unknown"


def merge_adapter(config: ExportConfig):
    """The base model with the LoRA update folded into its weights, as a plain transformers model."""
    base = modeling.load_base_model(config.model, torch.float32)
    merged = modeling.load_adapter(base, config.adapter).merge_and_unload(safe_merge=True)
    return merged.to(SAVED_DTYPES[config.precision])


def save_merged(model, tokenizer, config: ExportConfig) -> Path:
    output_dir = Path(config.output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    save_generation_config(output_dir, tokenizer)  # replaces the base model's sampling config
    write_json(output_dir / EXPORT_SETTINGS_FILE, {**config_as_dict(config), "trained_on": trained_on(config.adapter)})
    copy_training_summary(config.adapter, output_dir)
    return output_dir


def merged_model_disk_full(config: ExportConfig, merged) -> DiskFull:
    needed = tensor_bytes(merged.parameters())
    return DiskFull(config.output_dir, "the merged model", needed, "free space, then rerun the export")


def copy_training_summary(adapter_dir: str, output_dir: Path) -> None:
    """The adapter's training_summary.json, so that evaluate.py and summarize run the merged model with the system
    prompt and max length it was trained with, as they do the adapter."""
    summary = Path(adapter_dir) / TRAINING_SUMMARY_FILE
    if summary.is_file():
        shutil.copyfile(summary, output_dir / TRAINING_SUMMARY_FILE)


def folder_size_gb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 1e9


def main(config: ExportConfig) -> int:
    check_folders(config)
    print(f"merging {config.adapter} (trained on {trained_on(config.adapter)}) into {config.model}")
    tokenizer = modeling.load_tokenizer(config.model)
    merged = merge_adapter(config)
    with disk_full_reported(config.output_dir, lambda: merged_model_disk_full(config, merged)):
        output_dir = save_merged(merged, tokenizer, config)
    parameters = sum(p.numel() for p in merged.parameters())
    print(f"saved {parameters:,} parameters ({config.precision}, {folder_size_gb(output_dir):.2f} GB) to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, ExportConfig))
