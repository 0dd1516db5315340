"""evaluate.py as a study: adapters equal but for the training seed form arms, compared by the interval of their
seeds."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import TINY_TRAINING_FLAGS, load_script, run_in_process
from evaluate_runs_test import read_lines, run

from lora_summarization.comparison import arm_difference
from lora_summarization.evaluation import paired_bootstrap

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ARMS = {"learning_rate=0.01": "a", "learning_rate=0.02": "b"}
SAMPLES = "200"


@pytest.fixture(scope="session")
def evaluate_script():
    return load_script("evaluate.py")


@pytest.fixture(scope="session")
def seed_runs(tmp_path_factory, tiny_model_dir, data_dir):
    """Two arms (learning rate 1e-2 and 2e-2) of two seeds each, trained by train.py for 2 steps."""
    root = tmp_path_factory.mktemp("seed-runs")
    folders = {}
    for learning_rate, arm in (("1e-2", "a"), ("2e-2", "b")):
        for seed in (1, 2):
            folder = folders[f"{arm}_s{seed}"] = root / f"{arm}_s{seed}"
            result = run_in_process(
                "train.py",
                *("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", folder, "--seed", seed),
                *("--max-steps", "2", "--eval-steps", "2", "--save-steps", "2", "--eval-examples", "4"),
                *TINY_TRAINING_FLAGS,
                *("--learning-rate", learning_rate),
            )
            assert result.returncode == 0, result.stderr[-3000:]
    return folders


def evaluate(evaluate_script, tiny_model_dir, study_data_dir, output_dir, *adapters):
    code, out, err = run(
        evaluate_script,
        *("--model", tiny_model_dir, "--adapter", *adapters, "--data-dir", study_data_dir, "--output-dir", output_dir),
        *("--max-new-tokens", "8", "--no-published-loss", "--bootstrap-samples", SAMPLES, "--seed", "5"),
    )
    assert code == 0, err[-3000:]
    return json.loads((output_dir / "evaluation_results.json").read_text()), out


@pytest.fixture(scope="session")
def study(evaluate_script, tmp_path_factory, tiny_model_dir, study_data_dir, seed_runs):
    output_dir = tmp_path_factory.mktemp("study")
    started = time.perf_counter()
    results, out = evaluate(evaluate_script, tiny_model_dir, study_data_dir, output_dir, *seed_runs.values())
    print(f"seed-grouped evaluation of {len(seed_runs)} tiny adapters: {time.perf_counter() - started:.1f} s")
    return results, out, read_lines(output_dir / "evaluation_predictions.jsonl")


def per_example(lines: list[dict], rows: list[str], metric: str) -> np.ndarray:
    return np.array([[line[row][metric] for line in lines] for row in rows])


def test_seeds_of_one_setting_form_an_arm_named_by_the_setting_with_mean_and_sd(study, seed_runs):
    results, out, lines = study
    assert list(results["models"]) == ["base", *seed_runs]  # every seed keeps its own row
    assert list(results["arms"]) == list(ARMS)
    for name, arm in ARMS.items():
        rows = [f"{arm}_s1", f"{arm}_s2"]
        assert results["arms"][name]["models"] == rows and results["arms"][name]["seeds"] == [1, 2]
        for metric in ("loss", "content_loss", *ROUGE):
            values = [results["models"][row][metric] for row in rows]
            assert results["arms"][name]["mean"][metric] == pytest.approx(np.mean(values))
            assert results["arms"][name]["std"][metric] == pytest.approx(np.std(values, ddof=1))
    assert "arm (mean +- sd over seeds)" in out and "learning_rate=0.02 minus learning_rate=0.01:" in out
    assert out.count("estimate their seed variance from few degrees of freedom") == 1
    assert "learning_rate=0.01 (2), learning_rate=0.02 (2)" in results["seed_note"]


def test_arms_are_compared_by_the_interval_of_their_seeds(study):
    results, out, lines = study
    pairs = [(c["model"], c["against"]) for c in results["comparisons"]]
    first, later = ARMS
    assert pairs == [(first, "base"), (later, "base"), (later, first)]
    for metric in ROUGE:
        b, a = (per_example(lines, [f"{arm}_s1", f"{arm}_s2"], metric) for arm in ("b", "a"))
        expected = arm_difference(b, a, False, int(SAMPLES), seed=5)
        assert results["comparisons"][2]["difference"][metric] == expected
        assert 0 <= expected["seed_pairs_better"] <= 1
    assert "seed pairs better" in out and "P(better)" not in out


def test_one_seed_per_arm_gives_the_paired_bootstrap_of_a_single_run(
    evaluate_script, tmp_path, tiny_model_dir, study_data_dir, seed_runs
):
    one_seed_each = seed_runs["a_s1"], seed_runs["b_s1"]
    results, out = evaluate(evaluate_script, tiny_model_dir, study_data_dir, tmp_path, *one_seed_each)
    assert "arms" not in results and [c["model"] for c in results["comparisons"]] == ["a_s1", "b_s1", "b_s1"]
    lines = read_lines(tmp_path / "evaluation_predictions.jsonl")
    for metric in ROUGE:
        b, a = (per_example(lines, [row], metric)[0] for row in ("b_s1", "a_s1"))
        assert results["comparisons"][2]["difference"][metric] == paired_bootstrap(b, a, False, int(SAMPLES), 5)
    assert "leave out the seed variance of arms with one seed (train more seeds to include it): a_s1 (1)" in out


def test_lengths_of_the_summaries_and_the_empty_ones_are_reported(study, seed_runs):
    results, out, lines = study
    for row in ("base", *seed_runs):
        predictions = [line[row]["prediction"] for line in lines]
        assert results["models"][row]["summary_words"] == pytest.approx(np.mean([len(p.split()) for p in predictions]))
        assert results["models"][row]["empty_predictions"] == sum(not p.strip() for p in predictions)
    references = [line["reference"] for line in lines]
    assert results["reference_words"] == pytest.approx(np.mean([len(r.split()) for r in references]))
    assert "words" in out and "empty" in out and "references: " in out


def test_compare_of_files_groups_seeds_into_the_same_arms_with_the_same_numbers(
    evaluate_script, study, tmp_path, tiny_model_dir, study_data_dir, seed_runs
):
    results, _, _ = study
    for arm in ARMS.values():
        seeds = seed_runs[f"{arm}_s1"], seed_runs[f"{arm}_s2"]
        evaluate(evaluate_script, tiny_model_dir, study_data_dir, tmp_path / arm, *seeds)
    files = [tmp_path / arm / "evaluation_predictions.jsonl" for arm in ARMS.values()]
    code, out, err = run(
        evaluate_script, "--compare", *files, "--output-dir", tmp_path, "--bootstrap-samples", SAMPLES, "--seed", "5"
    )
    assert code == 0, err
    compared = json.loads((tmp_path / "comparison_results.json").read_text())
    assert list(compared["arms"]) == list(ARMS)
    for in_process, from_files in zip(results["comparisons"], compared["comparisons"], strict=True):
        assert (from_files["model"], from_files["against"]) == (in_process["model"], in_process["against"])
        assert from_files["difference"] == {metric: in_process["difference"][metric] for metric in ROUGE}
    for name in ARMS:
        assert compared["arms"][name]["mean"] == {m: results["arms"][name]["mean"][m] for m in ROUGE}
        assert compared["arms"][name]["seeds"] == [1, 2]
    assert compared["reference_words"] == results["reference_words"]
    assert "summary_words" in compared["models"]["base"] and "learning_rate=0.02 minus learning_rate=0.01:" in out
