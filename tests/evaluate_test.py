"""evaluate.py end to end on the tiny model: results, predictions, chart, determinism, rescoring and refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import ROOT, load_script, run_script, save_tiny_model, script_env
from peft import LoraConfig, get_peft_model
from rouge_score import rouge_scorer
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from lora_summarization import data
from lora_summarization.model_card import NOT_EVALUATED

METRICS = ("loss", "content_loss", "rouge1", "rouge2", "rougeL", "rougeLsum")


@pytest.fixture(scope="session")
def evaluate_script():
    return load_script("evaluate.py")


@pytest.fixture(scope="session")
def adapter_with_card(tmp_path_factory, trained_adapter_dir):
    """A copy of the trained adapter with the model card train.py wrote, which evaluation completes."""
    folder = tmp_path_factory.mktemp("adapter") / "fine_tuned_model"
    shutil.copytree(trained_adapter_dir, folder, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    return folder


def evaluate(tiny_model_dir, adapter_dir, data_dir, output_dir, *flags):
    return run_script(
        "evaluate.py",
        *("--model", tiny_model_dir, "--adapter", adapter_dir, "--data-dir", data_dir, "--output-dir", output_dir),
        *("--max-new-tokens", "24", "--no-published-loss", *flags),
    )


@pytest.fixture(scope="session")
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
    assert fine_tuned["loss"] < base["loss"] and fine_tuned["content_loss"] < base["content_loss"]
    assert fine_tuned["rougeL"] > base["rougeL"]
    assert results["models"] == {"base": base, "fine_tuned": fine_tuned} and "published_recipe_loss" not in base
    assert results["comparisons"] == [{"model": "fine_tuned", "against": "base", "difference": results["difference"]}]
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
    assert set(first["fine_tuned"]) == {"prediction", *METRICS}
    assert not any(line["fine_tuned"]["prediction"].startswith("Summary:") for line in predictions)

    assert (output_dir / "evaluation_chart.png").read_bytes().startswith(b"\x89PNG")
    assert "95% interval" in result.stdout and "ROUGE-Lsum" in result.stdout and "content loss" in result.stdout
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
    assert results["n"] == 3 and list(results["difference"]) == ["loss", "content_loss"]
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


def test_adapter_none_and_folders_together_is_refused(evaluate_script, capsys, trained_adapter_dir, data_dir):
    message = refusal(evaluate_script, capsys, "--adapter", "none", trained_adapter_dir, "--data-dir", data_dir)
    assert "--adapter none scores --model alone" in message


def evaluate_in_process(evaluate_script, capsys, tiny_model_dir, adapter, data_dir, output_dir, *flags):
    return run_in_process(
        evaluate_script,
        capsys,
        *("--model", tiny_model_dir, "--adapter", adapter, "--data-dir", data_dir, "--output-dir", output_dir),
        *flags,
    )


@pytest.fixture
def adapter_copy(tmp_path, trained_adapter_dir):
    """A copy of the trained adapter (evaluation writes to its model card) with its training summary."""
    return shutil.copytree(trained_adapter_dir, tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints"))


def test_published_recipe_loss_is_reported_per_model_as_a_reconstruction(
    evaluate_script, capsys, tmp_path, tiny_model_dir, adapter_copy, data_dir
):
    flags = ("--no-generate", "--max-examples", "2")
    code, out, err = evaluate_in_process(
        evaluate_script, capsys, tiny_model_dir, adapter_copy, data_dir, tmp_path, *flags
    )
    assert code == 0, err
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    lines = read_predictions(tmp_path)
    for name in ("base", "fine_tuned"):
        published = results["models"][name]["published_recipe_loss"]
        assert published == pytest.approx(sum(line[name]["published_recipe_loss"] for line in lines) / 2)
        assert published != results["models"][name]["loss"]
    assert "published_recipe_loss" not in results["difference"]  # reported, never bootstrapped as a target
    assert "published-recipe loss*" in out and "not a metric to optimise" in out


@pytest.mark.parametrize(
    ("patched", "expected"),
    [
        ("lora_summarization.training.summed_example_losses", "in the loss pass of base on a batch of 3 examples x "),
        ("peft.PeftModelForCausalLM.generate", "in the generation pass of base on a batch of 3 examples x "),
    ],
)
def test_out_of_memory_ends_with_one_line_naming_pass_batch_and_remedy(
    evaluate_script, capsys, monkeypatch, tmp_path, tiny_model_dir, adapter_copy, data_dir, patched, expected
):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(patched, out_of_memory)
    flags = ("--max-examples", "3", "--no-published-loss")
    code, _, err = evaluate_in_process(
        evaluate_script, capsys, tiny_model_dir, adapter_copy, data_dir, tmp_path, *flags
    )
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: evaluate.py ran out of memory {expected}")
    assert message.endswith("tokens; pass a smaller --batch-size (now 16), or --precision bf16 on GPUs that support it")
    assert "Traceback" not in err and not (tmp_path / "evaluation_results.json").exists()


def test_system_prompt_and_max_length_follow_the_adapters_training(
    evaluate_script, capsys, tmp_path, tiny_model_dir, adapter_copy, data_dir
):
    summary_path = adapter_copy / "training_summary.json"
    summary = json.loads(summary_path.read_text())
    summary["settings"].update(system_prompt="Be brief.", max_length=300)
    summary_path.write_text(json.dumps(summary))
    flags = ("--no-generate", "--no-published-loss", "--max-examples", "2")

    def run(output_dir, *more):
        code, _, err = evaluate_in_process(
            evaluate_script, capsys, tiny_model_dir, adapter_copy, data_dir, output_dir, *flags, *more
        )
        assert code == 0, err
        return json.loads((output_dir / "evaluation_results.json").read_text())

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*differs from")
        followed = run(tmp_path / "followed")
    assert (followed["settings"]["system_prompt"], followed["settings"]["max_length"]) == ("Be brief.", 300)
    explicit = run(tmp_path / "explicit", "--system-prompt", "Be brief.", "--max-length", "300")
    assert explicit["models"] == followed["models"]  # the same prompts as when asked for explicitly
    with pytest.warns(UserWarning, match="--system-prompt 'Be thorough.' differs from 'Be brief.'"):
        overridden = run(tmp_path / "overridden", "--system-prompt", "Be thorough.")
    assert overridden["settings"]["system_prompt"] == "Be thorough."
    assert overridden["models"]["base"]["loss"] != followed["models"]["base"]["loss"]


def test_ctrl_c_during_generation_exits_130_with_one_line_and_no_results(
    tmp_path, tiny_model_dir, adapter_copy, data_dir
):
    env = script_env()
    command = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter_copy),
    ]
    command += ["--data-dir", str(data_dir), "--output-dir", str(tmp_path), "--batch-size", "1", "--no-published-loss"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = b""
    while b"generate" not in stderr:  # tqdm names the pass before its first batch
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, stderr.decode()[-2000:]
        stderr += chunk
    time.sleep(
        0.5
    )  # into the generation, past the bar's own set-up (an interrupt inside tqdm's __init__ leaves it open)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = (stderr + rest).decode()
    assert process.returncode == 130
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted")
    assert not (tmp_path / "evaluation_results.json").exists()
