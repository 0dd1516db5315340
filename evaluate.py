"""Stage 4: score the base model and one or more fine-tuned adapters on the test set, and say which gains are real.

Every model is scored on the same prompts (the base is the same model with every adapter disabled): losses on the
reference summaries, greedy summaries scored with ROUGE, and paired bootstraps of the differences.

    python evaluate.py --model Qwen/Qwen2.5-1.5B-Instruct --adapter fine_tuned_model --data-dir data
    python evaluate.py --adapter run_lr5e-5 run_lr1e-4      # base, both adapters, each against base and the first
    python evaluate.py --model merged_model --adapter none   # one model alone (a merged export, or the base)

Quick look, loss only: `python evaluate.py --max-examples 50 --no-generate`.
Rescore outside predictions with the same ROUGE (JSONL lines with "prediction" and "reference"; no model):

    python evaluate.py --score predictions.jsonl

Compare finished runs without a model (evaluation_predictions.jsonl files, or outside id/prediction/reference lines):

    python evaluate.py --compare run_a/evaluation_predictions.jsonl run_b/evaluation_predictions.jsonl

Writes evaluation_results.json, evaluation_predictions.jsonl and evaluation_chart.png to --output-dir (the results
file last, so that it exists only beside a complete set), and adds each adapter's metrics to its model card.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lora_summarization.cli import RunFailed, UsageError, config_as_dict, run_stage, write_atomic, write_json
from lora_summarization.data import FIELDS_WITH_ID, TEST_FILE, read_records
from lora_summarization.evaluation import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULTS,
    FOLLOWED_SETTINGS,
    METRIC_NAMES,
    ModelScores,
    OutOfMemoryInPass,
    TestSet,
    chart_png,
    compare_all,
    encode_test_set,
    follow_training,
    format_report,
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
from lora_summarization.prompts import extract_summary

NO_ADAPTER = "none"


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


RESULTS_FILE = "evaluation_results.json"
PREDICTIONS_FILE = "evaluation_predictions.jsonl"
CHART_FILE = "evaluation_chart.png"
COMPARISON_FILE = "comparison_results.json"
BASE = "base"  # the base model's row, with every adapter disabled
FINE_TUNED = "fine_tuned"  # the row of the adapter when there is only one
PLAIN_MODEL = "model"  # the row of --model scored alone (--adapter none)
MIN_SHARED_IDS = 20


def main(config: EvalConfig) -> int:
    if config.score:
        return rescore(config)
    if config.compare:
        return compare_runs(config)
    records, adapters = check_inputs(config)
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
    comparisons = compare_all(scores, BASE, config.bootstrap_samples, config.seed)
    save_outputs(config, records, scores, comparisons, adapters, str(model.device))
    print(format_report({name: s.summary() for name, s in scores.items()}, comparisons))
    return 0


def check_inputs(config: EvalConfig) -> tuple[list[dict], dict[str, str]]:
    """Report every problem with the flags, the test file and the adapters at once, before any model loads.

    Returns the test records and the adapters by the name of their row in the results.
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
    records = collect_problem(problems, read_records, Path(config.data_dir) / TEST_FILE, FIELDS_WITH_ID)
    adapters = collect_problem(problems, adapter_rows, config.adapter) or {}
    for folder in adapters.values():
        collect_problem(problems, check_adapter_folder, folder)
    if problems:
        raise UsageError("; ".join(problems))
    return records[: config.max_examples or None], adapters


def collect_problem(problems: list[str], check, *args):
    try:
        return check(*args)
    except UsageError as error:
        problems.append(str(error))


def adapter_rows(folders: list[str]) -> dict[str, str]:
    """Each adapter folder by its row name: `fine_tuned` when alone, else the folder's name; none for `none`."""
    if NO_ADAPTER in folders:
        if len(folders) > 1:
            raise UsageError(f"--adapter {NO_ADAPTER} scores --model alone; give it without adapter folders")
        return {}
    if len(folders) == 1:
        return {FINE_TUNED: folders[0]}
    rows: dict[str, str] = {}
    for folder in folders:
        name = Path(folder).resolve().name
        if name in rows:
            same = Path(rows[name]).resolve() == Path(folder).resolve()
            raise UsageError(
                f"--adapter lists {folder} twice; give each folder once"
                if same
                else f"--adapter folders {rows[name]} and {folder} would both be named '{name}' in the results; "
                "rename one of them"
            )
        if name == BASE:
            raise UsageError(f"--adapter folder {folder} would be named '{BASE}' like the base model; rename it")
        rows[name] = folder
    return rows


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


def card_results(results: dict, name: str) -> dict:
    """What one adapter's model card shows: the base, this adapter, and the difference between them."""
    (difference,) = [c["difference"] for c in results["comparisons"] if (c["model"], c["against"]) == (name, BASE)]
    return {
        "n": results["n"],
        BASE: results["models"][BASE],
        FINE_TUNED: results["models"][name],
        "difference": difference,
    }


def save_outputs(
    config: EvalConfig, records, scores: dict, comparisons: list[dict], adapters: dict, device: str
) -> None:
    output_dir = Path(config.output_dir)
    first = next(iter(scores.values()))
    settings = {**config_as_dict(config), "device": device}
    if adapters:
        settings["adapter_base_model"] = trained_on(next(iter(adapters.values())))
    results = {
        "n": len(records),
        "label_tokens": int(first.label_tokens.sum()),
        "content_tokens": int(first.content_tokens.sum()),
        "models": {name: model_scores.summary() for name, model_scores in scores.items()},
        "comparisons": comparisons,
        "adapters": adapters,
        "settings": settings,
    }
    if list(adapters) == [FINE_TUNED]:
        results.update(card_results(results, FINE_TUNED))  # the one-adapter fields, as before several adapters
    # The results file goes last: a run stopped while writing leaves no results beside partial outputs.
    (output_dir / RESULTS_FILE).unlink(missing_ok=True)
    write_atomic(output_dir / PREDICTIONS_FILE, predictions_text(records, scores))
    write_atomic(output_dir / CHART_FILE, chart_png(results["models"], comparisons))
    write_json(output_dir / RESULTS_FILE, results)
    cards = [add_evaluation(folder, card_results(results, name)) for name, folder in adapters.items()]
    added = f"; metrics added to {', '.join(map(str, cards))}" if cards else ""
    print(f"wrote {RESULTS_FILE}, {PREDICTIONS_FILE} and {CHART_FILE} to {output_dir}{added}")


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


def rescore(config: EvalConfig) -> None:
    """ROUGE of outside predictions, computed exactly as for our own (a leading `Summary:` is removed too).

    The means go to `<output-dir>/<file stem>_rouge.json`.
    """
    pairs = read_jsonl(Path(config.score), "--score")
    for number, pair in enumerate(pairs, start=1):
        if not all(isinstance(pair.get(key), str) for key in ("prediction", "reference")):
            raise UsageError(f'{config.score} line {number} needs the text fields "prediction" and "reference"')
    rouge = rouge_scores([extract_summary(pair["prediction"]) for pair in pairs], [pair["reference"] for pair in pairs])
    means = {name: float(scores.mean()) for name, scores in rouge.items()}
    output = Path(config.output_dir) / f"{Path(config.score).stem}_rouge.json"
    write_json(output, {"file": config.score, "n": len(pairs), **means})
    print(f"ROUGE F1 x100 of {len(pairs):,} predictions in {config.score} (also in {output}):")
    for name, mean in means.items():
        print(f"{METRIC_NAMES[name]:<11}{100 * mean:>8.2f}")


def read_jsonl(path: Path, flag: str) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); refused when missing, malformed or empty."""
    if not path.is_file():
        raise UsageError(f"{path} not found; pass {flag} with a JSONL file of predictions")
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise UsageError(f"{path} line {number} is not a JSON object")
        lines.append(value)
    if not lines:
        raise UsageError(f"{path} holds no lines to score")
    return lines


def compare_runs(config: EvalConfig) -> int:
    """Score every model column of finished runs' prediction files on the ids they share; no model is loaded."""
    runs = {label: read_run(Path(path)) for label, path in run_labels(config.compare).items()}
    ids, dropped = shared_ids(runs)
    references = [next(iter(runs.values()))[example_id]["reference"] for example_id in ids]
    columns = model_columns(runs, ids)
    scores = {
        name: ModelScores(predictions=texts, rouge=rouge_scores(texts, references)) for name, texts in columns.items()
    }
    comparisons = compare_all(scores, BASE, config.bootstrap_samples, config.seed)
    summaries = {name: model_scores.summary() for name, model_scores in scores.items()}
    results = {
        "n": len(ids),
        "ids_not_in_every_file": dropped,
        "files": dict(zip(runs, config.compare, strict=True)),
        "models": summaries,
        "comparisons": comparisons,
        "settings": {"bootstrap_samples": config.bootstrap_samples, "seed": config.seed},
    }
    write_json(Path(config.output_dir) / COMPARISON_FILE, results)
    print(f"{len(ids):,} test ids in every file; {dropped:,} ids in some files only were left out")
    print(format_report(summaries, comparisons))
    print(f"wrote {COMPARISON_FILE} to {config.output_dir}")
    return 0


def run_labels(paths: list[str]) -> dict[str, str]:
    """Each file by a short label: its folder's name for an evaluation_predictions.jsonl, else its stem."""
    labels: dict[str, str] = {}
    for path in paths:
        resolved = Path(path).resolve()
        label = resolved.parent.name if resolved.name == PREDICTIONS_FILE else resolved.stem
        if label in labels:
            same = Path(labels[label]).resolve() == resolved
            raise UsageError(
                f"--compare lists {path} twice; give each file once"
                if same
                else f"--compare files {labels[label]} and {path} would both be named '{label}'; rename one of them"
            )
        labels[label] = path
    return labels


def read_run(path: Path) -> dict[str, dict]:
    """A predictions file's lines by id; each needs an id, a reference, and a prediction or model columns."""
    lines = read_jsonl(path, "--compare")
    by_id = {}
    for number, line in enumerate(lines, start=1):
        if not (isinstance(line.get("id"), str) and isinstance(line.get("reference"), str)):
            raise UsageError(f'{path} line {number} needs the text fields "id" and "reference"')
        by_id[line["id"]] = line
    if not any(line_columns(line) for line in lines):
        raise UsageError(f"{path} holds no predictions (was it written with --no-generate?); pass files with some")
    return by_id


def line_columns(line: dict) -> dict[str, str]:
    """The predictions on one line: model columns of our own files, or one outside `prediction` (key '')."""
    if isinstance(line.get("prediction"), str):
        return {"": extract_summary(line["prediction"])}
    return {
        name: value["prediction"]
        for name, value in line.items()
        if isinstance(value, dict) and isinstance(value.get("prediction"), str)
    }


def shared_ids(runs: dict[str, dict]) -> tuple[list[str], int]:
    """The ids in every file, in the first file's order, and how many ids the others leave out; refused when the
    files disagree on a reference (other test sets) or share fewer than MIN_SHARED_IDS."""
    files = list(runs.values())
    ids = [example_id for example_id in files[0] if all(example_id in run for run in files[1:])]
    every_id = set().union(*files)
    for example_id in ids:
        if len({run[example_id]["reference"] for run in files}) > 1:
            raise UsageError(
                f"test id {example_id} has different references in the --compare files, so they come from different "
                "test sets; compare runs evaluated on the same data"
            )
    if len(ids) < MIN_SHARED_IDS:
        raise UsageError(
            f"the --compare files share {len(ids)} test ids, fewer than {MIN_SHARED_IDS}: too few for a comparison"
        )
    return ids, len(every_id) - len(ids)


def model_columns(runs: dict[str, dict], ids: list[str]) -> dict[str, list[str]]:
    """Predictions per model column on `ids`: `label/column` for each file's models, or `label` for outside
    predictions; base columns that agree on every prediction are kept once, as `base`."""
    columns: dict[str, list[str]] = {}
    for label, run in runs.items():
        names = line_columns(run[ids[0]])
        for name in names:
            texts = [line_columns(run[example_id]).get(name, "") for example_id in ids]
            if name == BASE and columns.get(BASE, texts) == texts:
                columns[BASE] = texts
            else:
                columns[f"{label}/{name}" if name else label] = texts
    return dict(sorted(columns.items(), key=lambda column: column[0] != BASE))  # the base's row first


if __name__ == "__main__":
    sys.exit(run_stage(main, EvalConfig))
