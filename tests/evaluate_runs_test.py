"""evaluate.py as a research instrument: several adapters in one call, and --compare of finished runs' files."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest
from conftest import load_script, save_tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_summarization import data
from lora_summarization.synthetic import make_examples

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TEST_EXAMPLES = 24  # --compare needs at least 20 shared ids


@pytest.fixture(scope="session")
def evaluate_script():
    return load_script("evaluate.py")


@pytest.fixture(scope="session")
def test_data_dir(tmp_path_factory):
    """A test file of 24 synthetic dialogues, unseen in training."""
    folder = tmp_path_factory.mktemp("compare-data")
    records = [data.make_record(e["id"], e["dialogue"], e["summary"]) for e in make_examples(TEST_EXAMPLES, seed=999)]
    (folder / data.TEST_FILE).write_text(json.dumps(records), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_model_dir, trained_adapter_dir):
    """The 80-step adapter, and a freshly initialised one (B = 0, so it equals the base) of another rank and
    other target modules."""
    folder = tmp_path_factory.mktemp("adapters")
    zero = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), zero).save_pretrained(folder / "zero_init")
    shutil.copytree(trained_adapter_dir, folder / "trained", ignore=shutil.ignore_patterns("checkpoints", "runs"))
    return {"zero_init": folder / "zero_init", "trained": folder / "trained"}


def run(evaluate_script, *argv) -> tuple[int, str, str]:
    """evaluate.py in-process (module fixtures cannot use capsys); returns exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = evaluate_script.run_stage(evaluate_script.main, evaluate_script.EvalConfig, [str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


def evaluate(evaluate_script, tiny_model_dir, test_data_dir, output_dir, *adapter_dirs):
    code, out, err = run(
        evaluate_script,
        *("--model", tiny_model_dir, "--adapter", *adapter_dirs, "--data-dir", test_data_dir),
        *("--output-dir", output_dir, "--max-new-tokens", "16", "--no-published-loss"),
    )
    assert code == 0, err[-3000:]
    return json.loads((output_dir / "evaluation_results.json").read_text()), out


@pytest.fixture(scope="session")
def runs(evaluate_script, tmp_path_factory, tiny_model_dir, test_data_dir, adapters):
    """Both adapters in one call (zero_init first: the reference run), and each alone in its own run folder."""
    root = tmp_path_factory.mktemp("runs")
    together = evaluate(
        evaluate_script, tiny_model_dir, test_data_dir, root / "together", adapters["zero_init"], adapters["trained"]
    )
    alone = {
        name: evaluate(evaluate_script, tiny_model_dir, test_data_dir, root / f"{name}_run", folder)[0]
        for name, folder in adapters.items()
    }
    return root, together, alone


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path, lines: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_two_adapters_get_a_row_each_and_are_compared_with_the_base_and_the_first(runs, adapters):
    root, (results, out), alone = runs
    assert list(results["models"]) == ["base", "zero_init", "trained"]
    pairs = [(c["model"], c["against"]) for c in results["comparisons"]]
    assert pairs == [("zero_init", "base"), ("trained", "base"), ("trained", "zero_init")]
    assert "fine_tuned" not in results and results["adapters"] == {k: str(v) for k, v in adapters.items()}

    trained_vs_zero = results["comparisons"][2]["difference"]
    for loss in ("loss", "content_loss"):
        assert trained_vs_zero[loss]["ci95"][1] < 0  # the trained adapter is better, and the interval says so
    assert results["models"]["zero_init"] == results["models"]["base"]  # B = 0 adds nothing
    # The base and each adapter score as they do when evaluated alone.
    assert results["models"]["base"] == alone["trained"]["base"] == alone["zero_init"]["base"]
    assert results["models"]["trained"] == alone["trained"]["fine_tuned"]
    assert results["comparisons"][1]["difference"] == alone["trained"]["difference"]

    lines = read_lines(root / "together" / "evaluation_predictions.jsonl")
    assert len(lines) == 24 and all({"base", "zero_init", "trained"} <= set(line) for line in lines)
    assert (root / "together" / "evaluation_chart.png").read_bytes().startswith(b"\x89PNG")
    assert "trained minus zero_init:" in out and "zero_init minus base:" in out


def test_each_adapters_model_card_gets_its_own_metrics(runs, adapters):
    _, (results, _), _ = runs
    for name, folder in adapters.items():
        evaluation = (folder / "README.md").read_text(encoding="utf-8").split("## Evaluation")[1]
        tuned_loss = results["models"][name]["loss"]
        assert f"| loss | {results['models']['base']['loss']:.4f} | {tuned_loss:.4f} |" in evaluation


def test_compare_of_the_runs_files_reproduces_the_in_process_differences(evaluate_script, runs, tmp_path):
    root, (results, _), _ = runs
    files = [
        root / "zero_init_run" / "evaluation_predictions.jsonl",
        root / "trained_run" / "evaluation_predictions.jsonl",
    ]
    code, out, err = run(evaluate_script, "--compare", *files, "--output-dir", tmp_path)
    assert code == 0, err
    compared = json.loads((tmp_path / "comparison_results.json").read_text())
    assert list(compared["models"]) == ["base", "zero_init_run/fine_tuned", "trained_run/fine_tuned"]
    assert compared["n"] == 24 and compared["ids_not_in_every_file"] == 0
    for in_process, from_files in zip(results["comparisons"], compared["comparisons"], strict=True):
        assert set(from_files["difference"]) == set(ROUGE)  # no model, so no loss
        for metric in ROUGE:
            assert from_files["difference"][metric] == in_process["difference"][metric]
    for name, row in zip(results["models"], compared["models"].values(), strict=True):
        assert {metric: row[metric] for metric in ROUGE} == {
            metric: results["models"][name][metric] for metric in ROUGE
        }
    assert "trained_run/fine_tuned minus zero_init_run/fine_tuned:" in out


def test_compare_scores_outside_predictions_and_counts_ids_missing_from_some_files(evaluate_script, runs, tmp_path):
    root, _, _ = runs
    ours = read_lines(root / "trained_run" / "evaluation_predictions.jsonl")
    outside = [
        {"id": line["id"], "prediction": "Summary: " + line["fine_tuned"]["prediction"], "reference": line["reference"]}
        for line in ours[:-2]
    ]
    outside_file = write_lines(tmp_path / "outside.jsonl", outside)
    code, out, err = run(
        evaluate_script, "--compare", root / "trained_run" / "evaluation_predictions.jsonl", outside_file,
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    compared = json.loads((tmp_path / "comparison_results.json").read_text())
    assert compared["n"] == 22 and compared["ids_not_in_every_file"] == 2
    assert "2 ids in some files only were left out" in out
    same = compared["comparisons"][-1]  # outside vs trained_run/fine_tuned: the same texts once `Summary:` is removed
    assert (same["model"], same["against"]) == ("outside", "trained_run/fine_tuned")
    assert all(same["difference"][metric]["mean"] == 0 for metric in ROUGE)


def refusal(evaluate_script, *argv) -> str:
    code, _, err = run(evaluate_script, *argv)
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


def test_compare_refusals(evaluate_script, runs, tmp_path):
    root, _, _ = runs
    ours = read_lines(root / "trained_run" / "evaluation_predictions.jsonl")
    good = write_lines(tmp_path / "a.jsonl", ours)
    other_test_set = write_lines(tmp_path / "b.jsonl", [{**ours[0], "reference": "Someone else."}, *ours[1:]])
    message = refusal(evaluate_script, "--compare", good, other_test_set)
    assert f"test id {ours[0]['id']} has different references" in message
    few = write_lines(tmp_path / "few.jsonl", ours[:19])
    assert "share 19 test ids, fewer than 20" in refusal(evaluate_script, "--compare", good, few)
    losses_only = [{key: value for key, value in line.items() if key != "fine_tuned"} for line in ours]
    for line in losses_only:
        line["base"] = {"loss": 1.0}
    no_predictions = write_lines(tmp_path / "losses.jsonl", losses_only)
    assert "holds no predictions" in refusal(evaluate_script, "--compare", good, no_predictions)
    assert "lists" in refusal(evaluate_script, "--compare", good, good)


PROMPTED = (("zero_init", "brief"), ("trained", "thorough"))  # two adapters: copies of one would be refused as such


def test_adapter_refusals(evaluate_script, tmp_path, tokenizer, tiny_model_dir, test_data_dir, adapters):
    zero = adapters["zero_init"]
    flags = ("--model", tiny_model_dir, "--data-dir", test_data_dir, "--output-dir", tmp_path, "--no-generate")
    assert f"--adapter lists {zero} twice" in refusal(evaluate_script, *flags, "--adapter", zero, zero)
    namesake = shutil.copytree(zero, tmp_path / "elsewhere" / "zero_init")
    message = refusal(evaluate_script, *flags, "--adapter", zero, namesake)
    assert "would both be named 'zero_init'" in message

    other_base = save_tiny_model(tmp_path / "narrower", tokenizer, hidden_size=48)
    wrong = tmp_path / "for_narrower"
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(other_base), lora).save_pretrained(wrong)
    message = refusal(evaluate_script, *flags, "--adapter", zero, wrong)
    assert f"the adapter in {wrong} does not fit" in message

    brief, thorough = (shutil.copytree(adapters[kind], tmp_path / name) for kind, name in PROMPTED)
    for folder, prompt in ((brief, "Be brief."), (thorough, "Be thorough.")):
        (folder / "training_summary.json").write_text(json.dumps({"settings": {"system_prompt": prompt}}))
    message = refusal(evaluate_script, *flags, "--adapter", brief, thorough)
    assert "trained with different --system-prompt" in message
