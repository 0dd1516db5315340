"""lora_summarization.export: the merged model is a plain safetensors model with the adapter model's logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TRAINING_FLAGS, load_script, run_script, save_tiny_model, script_env
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lora_summarization import export, modeling, summarize
from lora_summarization.cli import run_stage

GREEDY_AS_EVALUATED = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 128}
DIALOGUE = "Anna: Are we still on for lunch?\nBen: Yes, 12:30 at the usual place.\nAnna: See you there!"


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random, non-zero B matrices, so that it changes the base model's logits."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference_logits(tiny_model_dir, adapter_dir, tokenizer) -> dict[str, torch.Tensor]:
    """Logits of the base model with the adapter attached (as evaluation loads it) and without."""
    model = modeling.load_adapter(modeling.load_base_model(str(tiny_model_dir)), adapter_dir).eval()
    input_ids = tokenizer(DIALOGUE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids).logits
        with model.disable_adapter():
            base = model(input_ids).logits
    return {"input_ids": input_ids, "adapted": adapted, "base": base}


def run_export(capsys, *args) -> tuple[int, str]:
    code = run_stage(export.main, export.ExportConfig, [str(arg) for arg in args])
    return code, capsys.readouterr().err


def saved_dtypes(folder) -> set[torch.dtype]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            dtypes |= {weights.get_tensor(name).dtype for name in weights.keys()}
    return dtypes


@pytest.mark.parametrize(
    ("precision", "dtype", "tolerance"), [("fp32", torch.float32, 1e-5), ("bf16", torch.bfloat16, 0.05)]
)
def test_merged_model_is_plain_safetensors_with_the_adapter_models_logits(
    capsys, tmp_path, tiny_model_dir, adapter_dir, reference_logits, precision, dtype, tolerance
):
    out = tmp_path / "merged"
    code, err = run_export(
        capsys, "--model", tiny_model_dir, "--adapter", adapter_dir, "--output-dir", out, "--precision", precision
    )
    assert code == 0, err

    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "adapter_config.json" not in names  # loaders must not mistake it for an adapter
    assert saved_dtypes(out) == {dtype}
    settings = json.loads((out / export.EXPORT_SETTINGS_FILE).read_text(encoding="utf-8"))
    assert (settings["trained_on"], settings["precision"]) == (str(tiny_model_dir), precision)
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert generation == {**generation, **GREEDY_AS_EVALUATED}  # not the base model's sampling settings

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(reference_logits["input_ids"]).logits
    adapter_effect = (reference_logits["adapted"] - reference_logits["base"]).abs().max()
    assert adapter_effect > 1.0  # the adapter moves the logits, so a merge that dropped it would fail below
    assert (logits - reference_logits["adapted"]).abs().max() <= tolerance * adapter_effect


def test_missing_adapter_exits_2_with_one_line_from_the_command_line(tmp_path, tiny_model_dir):
    missing, out = tmp_path / "no_adapter", tmp_path / "merged"
    env = script_env()
    args = ["--model", tiny_model_dir, "--adapter", missing, "--output-dir", out]
    command = [sys.executable, "-m", "lora_summarization.export", *map(str, args)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: adapter folder {missing} not found; run train.py first or pass --adapter with its folder"
    ]
    assert not out.exists()


def test_adapter_for_another_base_is_a_usage_error(capsys, tmp_path, tokenizer, tiny_model_dir, adapter_dir):
    other = save_tiny_model(tmp_path / "other-base", tokenizer, hidden_size=32)
    code, err = run_export(capsys, "--model", other, "--adapter", adapter_dir, "--output-dir", tmp_path / "merged")
    assert code == 2
    message = err.splitlines()[-1]  # after the progress bar of saving the other model
    assert (
        message.startswith("error: the adapter in")
        and f"does not fit the base model {other}" in message
        and f"made for {tiny_model_dir}: pass --model with that model" in message
    )
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="session")
def evaluate_script():
    return load_script("evaluate.py")


def evaluate(evaluate_script, model, adapter, data_dir, output_dir) -> tuple[dict, list[dict]]:
    flags = ("--model", model, "--adapter", adapter, "--data-dir", data_dir, "--output-dir", output_dir)
    more = ("--max-examples", "6", "--max-new-tokens", "12", "--no-published-loss")
    code = run_stage(evaluate_script.main, evaluate_script.EvalConfig, [str(arg) for arg in (*flags, *more)])
    assert code == 0
    results = json.loads((output_dir / "evaluation_results.json").read_text(encoding="utf-8"))
    lines = (output_dir / "evaluation_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return results, [json.loads(line) for line in lines]


@pytest.fixture(scope="session")
def adapter_evaluation(evaluate_script, tmp_path_factory, tiny_model_dir, trained_adapter_dir, data_dir):
    # The trained adapter moves the loss far more than a random one does, with either test tokenizer.
    adapter = shutil.copytree(trained_adapter_dir, tmp_path_factory.mktemp("with-adapter") / "adapter")
    return evaluate(evaluate_script, tiny_model_dir, adapter, data_dir, adapter.parent), adapter


BF16_LOSS_TOLERANCE = 0.02  # nats per token; a bf16 merge measured 0.004 from the adapter on the tiny model


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("bf16", BF16_LOSS_TOLERANCE)])
def test_merged_model_evaluated_alone_scores_as_the_adapter(
    evaluate_script, capsys, tmp_path, tiny_model_dir, data_dir, adapter_evaluation, precision, tolerance
):
    (with_adapter, adapter_lines), adapter = adapter_evaluation
    merged = tmp_path / "merged"
    code, err = run_export(
        capsys, "--model", tiny_model_dir, "--adapter", adapter, "--output-dir", merged, "--precision", precision
    )
    assert code == 0, err
    results, lines = evaluate(evaluate_script, merged, "none", data_dir, tmp_path / "evaluation")
    assert list(results["models"]) == ["model"] and results["comparisons"] == [] and "difference" not in results
    for loss in ("loss", "content_loss"):
        assert results["models"]["model"][loss] == pytest.approx(with_adapter["fine_tuned"][loss], abs=tolerance)
    # The adapter moves the loss by far more than the tolerance, so a merge that dropped it would fail above.
    assert abs(with_adapter["fine_tuned"]["loss"] - with_adapter["base"]["loss"]) > 5 * BF16_LOSS_TOLERANCE
    if precision == "fp32":
        assert [line["model"]["prediction"] for line in lines] == [
            line["fine_tuned"]["prediction"] for line in adapter_lines
        ]


TRAINED_PROMPT, TRAINED_MAX_LENGTH = "Sum up the chat in one line.", 64


@pytest.fixture(scope="session")
def prompted_adapter(tmp_path_factory, tiny_model_dir, data_dir):
    """An adapter trained by train.py with a system prompt and a token limit other than the defaults."""
    output_dir = tmp_path_factory.mktemp("prompted") / "adapter"
    result = run_script(
        "train.py",
        *("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", output_dir),
        *("--system-prompt", TRAINED_PROMPT, "--max-length", TRAINED_MAX_LENGTH),
        *("--max-steps", "10", "--eval-steps", "10", "--save-steps", "10", "--logging-steps", "5"),
        *TINY_TRAINING_FLAGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_merged_model_is_evaluated_and_run_with_the_settings_it_was_trained_with(
    evaluate_script, capsys, tmp_path, tiny_model_dir, data_dir, prompted_adapter
):
    with_adapter, adapter_lines = evaluate(evaluate_script, tiny_model_dir, prompted_adapter, data_dir, tmp_path)
    merged = tmp_path / "merged"
    flags = ("--model", tiny_model_dir, "--adapter", prompted_adapter, "--output-dir", merged, "--precision", "fp32")
    assert run_export(capsys, *flags)[0] == 0

    results, _ = evaluate(evaluate_script, merged, "none", data_dir, tmp_path / "evaluation")
    assert results["settings"]["system_prompt"] == TRAINED_PROMPT
    assert results["settings"]["max_length"] == TRAINED_MAX_LENGTH
    assert results["models"]["model"]["loss"] == pytest.approx(with_adapter["models"]["fine_tuned"]["loss"], abs=1e-4)

    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text(
        "".join(json.dumps({"id": line["id"], "dialogue": line["dialogue"]}) + "\n" for line in adapter_lines)
    )
    argv = ["--adapter", "none", "--model", str(merged), "--max-new-tokens", "12", str(dialogues)]
    capsys.readouterr()
    assert run_stage(summarize.main, summarize.SummarizeConfig, summarize.with_inputs_flag(argv)) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{"id": line["id"], "summary": line["fine_tuned"]["prediction"]} for line in adapter_lines]

    other = ("--system-prompt", "Be brief.", "--no-generate", "--max-examples", "2")
    explicit = ("--model", merged, "--adapter", "none", "--data-dir", data_dir, "--output-dir", tmp_path, *other)
    with pytest.warns(UserWarning, match=f"differs from {TRAINED_PROMPT!r}, which {merged} was trained with"):
        assert run_stage(evaluate_script.main, evaluate_script.EvalConfig, [str(arg) for arg in explicit]) == 0
    assert json.loads((tmp_path / "evaluation_results.json").read_text())["settings"]["system_prompt"] == "Be brief."
