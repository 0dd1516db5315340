"""evaluate.py end to end on the tiny model: results, predictions, chart, determinism, rescoring and refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import load_script, run_script, save_tiny_model
from peft import LoraConfig, get_peft_model
from rouge_score import rouge_scorer
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from lora_summarization import data
from lora_summarization.model_card import NOT_EVALUATED

METRICS = ("loss", "rouge1", "rouge2", "rougeL", "rougeLsum")


@pytest.fixture(scope="module")
def evaluate_script():
    return load_script("evaluate.py")


@pytest.fixture(scope="module")
def adapter_with_card(tmp_path_factory, trained_adapter_dir):
    """A copy of the trained adapter with the model card train.py wrote, which evaluation completes."""
    folder = tmp_path_factory.mktemp("adapter") / "fine_tuned_model"
    shutil.copytree(trained_adapter_dir, folder, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    return folder


def evaluate(tiny_model_dir, adapter_dir, data_dir, output_dir, *flags):
    return run_script(
        "evaluate.py",
        *("--model", tiny_model_dir, "--adapter", adapter_dir, "--data-dir", data_dir, "--output-dir", output_dir),
        *("--max-new-tokens", "24", *flags),
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, adapter_with_card, data_dir):
    output_dir = tmp_path_factory.mktemp("evaluation")
    result = evaluate(tiny_model_dir, adapter_with_card, data_dir, output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def read_predictions(output_dir) -> list[dict]:
    lines = (output_dir / "evaluation_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def run_in_process(evaluate_script, capsys, *argv) -> tuple[int, str, str]:
    code = evaluate_script.run_stage(evaluate_script.main, evaluate_script.EvalConfig, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_adapter_beats_base_with_intervals_reported(first_run, data_dir, adapter_with_card, trained_adapter_dir):
    output_dir, result = first_run
    results = json.loads((output_dir / "evaluation_results.json").read_text())
    test_records = data.read_records(data_dir / data.TEST_FILE)
    assert results["n"] == len(test_records)
    base, fine_tuned = results["base"], results["fine_tuned"]
    assert fine_tuned["loss"] < base["loss"]
    assert fine_tuned["rougeL"] > base["rougeL"]
    assert base["perplexity"] == pytest.approx(math.exp(base["loss"]))
    for metric in METRICS:
        difference = results["difference"][metric]
        low, high = difference["ci95"]
        assert low <= difference["mean"] <= high
        assert difference["mean"] == pytest.approx(fine_tuned[metric] - base[metric])
        assert 0 <= difference["share_not_better"] <= 1 and 0 <= difference["win_rate"] <= 1
    assert results["difference"]["loss"]["share_not_better"] == 0.0
    assert results["settings"]["bootstrap_samples"] == 1000

    predictions = read_predictions(output_dir)
    assert [line["id"] for line in predictions] == [record["id"] for record in test_records]
    first = predictions[0]
    assert first["reference"] == test_records[0]["summary"] and first["dialogue"] == test_records[0]["dialogue"]
    assert set(first["fine_tuned"]) == {"prediction", "loss", *METRICS[1:]}
    assert not any(line["fine_tuned"]["prediction"].startswith("Summary:") for line in predictions)

    assert (output_dir / "evaluation_chart.png").read_bytes().startswith(b"\x89PNG")
    assert "95% interval" in result.stdout and "ROUGE-Lsum" in result.stdout
    card = (adapter_with_card / "README.md").read_text(encoding="utf-8")
    training_part = (trained_adapter_dir / "README.md").read_text(encoding="utf-8").split("## Evaluation")[0]
    assert card.startswith(training_part) and NOT_EVALUATED not in card
    assert card.count("## Evaluation") == 1 and "ROUGE-L" in card.split("## Evaluation")[1]


def test_two_runs_give_identical_predictions(first_run, tmp_path, tiny_model_dir, adapter_with_card, data_dir):
    first_dir, _ = first_run
    result = evaluate(tiny_model_dir, adapter_with_card, data_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_predictions(tmp_path) == read_predictions(first_dir)


def test_no_generate_scores_the_loss_only(
    evaluate_script, capsys, tmp_path, tiny_model_dir, trained_adapter_dir, data_dir
):
    adapter = shutil.copytree(trained_adapter_dir, tmp_path / "adapter")  # evaluation writes to its model card
    code, out, err = run_in_process(
        evaluate_script,
        capsys,
        *("--model", tiny_model_dir, "--adapter", adapter, "--data-dir", data_dir),
        *("--output-dir", tmp_path, "--no-generate", "--max-examples", "3"),
    )
    assert code == 0, err
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert results["n"] == 3 and list(results["difference"]) == ["loss"]
    assert "prediction" not in read_predictions(tmp_path)[0]["base"]


def test_score_mode_gives_rouge_scores_own_result(evaluate_script, capsys, tmp_path):
    pairs = [
        {"prediction": "Summary: Anna and Tom will meet at the park.", "reference": "Anna and Tom meet in the park."},
        {"prediction": "Kate is late. She waits!", "reference": "Kate is running late. Tom waits for her."},
    ]
    predictions = tmp_path / "outside.jsonl"
    predictions.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
    code, out, err = run_in_process(evaluate_script, capsys, "--score", predictions, "--output-dir", tmp_path)
    assert code == 0, err
    scores = json.loads((tmp_path / "outside_rouge.json").read_text())
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [scorer.score(pair["reference"], pair["prediction"].removeprefix("Summary: ")) for pair in pairs]
    assert scores["n"] == 2
    for name in ("rouge1", "rouge2", "rougeL"):
        assert scores[name] == pytest.approx(sum(score[name].fmeasure for score in expected) / 2, abs=1e-12)
    assert "ROUGE-L" in out


def refusal(evaluate_script, capsys, *argv) -> str:
    """The error line of a run that must stop with exit code 2."""
    code, _, err = run_in_process(evaluate_script, capsys, *argv)
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prediction": "a", "reference": "b"}\n{"prediction": "a", \n', "line 2 is not valid JSON"),
        ('{"prediction": "a"}\n', 'line 1 needs the text fields "prediction" and "reference"'),
        ("\n", "holds no lines"),
    ],
)
def test_score_mode_refuses_bad_jsonl(evaluate_script, capsys, tmp_path, content, expected):
    predictions = tmp_path / "bad.jsonl"
    predictions.write_text(content, encoding="utf-8")
    assert expected in refusal(evaluate_script, capsys, "--score", predictions)


def test_missing_or_empty_test_file_is_refused(evaluate_script, capsys, tmp_path, trained_adapter_dir):
    flags = ("--adapter", trained_adapter_dir, "--data-dir", tmp_path)
    assert f"{data.TEST_FILE} not found" in refusal(evaluate_script, capsys, *flags)
    (tmp_path / data.TEST_FILE).write_text("[]", encoding="utf-8")
    assert "holds no examples" in refusal(evaluate_script, capsys, *flags)


def test_missing_adapter_folder_is_refused(evaluate_script, capsys, tmp_path, data_dir):
    message = refusal(evaluate_script, capsys, "--adapter", tmp_path / "fine_tuned_model", "--data-dir", data_dir)
    assert "adapter folder" in message and "not found" in message and "--adapter" in message


def test_pickled_adapter_is_refused(evaluate_script, capsys, tmp_path, trained_adapter_dir, data_dir):
    shutil.copy(trained_adapter_dir / "adapter_config.json", tmp_path)
    torch.save(load_file(trained_adapter_dir / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    message = refusal(evaluate_script, capsys, "--adapter", tmp_path, "--data-dir", data_dir)
    assert "pickle" in message and "adapter_model.safetensors" in message


def test_adapter_for_another_base_model_is_refused(
    evaluate_script, capsys, tmp_path, tokenizer, tiny_model_dir, data_dir
):
    other_base = save_tiny_model(tmp_path / "narrower-tiny-qwen2", tokenizer, hidden_size=48)
    other = Qwen2ForCausalLM.from_pretrained(other_base)
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    flags = ("--model", tiny_model_dir, "--adapter", tmp_path / "adapter", "--data-dir", data_dir, "--no-generate")
    message = refusal(evaluate_script, capsys, *flags)
    assert "does not fit" in message and f"made for {other_base}" in message
