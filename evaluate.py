"""Stage 4: score the base model and one or more fine-tuned adapters on the test set, and say which gains are real.

Every model is scored on the same prompts (the base is the same model with every adapter disabled): losses on the
reference summaries, greedy summaries scored with ROUGE, and paired bootstraps of the differences. Adapters that
trained the same thing form one arm of seeds, compared by a t interval over dialogues and seeds (variance
components; comparison.difference_variance): the same
model (by content, not path), training data (by sha256), effective batch, planned optimizer steps, optimisation and
LoRA settings, precision, system prompt, max length and resume overrides; the validation data and the evaluation and
checkpoint intervals count only with --keep-best. Launch details (folders, the batch split, logging, activation
checkpointing) never split an arm (lora_summarization/arms.py). An adapter given twice, or two rows with one seed in
an arm, are refused.

    python evaluate.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter fine_tuned_model --data-dir data
    python evaluate.py --adapter run_lr5e-5 run_lr1e-4      # base, both adapters, each against base and the first
    python evaluate.py --model merged_model --adapter none   # one model alone (a merged export, or the base)
    python evaluate.py --adapter runA_s42 runA_s43 runA_s44 runB_s42 runB_s43 runB_s44   # seeds grouped into arms
    python evaluate.py --adapter run/checkpoints/checkpoint-500 run/checkpoints/checkpoint-900   # checkpoints of a run
    python evaluate.py --adapter run_s42/checkpoints/checkpoint-500 run_s43/checkpoints/checkpoint-500  # one arm

Quick look, loss only: `python evaluate.py --max-examples 50 --no-generate`.
Rescore outside predictions with the same ROUGE (JSONL lines with "prediction" and "reference"; no model):

    python evaluate.py --score predictions.jsonl

Compare finished runs without a model (evaluation_predictions.jsonl files, or outside id/prediction/reference lines):

    python evaluate.py --compare run_a/evaluation_predictions.jsonl run_b/evaluation_predictions.jsonl

Files are refused unless scored alike (the test set, --precision, --max-new-tokens, --max-length and --system-prompt
in the evaluation_results.json beside each). A checkpoint's row is named by its run and step (`run_s42/checkpoint-500`).

Writes evaluation_results.json, evaluation_predictions.jsonl and evaluation_chart.png to --output-dir (the results
file last, so that it exists only beside a complete set), and adds each adapter's metrics to its model card.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lora_summarization.arms import adapter_records
from lora_summarization.cli import RunFailed, UsageError, config_as_dict, run_stage, write_atomic, write_json
from lora_summarization.comparison import (
    BASE,
    FINE_TUNED,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    adapter_rows,
    column_settings,
    read_compared_runs,
    rescore,
    study_report,
    study_results,
)
from lora_summarization.data import FIELDS_WITH_ID, TEST_FILE, read_records
from lora_summarization.disk_space import DiskFull, disk_full_reported
from lora_summarization.evaluation import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULTS,
    FOLLOWED_SETTINGS,
    ModelScores,
    OutOfMemoryInPass,
    TestSet,
    chart_png,
    compare_models,
    encode_test_set,
    follow_training,
    rouge_scores,
    score_model,
)
from lora_summarization.export import trained_on
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
from lora_summarization.resume_guard import file_sha256


@dataclass
class EvalConfig:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "base model: Hub id or local folder"})
    adapter: list[str] = field(
        default_factory=lambda: ["fine_tuned_model"],
        metadata={
            "help": "LoRA adapter folders written by train.py, all for --model; `none` scores --model alone "
            "(the base, or a merged export)"
        },
    )
    data_dir: str = field(default="data", metadata={"help": f"folder holding {TEST_FILE} (data_preparation.py)"})
    output_dir: str = field(default=".", metadata={"help": "where results, predictions and the chart are written"})
    max_examples: int = field(default=0, metadata={"help": "evaluate the first N test examples only (0 = all)"})
    batch_size: int = field(default=16, metadata={"help": "examples per batch, for the loss passes and generation"})
    max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "longest generated summary, in tokens"}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": f"token limit of an example for the loss; unset = training's, else {DEFAULTS['max_length']}"},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt; unset = training's (else the chat template's default)"}
    )
    precision: str = field(default="fp32", metadata={"help": f"one of {', '.join(PRECISIONS)}"})
    no_generate: bool = field(default=False, metadata={"help": "losses only: no generation, no ROUGE"})
    no_published_loss: bool = field(
        default=False, metadata={"help": "skip the published recipe's loss (one padded forward pass per model)"}
    )
    score: str | None = field(
        default=None,
        metadata={"help": "rescore a JSONL file of prediction/reference lines with the same ROUGE (no model)"},
    )
    compare: list[str] = field(
        default_factory=list,
        metadata={"help": "compare prediction files (evaluation_predictions.jsonl, or id/prediction/reference lines)"},
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "resamples of the paired bootstrap"})
    seed: int = field(default=42, metadata={"help": "seed of the bootstrap resampling"})
    debug: bool = field(default=False, metadata={"help": "print the traceback of a usage error"})


CHART_FILE = "evaluation_chart.png"
COMPARISON_FILE = "comparison_results.json"
PLAIN_MODEL = "model"  # the row of --model scored alone (--adapter none)


def main(config: EvalConfig) -> int:
    if config.score:
        return rescore(config.score, config.output_dir)
    if config.compare:
        return compare_runs(config)
    records, adapters, trained = check_inputs(config)
    given = {key: getattr(config, key) for key in FOLLOWED_SETTINGS}
    # --adapter none: a merged export carries its training settings in its own folder.
    config = dataclasses.replace(config, **follow_training(list(adapters.values()) or [config.model], given))
    tokenizer, model = load_models(config, adapters)
    test_set = encode_test_set(tokenizer, records, config.max_length, config.system_prompt)
    print_facts(config, test_set, model, adapters)
    try:
        scores = score_models(model, tokenizer, test_set, config, adapters)
    except OutOfMemoryInPass as error:
        raise RunFailed(
            f"evaluate.py {error}; pass a smaller --batch-size (now {config.batch_size}), "
            "or --precision bf16 on GPUs that support it"
        ) from error
    study = study_results(scores, trained, test_set.references, config.bootstrap_samples, config.seed)
    save_outputs(config, records, scores, study, adapters, str(model.device))
    print(study_report(study))
    return 0


def check_inputs(config: EvalConfig) -> tuple[list[dict], dict[str, str], dict[str, dict | None]]:
    """Report every problem with the flags, the test file and the adapters at once, before any model loads.

    Returns the test records, the adapters by the name of their row in the results, and what train.py recorded of
    each (arms.adapter_record), by which they form arms.
    """
    rules = [
        ("--batch-size", config.batch_size >= 1, "at least 1"),
        ("--max-new-tokens", config.max_new_tokens >= 1, "at least 1"),
        ("--max-length", config.max_length is None or config.max_length >= 1, "at least 1"),
        ("--max-examples", config.max_examples >= 0, "0 (all) or more"),
        ("--bootstrap-samples", config.bootstrap_samples >= 1, "at least 1"),
        ("--precision", config.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ]
    problems = [f"{flag} must be {rule}" for flag, ok, rule in rules if not ok]
    records = collect_problem(problems, read_records, test_file(config), FIELDS_WITH_ID)
    adapters = collect_problem(problems, adapter_rows, config.adapter) or {}
    for folder in adapters.values():
        collect_problem(problems, check_adapter_folder, folder)
    trained = {} if problems else collect_problem(problems, adapter_records, adapters)
    if problems:
        raise UsageError("; ".join(problems))
    return records[: config.max_examples or None], adapters, trained


def test_file(config: EvalConfig) -> Path:
    return Path(config.data_dir) / TEST_FILE


def collect_problem(problems: list[str], check, *args):
    try:
        return check(*args)
    except UsageError as error:
        problems.append(str(error))


def peft_name(index: int) -> str:
    # PEFT's own name for an adapter; the row names come from folders and may hold dots, which PEFT keys cannot.
    return f"adapter_{index}"


def load_models(config: EvalConfig, adapters: dict[str, str]):
    """The tokenizer and the base model with every adapter attached, on the device, in eval mode."""
    tokenizer = load_tokenizer(config.model)
    model = load_base_model(config.model, configure_precision(config.precision))
    for index, folder in enumerate(adapters.values()):
        model = load_adapter(model, folder, adapter_name=peft_name(index))
    return tokenizer, model.to(resolve_device()).eval()


def print_facts(config: EvalConfig, test_set: TestSet, model, adapters: dict[str, str]) -> None:
    shortened = sum(example.dialogue_shortened for example in test_set.examples)
    tokens = sum(example.num_label_tokens for example in test_set.examples)
    content = sum(example.num_content_tokens for example in test_set.examples)
    print(
        f"test examples: {len(test_set.examples):,} ({tokens:,} response tokens, {content:,} of them content; "
        f"{shortened:,} dialogues shortened to {config.max_length} tokens)"
    )
    described = ", ".join(f"{name} ({folder})" for name, folder in adapters.items()) or "none"
    print(f"base model: {config.model}; adapters: {described}; device: {model.device}")
    print(f"system prompt: {config.system_prompt!r}")


def score_models(model, tokenizer, test_set: TestSet, config: EvalConfig, adapters: dict[str, str]) -> dict:
    """ModelScores by row: the base with every adapter disabled, then each adapter alone."""
    if not adapters:
        return {PLAIN_MODEL: score(model, tokenizer, test_set, config, PLAIN_MODEL)}
    with model.disable_adapter():
        scores = {BASE: score(model, tokenizer, test_set, config, BASE)}
    for index, name in enumerate(adapters):
        model.set_adapter(peft_name(index), inference_mode=True)
        scores[name] = score(model, tokenizer, test_set, config, name)
    return scores


def score(model, tokenizer, test_set: TestSet, config: EvalConfig, name: str) -> ModelScores:
    return score_model(
        model,
        tokenizer,
        test_set,
        config.batch_size,
        config.max_new_tokens,
        not config.no_generate,
        name,
        published_loss=not config.no_published_loss,
    )


def card_results(results: dict, name: str, difference: dict) -> dict:
    """What one adapter's model card shows: the base, this adapter, and the difference between them."""
    return {
        "n": results["n"],
        BASE: results["models"][BASE],
        FINE_TUNED: results["models"][name],
        "difference": difference,
    }


def save_outputs(config: EvalConfig, records, scores: dict, study: dict, adapters: dict, device: str) -> None:
    output_dir = Path(config.output_dir)
    first = next(iter(scores.values()))
    settings = {**config_as_dict(config), "device": device, "test_sha256": file_sha256(test_file(config))}
    if adapters:
        settings["adapter_base_model"] = trained_on(next(iter(adapters.values())))
    results = {
        "n": len(records),
        "label_tokens": int(first.label_tokens.sum()),
        "content_tokens": int(first.content_tokens.sum()),
        **study,
        "adapters": adapters,
        "settings": settings,
    }
    differences = card_differences(scores, study["comparisons"], list(adapters), config)
    if list(adapters) == [FINE_TUNED]:
        results.update(card_results(results, FINE_TUNED, differences[FINE_TUNED]))  # as before several adapters
    # The results file goes last: a run stopped while writing leaves no results beside partial outputs.
    (output_dir / RESULTS_FILE).unlink(missing_ok=True)
    predictions = predictions_text(records, scores)
    with disk_full_reported(output_dir, lambda: outputs_disk_full(output_dir, predictions)):
        write_atomic(output_dir / PREDICTIONS_FILE, predictions)
        write_atomic(output_dir / CHART_FILE, chart_png(results["models"], study["comparisons"], study.get("arms")))
        write_json(output_dir / RESULTS_FILE, results)
    cards = [
        add_evaluation(folder, card_results(results, name, differences[name])) for name, folder in adapters.items()
    ]
    added = f"; metrics added to {', '.join(map(str, cards))}" if cards else ""
    print(f"wrote {RESULTS_FILE}, {PREDICTIONS_FILE} and {CHART_FILE} to {output_dir}{added}")


def outputs_disk_full(output_dir: Path, predictions: str) -> DiskFull:
    needed = len(predictions.encode("utf-8"))
    return DiskFull(output_dir, PREDICTIONS_FILE, needed, "free space, then rerun the same evaluate.py command")


def card_differences(scores: dict[str, ModelScores], comparisons: list[dict], names: list[str], config: EvalConfig):
    """Each adapter against the base, as its model card shows it: the study's comparison where the adapter is an
    arm of its own, else a paired bootstrap of its own."""
    against_base = {c["model"]: c["difference"] for c in comparisons if c["against"] == BASE}
    samples, seed = config.bootstrap_samples, config.seed
    return {name: against_base.get(name) or compare_models(scores[BASE], scores[name], samples, seed) for name in names}


def predictions_text(records: list[dict], scores: dict[str, ModelScores]) -> str:
    lines = [
        json.dumps(
            {
                "id": record["id"],
                "dialogue": record["dialogue"],
                "reference": record["summary"],
                **{name: model_scores.example(index) for name, model_scores in scores.items()},
            },
            ensure_ascii=False,
        )
        for index, record in enumerate(records)
    ]
    return "\n".join(lines) + "\n"


def compare_runs(config: EvalConfig) -> int:
    """Score every model column of finished runs' prediction files on the ids they share; no model is loaded."""
    runs = read_compared_runs(config.compare)
    scores = {
        name: ModelScores(predictions=texts, rouge=rouge_scores(texts, runs.references))
        for name, texts in runs.columns.items()
    }
    settings = column_settings(runs.files, list(scores))
    study = study_results(scores, settings, runs.references, config.bootstrap_samples, config.seed)
    results = {
        "n": len(runs.ids),
        "ids_not_in_every_file": runs.dropped,
        "files": runs.files,
        **study,
        "settings": {"bootstrap_samples": config.bootstrap_samples, "seed": config.seed},
    }
    write_json(Path(config.output_dir) / COMPARISON_FILE, results)
    print(f"{len(runs.ids):,} test ids in every file; {runs.dropped:,} ids in some files only were left out")
    print(study_report(study))
    print(f"wrote {COMPARISON_FILE} to {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, EvalConfig))
