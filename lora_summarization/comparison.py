"""Runs side by side: prediction files read and matched on the test ids they share, adapters grouped into arms of
seeds, and the two-level bootstrap between arms."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arms import FINE_TUNED, group_arms
from .cli import UsageError, read_json_object, write_json
from .evaluation import (
    COMPARED,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    ModelScores,
    bootstrap_summary,
    comparison_plan,
    format_report,
    mean_words,
    rouge_scores,
)
from .prompts import extract_summary
from .run_folder import CHECKPOINTS_FOLDER

PREDICTIONS_FILE = "evaluation_predictions.jsonl"
RESULTS_FILE = "evaluation_results.json"  # beside the predictions; it holds each adapter's training settings
BASE = "base"  # the base model's row, with every adapter disabled
MIN_SHARED_IDS = 20
NO_ADAPTER = "none"  # --adapter none: score --model alone
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")


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


@dataclass
class ComparedRuns:
    files: dict[str, str]  # each --compare file by its label
    ids: list[str]  # the test ids every file holds, in the first file's order
    dropped: int  # ids some files leave out
    references: list[str]
    columns: dict[str, list[str]]  # see model_columns


def read_compared_runs(paths: list[str]) -> ComparedRuns:
    files = run_labels(paths)
    check_scored_alike(files)
    runs = {label: read_run(Path(path)) for label, path in files.items()}
    ids, dropped = shared_ids(runs)
    references = [next(iter(runs.values()))[example_id]["reference"] for example_id in ids]
    return ComparedRuns(files, ids, dropped, references, model_columns(runs, ids))


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


def column_settings(files: dict[str, str], columns: list[str]) -> dict[str, dict | None]:
    """The training settings of each `label/row` column, from the results file beside the label's predictions
    file (None for outside predictions, or where that file is missing)."""
    recorded = {label: recorded_settings(Path(path)) for label, path in files.items()}
    settings = {}
    for column in columns:
        label, _, row = column.partition("/")
        settings[column] = recorded.get(label, {}).get(row) if row else None
    return settings


def recorded_settings(predictions_file: Path) -> dict:
    return results_beside(predictions_file).get("training_settings", {})


def results_beside(predictions_file: Path) -> dict:
    """The results file evaluate.py wrote beside its predictions file ({} for outside predictions, or where it
    is missing)."""
    if predictions_file.name != PREDICTIONS_FILE:
        return {}
    results = predictions_file.parent / RESULTS_FILE
    return read_json_object(results, "a results file written by evaluate.py") or {}


# How evaluate.py scored a file: predictions scored otherwise do not compare.
SCORED_ALIKE = {
    "test_sha256": "test set",
    "precision": "--precision",
    "max_new_tokens": "--max-new-tokens",
    "max_length": "--max-length",
    "system_prompt": "--system-prompt",
}


def check_scored_alike(files: dict[str, str]) -> None:
    """Refuse files whose results files record a different test set or scoring setting (a setting a file does not
    record is not compared)."""
    scored = {path: results_beside(Path(path)).get("settings", {}) for path in files.values()}
    for name, label in SCORED_ALIKE.items():
        values = {path: settings[name] for path, settings in scored.items() if name in settings}
        if len({json.dumps(value) for value in values.values()}) > 1:
            listed = ", ".join(f"{value!r} in {path}" for path, value in values.items())
            raise UsageError(
                f"the --compare files were scored with a different {label} ({listed}); compare files scored alike"
            )


FEW_SEEDS = 3  # below this an arm's interval cannot hold seed variance
ENOUGH_SEEDS = 5  # from this on the seed part of an interval is no longer clearly optimistic


def two_level_bootstrap(
    candidate: np.ndarray,
    reference: np.ndarray,
    lower_is_better: bool,
    samples: int,
    seed: int,
    weights: np.ndarray | None = None,
) -> dict:
    """Candidate arm minus reference arm, each a (seeds, examples) array of per-example scores, resampled twice:
    test examples with replacement (one draw for both arms, the draw of paired_bootstrap for this seed) and,
    independently for each arm, its seeds with replacement. The statistic is the difference of the arms' means
    over seeds of the (weighted) example mean. With one seed per arm this is exactly paired_bootstrap.

    With several seeds, `seed_pairs_better` is P(candidate > reference) over every pair of one seed from each arm
    (ties count half), on the corpus metric.
    """
    candidate, reference = np.atleast_2d(candidate), np.atleast_2d(reference)
    count = candidate.shape[1]
    weights = np.ones(count) if weights is None else np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    resampled = rng.integers(0, count, size=(samples, count))  # drawn first, as paired_bootstrap draws them
    differences = resampled_seed_means(candidate, rng, samples) - resampled_seed_means(reference, rng, samples)
    means = np.take_along_axis(differences * weights, resampled, axis=1).sum(axis=1) / weights[resampled].sum(axis=1)
    result = bootstrap_summary(means, candidate.mean(axis=0) - reference.mean(axis=0), weights, lower_is_better)
    if len(candidate) > 1 or len(reference) > 1:
        result["seed_pairs_better"] = seed_pairs_better(candidate, reference, weights, lower_is_better)
    return result


def resampled_seed_means(scores: np.ndarray, rng: np.random.Generator, samples: int) -> np.ndarray:
    """Per resample, each example's mean over the arm's seeds drawn with replacement: (samples or 1, examples).

    Resampling k seeds shrinks their variance by (k-1)/k, so the deviations from the seed mean are widened by
    sqrt(k/(k-1)) first.
    """
    seeds = len(scores)
    if seeds == 1:
        return scores
    centre = scores.mean(axis=0)
    widened = centre + math.sqrt(seeds / (seeds - 1)) * (scores - centre)
    drawn = rng.integers(0, seeds, size=(samples, seeds))
    counts = (drawn[:, :, None] == np.arange(seeds)).sum(axis=1)
    return counts @ widened / seeds


def seed_pairs_better(candidate: np.ndarray, reference: np.ndarray, weights: np.ndarray, lower_is_better: bool):
    ours = np.average(candidate, axis=1, weights=weights)[:, None]
    theirs = np.average(reference, axis=1, weights=weights)[None, :]
    better = ours < theirs if lower_is_better else ours > theirs
    return float((better + 0.5 * (ours == theirs)).mean())


def compare_arms(scores: dict[str, ModelScores], arms: dict[str, list[str]], samples: int, seed: int) -> list[dict]:
    """Two-level bootstraps of every arm against the base and of every later arm against the first, per metric
    that all their rows have (losses token-weighted)."""
    return [
        {
            "model": name,
            "against": against,
            "difference": compare_arm_pair(scores, arms[name], arms[against], samples, seed),
        }
        for name, against in comparison_plan(list(arms), BASE)
    ]


def compare_arm_pair(scores: dict[str, ModelScores], rows: list[str], against: list[str], samples: int, seed: int):
    metrics = [scores[row].compared_metrics() for row in rows]
    references = [scores[row].compared_metrics() for row in against]
    return {
        name: two_level_bootstrap(
            np.stack([row[name][0] for row in metrics]),
            np.stack([row[name][0] for row in references]),
            name in LOWER_IS_BETTER,
            samples,
            seed,
            weights,
        )
        for name, (_, weights) in metrics[0].items()
        if all(name in row for row in metrics + references)
    }


def arm_summaries(summaries: dict[str, dict], arms: dict[str, list[str]], seeds: dict[str, int | None]) -> dict:
    """Per arm of several rows: its rows and their seeds, and the mean and standard deviation over seeds of each
    compared metric."""
    return {
        name: {
            "models": rows,
            "seeds": [seeds.get(row) for row in rows],
            "mean": {metric: float(np.mean(values)) for metric, values in arm_values(summaries, rows).items()},
            "std": {metric: float(np.std(values, ddof=1)) for metric, values in arm_values(summaries, rows).items()},
        }
        for name, rows in arms.items()
        if len(rows) > 1
    }


def arm_values(summaries: dict[str, dict], rows: list[str]) -> dict[str, list[float]]:
    return {metric: [summaries[row][metric] for row in rows] for metric in COMPARED if metric in summaries[rows[0]]}


def seed_note(arms: dict[str, list[str]]) -> str:
    """Which arms' intervals leave out seed variance (under FEW_SEEDS seeds) or understate it (under ENOUGH_SEEDS)."""
    counts = {name: len(rows) for name, rows in arms.items() if name != BASE}
    few = [f"{name} ({n})" for name, n in counts.items() if n < FEW_SEEDS]
    some = [f"{name} ({n})" for name, n in counts.items() if FEW_SEEDS <= n < ENOUGH_SEEDS]
    parts = []
    if few:
        parts.append(
            f"the intervals cannot include seed variance for arms with under {FEW_SEEDS} seeds: {', '.join(few)}"
        )
    if some:
        parts.append(
            f"the intervals are optimistic for arms with {FEW_SEEDS}-{ENOUGH_SEEDS - 1} seeds (a bootstrap over few "
            f"seeds underestimates their spread): {', '.join(some)}"
        )
    return "; ".join(parts)


def study_results(
    scores: dict[str, ModelScores], settings: dict, references: list[str], samples: int, seed: int
) -> dict:
    """The models' summaries, their arms (adapters equal but for the seed) and the arms' two-level comparisons.

    `settings` holds the training settings of the rows that have them."""
    rows = {name: settings.get(name) for name in scores if name != BASE}
    arms = {**({BASE: [BASE]} if BASE in scores else {}), **group_arms(rows)}
    summaries = {name: model_scores.summary() for name, model_scores in scores.items()}
    seeds = {row: (row_settings or {}).get("seed") for row, row_settings in settings.items()}
    generated = next(iter(scores.values())).predictions is not None
    return {
        "models": summaries,
        **({"reference_words": mean_words(references)} if generated else {}),
        **({"arms": arm_summaries(summaries, arms, seeds)} if any(len(rows) > 1 for rows in arms.values()) else {}),
        "comparisons": compare_arms(scores, arms, samples, seed),
        "seed_note": seed_note(arms),
        "training_settings": settings,
    }


def study_report(study: dict) -> str:
    return format_report(
        study["models"], study["comparisons"], study.get("arms"), study.get("reference_words"), study["seed_note"]
    )


def adapter_rows(folders: list[str]) -> dict[str, str]:
    """Each adapter folder by its row name: `fine_tuned` when alone, else the folder's name, and for a checkpoint
    its run's and its own (`run_a/checkpoint-40`); none for `none`."""
    if NO_ADAPTER in folders:
        if len(folders) > 1:
            raise UsageError(f"--adapter {NO_ADAPTER} scores --model alone; give it without adapter folders")
        return {}
    if len(folders) == 1:
        return {FINE_TUNED: folders[0]}
    rows: dict[str, str] = {}
    for folder in folders:
        name = row_name(folder)
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


def row_name(folder: str) -> str:
    """A folder's name; a checkpoint's (run/checkpoints/checkpoint-N) with its run's in front, so that the same step
    of two runs does not collide."""
    path = Path(folder).resolve()
    if not CHECKPOINT_NAME.fullmatch(path.name):
        return path.name
    run = path.parent.parent if path.parent.name == CHECKPOINTS_FOLDER else path.parent
    return f"{run.name}/{path.name}"


def rescore(score_file: str, output_dir: str) -> None:
    """ROUGE of outside predictions, computed exactly as for our own (a leading `Summary:` is removed too).

    The means go to `<output-dir>/<file stem>_rouge.json`.
    """
    pairs = read_jsonl(Path(score_file), "--score")
    for number, pair in enumerate(pairs, start=1):
        if not all(isinstance(pair.get(key), str) for key in ("prediction", "reference")):
            raise UsageError(f'{score_file} line {number} needs the text fields "prediction" and "reference"')
    rouge = rouge_scores([extract_summary(pair["prediction"]) for pair in pairs], [pair["reference"] for pair in pairs])
    means = {name: float(scores.mean()) for name, scores in rouge.items()}
    output = Path(output_dir) / f"{Path(score_file).stem}_rouge.json"
    write_json(output, {"file": score_file, "n": len(pairs), **means})
    print(f"ROUGE F1 x100 of {len(pairs):,} predictions in {score_file} (also in {output}):")
    for name, mean in means.items():
        print(f"{METRIC_NAMES[name]:<11}{100 * mean:>8.2f}")
