"""Runs side by side: prediction files read and matched on the test ids they share, adapters grouped into arms of
seeds, and the variance-components t interval between arms."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from .arms import FINE_TUNED, group_arms
from .cli import UsageError, read_json_object, write_json
from .evaluation import (
    COMPARED,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    ModelScores,
    comparison_plan,
    format_report,
    mean_words,
    paired_bootstrap,
    rouge_scores,
    win_and_tie_rates,
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


def arm_difference(
    candidate: np.ndarray,
    reference: np.ndarray,
    lower_is_better: bool,
    samples: int,
    seed: int,
    weights: np.ndarray | None = None,
) -> dict:
    """Candidate arm minus reference arm, each a (seeds, examples) array of per-example scores on the same test
    examples: the difference of the arms' means over seeds of the (weighted) example mean, with a 95% t interval
    from the variance components of `difference_variance`. With one seed per arm it is exactly paired_bootstrap
    (`samples` and `seed` serve only there).

    `share_not_better` is the t distribution's P(difference <= 0) (>= 0 where lower is better), centred on the
    difference with scale `se`: a summary of the interval, not a probability that the arms differ. `df` is the
    interval's degrees of freedom. `seed_pairs_better` is the share of pairs of one seed from each arm in which the
    candidate's corpus metric is better (ties count half): a count over seed pairs, not a probability.
    """
    candidate, reference = np.atleast_2d(candidate), np.atleast_2d(reference)
    if len(candidate) == len(reference) == 1:
        return paired_bootstrap(candidate[0], reference[0], lower_is_better, samples, seed, weights)
    weights = np.ones(candidate.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    difference, variance, degrees = difference_variance(candidate, reference, weights)
    se, gain = math.sqrt(variance), -difference if lower_is_better else difference
    half_width = se * student_t.ppf(0.975, degrees)
    return {
        "mean": float(difference),
        "ci95": [float(difference - half_width), float(difference + half_width)],
        "share_not_better": float(student_t.cdf(-gain / se, degrees)) if se > 0 else float(gain <= 0),
        **win_and_tie_rates(candidate.mean(axis=0) - reference.mean(axis=0), lower_is_better),
        "se": se,
        "df": float(degrees),
        "seed_pairs_better": seed_pairs_better(candidate, reference, weights, lower_is_better),
    }


def difference_variance(candidate: np.ndarray, reference: np.ndarray, weights: np.ndarray):
    """The difference of two arms' means, its estimated variance and that estimate's degrees of freedom, for
    arms given as (..., seeds, examples) arrays that share their examples (any leading shape: the calibration
    simulation passes many replications at once).

    Model, per arm a with k_a seeds on n shared examples: Y_a[s, i] = m_a + u_a(i) + v_a(s) + e_a(s, i), with
    example effects u (paired between arms: the same dialogues), seed effects v (independent between arms) and a
    seed x example interaction e. The estimate D = g_c - g_r, g_a the mean over seeds of the weighted example
    mean, has
        Var(D) = var(u_c - u_r) / n + sum_a [var(v_a) / k_a + var(e_a) / (k_a n)].
    Weights (token counts for losses) enter by linearising the ratio of weighted sums: pseudo-values
    Z_a[s, i] = c_i (Y_a[s, i] - g_a) with c_i = n w_i / sum(w) take the unweighted formulas, 1/n becoming
    sum(w^2) / sum(w)^2. Three mean squares estimate the parts:
      - S2_d, the variance over examples of c_i (d_i - D), d_i the difference of the seed-averaged scores:
        var(u_c - u_r) + sum_a var(e_a) / k_a, with n - 1 degrees of freedom;
      - per arm, S2_M, the variance over seeds of its weighted seed means: var(v_a) + var(e_a) sum(c^2) / n^2,
        with k_a - 1;
      - per arm, MS_res, the two-way (seed x example) residual mean square, each cell's squared residual times
        c_i^2: var(e_a) mean(c^2), with (k_a - 1)(n - 1).
    Then V = S2_d / n + sum_a (S2_M - MS_res / n) / k_a is unbiased for Var(D): S2_d already holds each arm's
    interaction, and subtracting MS_res / n removes the second copy that S2_M holds. Resampling seeds inside
    resampled examples (a two-level bootstrap) counts that interaction twice (Owen 2007, "The pigeonhole
    bootstrap"; McCullagh 2000), an interval up to ~1.6x too wide where the interaction dominates.
    Var(D) can be no less than the examples' part, so the seed part is cut at 0 (all arms together); an arm of
    one seed has no seed part (exact for the base model, which has no seed variance; else the interval leaves
    the arm's seed variance out).

    Degrees of freedom (Satterthwaite): V / Var(D) is taken as chi-square over nu. With the parts' terms
    t_j = c_j S_j (f_j degrees of freedom each), nu = Var(D)^2 / sum_j (c_j sigma_j^2)^2 / f_j; estimated with the
    unbiased estimates of those squares, t_j^2 / (f_j + 2), and of Var(D)^2, V^2 - 2 sum_j t_j^2 / (f_j + 2):
    nu = V^2 / sum_j t_j^2 / (f_j + 2) - 2, exact for a single part. The plug-in t_j^2 / f_j makes nu too small
    with few seeds (3 v 3 seeds covered 96.6%, not 95%). Where the seed part was cut at 0 it adds no terms.
    benchmarks/interval_calibration.py measures the coverage and width in each regime; tests/arms_test.py checks it.
    """
    examples = candidate.shape[-1]
    scale = examples * weights / weights.sum()
    seed_means = [np.average(arm, axis=-1, weights=weights) for arm in (candidate, reference)]
    difference = seed_means[0].mean(axis=-1) - seed_means[1].mean(axis=-1)
    paired = scale * (candidate.mean(axis=-2) - reference.mean(axis=-2) - difference[..., None])
    example_part = (paired**2).sum(axis=-1) / ((examples - 1) * examples)
    arms = zip((candidate, reference), seed_means, strict=True)
    parts = [seed_part(arm, means, scale) for arm, means in arms if arm.shape[-2] > 1]
    seed_variance = sum((part for part, _ in parts), np.zeros_like(difference))
    seed_squares = sum((squared for _, squared in parts), np.zeros_like(difference))
    variance = example_part + np.maximum(seed_variance, 0)
    squares = example_part**2 / (examples + 1) + np.where(seed_variance > 0, seed_squares, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        degrees = np.where(squares > 0, variance**2 / squares - 2, np.inf)
    return difference, variance, np.maximum(degrees, 1)


def seed_part(scores: np.ndarray, seed_means: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One arm's (S2_M - MS_res / n) / k and its terms' squares over (f + 2), for difference_variance."""
    seeds, examples = scores.shape[-2:]
    spread = seed_means.var(axis=-1, ddof=1) / seeds
    residuals = (
        scores
        - scores.mean(axis=-1, keepdims=True)
        - scores.mean(axis=-2, keepdims=True)
        + scores.mean(axis=(-2, -1), keepdims=True)
    )
    residual_degrees = (seeds - 1) * (examples - 1)
    interaction = (scale**2 * residuals**2).sum(axis=(-2, -1)) / (residual_degrees * seeds * examples)
    return spread - interaction, spread**2 / (seeds + 1) + interaction**2 / (residual_degrees + 2)


def seed_pairs_better(candidate: np.ndarray, reference: np.ndarray, weights: np.ndarray, lower_is_better: bool):
    ours = np.average(candidate, axis=1, weights=weights)[:, None]
    theirs = np.average(reference, axis=1, weights=weights)[None, :]
    better = ours < theirs if lower_is_better else ours > theirs
    return float((better + 0.5 * (ours == theirs)).mean())


def compare_arms(scores: dict[str, ModelScores], arms: dict[str, list[str]], samples: int, seed: int) -> list[dict]:
    """Differences (arm_difference) of every arm against the base and of every later arm against the first, per
    metric that all their rows have (losses token-weighted)."""
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
        name: arm_difference(
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


ENOUGH_SEEDS = 5  # two arms of 5 seeds give ~8 degrees of freedom: a t quantile within ~20% of the normal one


def seed_note(arms: dict[str, list[str]]) -> str:
    """What the intervals hold of seed variance, as benchmarks/interval_calibration.py shows it: nothing for an arm
    of one seed (exact for the base model, too narrow for a trained arm whose seeds matter); with 2 or more seeds
    the width is honest, but few seeds give the t few degrees of freedom, so the intervals are wide."""
    counts = {name: len(rows) for name, rows in arms.items() if name != BASE}
    single = [f"{name} (1)" for name, n in counts.items() if n == 1]
    few = [f"{name} ({n})" for name, n in counts.items() if 1 < n < ENOUGH_SEEDS]
    parts = []
    if single:
        parts.append(
            "the intervals leave out the seed variance of arms with one seed (train more seeds to include it): "
            + ", ".join(single)
        )
    if few:
        parts.append(
            f"the intervals of arms with 2-{ENOUGH_SEEDS - 1} seeds estimate their seed variance from few degrees of "
            f"freedom (the df column), so they are honest but wide: {', '.join(few)}"
        )
    return "; ".join(parts)


def study_results(
    scores: dict[str, ModelScores], settings: dict, references: list[str], samples: int, seed: int
) -> dict:
    """The models' summaries, their arms (adapters that trained the same thing) and the arms' comparisons
    (arm_difference).

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
