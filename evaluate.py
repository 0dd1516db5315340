"""Stage 4: compare the base model with the fine-tuned adapter on the test set, and say whether the gain is real.

Both are scored on the same prompts (the base is the same model with the adapter disabled): loss on the
reference summaries, greedy summaries scored with ROUGE, and a paired bootstrap of the difference.

    python evaluate.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter fine_tuned_model --data-dir data

Quick look, loss only: `python evaluate.py --max-examples 50 --no-generate`.
Rescore outside predictions with the same ROUGE (JSONL lines with "prediction" and "reference"; no model):

    python evaluate.py --score predictions.jsonl

Writes evaluation_results.json, evaluation_predictions.jsonl and evaluation_chart.png to --output-dir,
and adds the metrics to the adapter's model card (README.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lora_summarization.cli import UsageError, config_as_dict, run_stage, write_json
from lora_summarization.data import TEST_FILE, read_records
from lora_summarization.evaluation import (
    METRIC_NAMES,
    ModelScores,
    TestSet,
    compare_models,
    encode_test_set,
    format_table,
    rouge_scores,
    save_chart,
    score_model,
)
from lora_summarization.model_card import add_evaluation
from lora_summarization.modeling import (
    PRECISIONS,
    check_adapter_folder,
    configure_precision,
    load_adapter,
    load_base_model,
    load_tokenizer,
    resolve_device,
)
from lora_summarization.prompts import extract_summary


@dataclass
class EvalConfig:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "base model: Hub id or local folder"})
    adapter: str = field(default="fine_tuned_model", metadata={"help": "LoRA adapter folder written by train.py"})
    data_dir: str = field(default="data", metadata={"help": f"folder holding {TEST_FILE} (data_preparation.py)"})
    output_dir: str = field(default=".", metadata={"help": "where results, predictions and the chart are written"})
    max_examples: int = field(default=0, metadata={"help": "evaluate the first N test examples only (0 = all)"})
    batch_size: int = field(default=16, metadata={"help": "examples per batch, for the loss pass and generation"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest generated summary, in tokens"})
    max_length: int = field(default=512, metadata={"help": "token limit of an example for the loss, as in training"})
    system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt; unset = the chat template's default (use training's)"}
    )
    precision: str = field(default="fp32", metadata={"help": f"one of {', '.join(PRECISIONS)}"})
    no_generate: bool = field(default=False, metadata={"help": "loss only: no generation, no ROUGE"})
    score: str | None = field(
        default=None,
        metadata={"help": "rescore a JSONL file of prediction/reference lines with the same ROUGE (no model)"},
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "resamples of the paired bootstrap"})
    seed: int = field(default=42, metadata={"help": "seed of the bootstrap resampling"})
    debug: bool = field(default=False, metadata={"help": "print the traceback of a usage error"})


RESULTS_FILE = "evaluation_results.json"
PREDICTIONS_FILE = "evaluation_predictions.jsonl"
CHART_FILE = "evaluation_chart.png"


def main(config: EvalConfig) -> None:
    if config.score:
        return rescore(config)
    records = check_inputs(config)
    tokenizer, model = load_model_with_adapter(config)
    test_set = encode_test_set(tokenizer, records, config.max_length, config.system_prompt)
    print_facts(config, test_set, model)
    with model.disable_adapter():
        base = score(model, tokenizer, test_set, config, "base")
    fine_tuned = score(model, tokenizer, test_set, config, "fine-tuned")
    differences = compare_models(base, fine_tuned, config.bootstrap_samples, config.seed)
    save_outputs(config, model, records, base, fine_tuned, differences)
    print(format_table(base.summary(), fine_tuned.summary(), differences))


def check_inputs(config: EvalConfig) -> list[dict]:
    """Report every problem with the flags, the test file and the adapter at once, before any model loads."""
    rules = [
        ("--batch-size", config.batch_size >= 1, "at least 1"),
        ("--max-new-tokens", config.max_new_tokens >= 1, "at least 1"),
        ("--max-length", config.max_length >= 1, "at least 1"),
        ("--max-examples", config.max_examples >= 0, "0 (all) or more"),
        ("--bootstrap-samples", config.bootstrap_samples >= 1, "at least 1"),
        ("--precision", config.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ]
    problems = [f"{flag} must be {rule}" for flag, ok, rule in rules if not ok]
    records = collect_problem(problems, read_records, Path(config.data_dir) / TEST_FILE)
    collect_problem(problems, check_adapter_folder, config.adapter)
    if problems:
        raise UsageError("; ".join(problems))
    return records[: config.max_examples or None]


def collect_problem(problems: list[str], check, *args):
    try:
        return check(*args)
    except UsageError as error:
        problems.append(str(error))


def load_model_with_adapter(config: EvalConfig):
    """The tokenizer and the base model with the adapter attached, on the device, in eval mode."""
    tokenizer = load_tokenizer(config.model)
    base_model = load_base_model(config.model, configure_precision(config.precision))
    model = load_adapter(base_model, config.adapter)
    return tokenizer, model.to(resolve_device()).eval()


def print_facts(config: EvalConfig, test_set: TestSet, model) -> None:
    shortened = sum(example.dialogue_shortened for example in test_set.examples)
    tokens = sum(example.num_label_tokens for example in test_set.examples)
    print(f"test examples: {len(test_set.examples):,} ({tokens:,} response tokens; {shortened:,} dialogues shortened)")
    print(f"base model: {config.model}; adapter: {config.adapter}; device: {model.device}")


def score(model, tokenizer, test_set: TestSet, config: EvalConfig, name: str) -> ModelScores:
    return score_model(
        model, tokenizer, test_set, config.batch_size, config.max_new_tokens, not config.no_generate, name
    )


def save_outputs(config: EvalConfig, model, records, base: ModelScores, fine_tuned: ModelScores, differences) -> None:
    output_dir = Path(config.output_dir)
    settings = {
        **config_as_dict(config),
        "adapter_base_model": model.active_peft_config.base_model_name_or_path,
        "device": str(model.device),
    }
    results = {
        "n": len(records),
        "label_tokens": int(base.label_tokens.sum()),
        "base": base.summary(),
        "fine_tuned": fine_tuned.summary(),
        "difference": differences,
        "settings": settings,
    }
    write_json(output_dir / RESULTS_FILE, results)
    write_predictions(output_dir / PREDICTIONS_FILE, records, base, fine_tuned)
    save_chart(results["base"], results["fine_tuned"], differences, output_dir / CHART_FILE)
    card = add_evaluation(config.adapter, results)
    print(f"wrote {RESULTS_FILE}, {PREDICTIONS_FILE} and {CHART_FILE} to {output_dir}; metrics added to {card}")


def write_predictions(path: Path, records: list[dict], base: ModelScores, fine_tuned: ModelScores) -> None:
    lines = [
        json.dumps(
            {
                "id": record["id"],
                "dialogue": record["dialogue"],
                "reference": record["summary"],
                "base": base.example(index),
                "fine_tuned": fine_tuned.example(index),
            },
            ensure_ascii=False,
        )
        for index, record in enumerate(records)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def rescore(config: EvalConfig) -> None:
    """ROUGE of outside predictions, computed exactly as for our own (a leading `Summary:` is removed too).

    The means go to `<output-dir>/<file stem>_rouge.json`.
    """
    pairs = read_prediction_pairs(Path(config.score))
    rouge = rouge_scores([extract_summary(pair["prediction"]) for pair in pairs], [pair["reference"] for pair in pairs])
    means = {name: float(scores.mean()) for name, scores in rouge.items()}
    output = Path(config.output_dir) / f"{Path(config.score).stem}_rouge.json"
    write_json(output, {"file": config.score, "n": len(pairs), **means})
    print(f"ROUGE F1 x100 of {len(pairs):,} predictions in {config.score} (also in {output}):")
    for name, mean in means.items():
        print(f"{METRIC_NAMES[name]:<11}{100 * mean:>8.2f}")


def read_prediction_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"{path} not found; pass --score with a JSONL file of prediction/reference lines")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number} is not valid JSON ({error.msg})") from None
        if not (isinstance(pair, dict) and all(isinstance(pair.get(key), str) for key in ("prediction", "reference"))):
            raise UsageError(f'{path} line {number} needs the text fields "prediction" and "reference"')
        pairs.append(pair)
    if not pairs:
        raise UsageError(f"{path} holds no lines to score")
    return pairs


if __name__ == "__main__":
    sys.exit(run_stage(main, EvalConfig))
