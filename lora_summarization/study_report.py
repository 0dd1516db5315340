"""A study's report.md: what was run and what it cost, evaluate.py's tables of the arms and their comparisons, its
chart, and the runs that failed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .cli import write_atomic
from .study import EVALUATION, REPORT, RunState, Study, format_value, of_state, states

# evaluate.py's outputs, named here rather than imported: comparison.py loads torch, which --status does not need
RESULTS_FILE, CHART_FILE = "evaluation_results.json", "evaluation_chart.png"


def evaluation_results(study: Study) -> dict | None:
    path = study.folder / EVALUATION / RESULTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def evaluation_up_to_date(study: Study) -> bool:
    """Whether the evaluation scored exactly the finished runs, with the study's evaluation options."""
    results = evaluation_results(study)
    if results is None:
        return False
    finished = {str(state.run.folder) for state in of_state(states(study, {}), "finished")}
    evaluated = {str(Path(folder).resolve()) for folder in results["adapters"].values()}
    options = {key: results["settings"].get(key) for key in ("max_examples", "max_new_tokens")}
    return evaluated == finished and options == {key: study.evaluation[key] for key in options}


def write_report(study: Study, found: list[RunState], evaluation_failed: str | None) -> Path:
    path = study.folder / REPORT
    parts = [f"# Study {study.folder.name}", settings_section(study), runs_section(found)]
    parts.append(results_section(study, evaluation_failed))
    if failed := of_state(found, "failed"):
        parts.append("## Failed runs\n\nRerun the study's command to resume them.\n\n" + bullet_lines(failed))
    write_atomic(path, "\n\n".join(parts) + "\n")
    return path


def settings_section(study: Study) -> str:
    grid = "; ".join(f"{key} = {', '.join(map(format_value, study.values[key]))}" for key in study.dimensions)
    fixed = ", ".join(f"{key}={format_value(value)}" for key, value in study.fixed.items())
    return "\n".join(
        [
            f"- grid: {grid or 'none (one arm)'}",
            f"- seeds: {', '.join(map(str, study.seeds))}",
            f"- fixed settings: {fixed or 'train.py defaults'}",
            f"- launcher: {study.launcher['name']}",
        ]
    )


def runs_section(found: list[RunState]) -> str:
    counts = Counter(state.state for state in found)
    line = f"{len(found)} runs: " + ", ".join(f"{count} {name}" for name, count in counts.items())
    seconds = [runtime_seconds(state) for state in of_state(found, "finished")]
    if seconds:
        line += (
            f". Training cost: {len(seconds)} finished runs x {sum(seconds) / len(seconds):,.0f} s on average "
            f"(runtime_seconds) = {sum(seconds):,.0f} s of training"
        )
    return f"## Runs\n\n{line}.\n\n{bullet_lines(found)}"


def runtime_seconds(state: RunState) -> float:
    summary = json.loads((state.run.folder / "training_summary.json").read_text(encoding="utf-8"))
    return float(summary.get("runtime_seconds") or 0.0)


def bullet_lines(found: list[RunState]) -> str:
    return "\n".join(f"- {state.line()}" for state in found)


def results_section(study: Study, evaluation_failed: str | None) -> str:
    if evaluation_failed:
        return f"## Results\n\nThe evaluation failed: {evaluation_failed}"
    results = evaluation_results(study)
    if results is None:
        return "## Results\n\nNo run has finished yet."
    from .comparison import study_report

    return (
        f"## Results\n\nevaluate.py on {results['n']:,} test examples ({EVALUATION}/{RESULTS_FILE}): each model, "
        "each arm's mean +- standard deviation over its seeds, and each comparison of arms with its 95% interval.\n\n"
        f"```text\n{study_report(results)}\n```\n\n![each arm's seeds, mean and interval]({EVALUATION}/{CHART_FILE})"
    )
