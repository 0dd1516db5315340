"""Finished runs side by side: prediction files read and matched on the test ids they share."""

from __future__ import annotations

import json
from pathlib import Path

from .cli import UsageError
from .prompts import extract_summary

PREDICTIONS_FILE = "evaluation_predictions.jsonl"
BASE = "base"  # the base model's row, with every adapter disabled
MIN_SHARED_IDS = 20


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
