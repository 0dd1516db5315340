"""One-flag LoRA variants (DoRA, rsLoRA, LoRA+, NEFTune) through every stage: train, resume, evaluate, export."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from conftest import TINY_TRAINING_FLAGS, load_script
from train_test import adapter_weights, assert_same_adapter, run_train, train_args
from transformers import AutoModelForCausalLM

from lora_summarization import export, modeling
from lora_summarization.cli import run_stage

LORAPLUS_RATIO = 8.0
VARIANTS = {
    "plain": (),
    "dora": ("--use-dora",),
    "rslora": ("--use-rslora",),
    "loraplus": ("--loraplus-lr-ratio", str(LORAPLUS_RATIO)),
    "neftune": ("--neftune-noise-alpha", "5"),
}
CARD_ROWS = {
    "plain": "plain LoRA",
    "dora": "DoRA",
    "rslora": "rsLoRA",
    "loraplus": "LoRA+ (B matrices at 8 x the learning rate)",
    "neftune": "NEFTune (noise alpha 5)",
}
# A checkpoint every step, so that step 3 (mid-schedule, a non-zero learning rate) is a checkpoint of both runs.
SCHEDULE = ("--max-steps", "4", "--save-steps", "1", "--eval-steps", "1000", "--logging-steps", "1")


def quiet(function, *args):
    """Call `function` with stdout and stderr captured (module fixtures cannot use capsys); returns its result."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return function(*args)


def train(argv) -> int:
    script = load_script("train.py")
    return quiet(run_stage, script.main, script.TrainConfig, [str(arg) for arg in argv])


@pytest.fixture(scope="session")
def variant_runs(tmp_path_factory, tiny_model_dir, data_dir):
    """Each variant trained 4 steps from the same seed, into a folder named after it."""
    folder = tmp_path_factory.mktemp("variants")
    for name, flags in VARIANTS.items():
        argv = train_args(tiny_model_dir, data_dir, folder / name, *SCHEDULE, *TINY_TRAINING_FLAGS, *flags)
        assert train(argv) == 0, name
    return folder


def optimizer_learning_rates(checkpoint) -> list[float]:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    return [group["lr"] for group in state["param_groups"]]


def adapted_and_merged_logits(tiny_model_dir, adapter_dir, merged_dir, input_ids):
    adapted = modeling.load_adapter(modeling.load_base_model(str(tiny_model_dir)), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return adapted(input_ids).logits, merged(input_ids).logits


@pytest.mark.parametrize("variant", ["dora", "rslora", "loraplus", "neftune"])
def test_each_variant_trains_resumes_exactly_and_exports_merged(
    variant, variant_runs, tiny_model_dir, data_dir, tokenizer, tmp_path, capsys
):
    run = variant_runs / variant
    flags = VARIANTS[variant]
    summary = json.loads((run / "training_summary.json").read_text())
    setting = flags[0].removeprefix("--").replace("-", "_")
    assert summary["settings"][setting] == (True if len(flags) == 1 else float(flags[1]))
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert (adapter_config["use_dora"], adapter_config["use_rslora"]) == (variant == "dora", variant == "rslora")
    for name in (variant, "plain"):
        card = (variant_runs / name / "README.md").read_text(encoding="utf-8")
        assert f"| adapter | {CARD_ROWS[name]} |" in card and f"| `{flags[0]}` |" in card, name
    weights, plain = adapter_weights(run), adapter_weights(variant_runs / "plain")
    assert any(not torch.equal(weights[name], plain[name]) for name in plain)

    copy = shutil.copytree(run, tmp_path / "resumed")
    for removed in ("checkpoint-3", "checkpoint-4"):
        shutil.rmtree(copy / "checkpoints" / removed)
    (copy / modeling.ADAPTER_WEIGHTS_FILE).unlink()
    argv = train_args(tiny_model_dir, data_dir, copy, *SCHEDULE, *TINY_TRAINING_FLAGS, "--resume")
    code, _, err = run_train(argv, capsys)  # the variant's flag left out: the checkpoint was made with it
    assert code == 2 and f"{flags[0]}: checkpoint " in err, err
    code, out, err = run_train([*argv, *flags], capsys)
    assert code == 0 and "checkpoint-2" in out, err
    assert_same_adapter(run, copy)
    resumed_rates = optimizer_learning_rates(copy / "checkpoints" / "checkpoint-3")
    assert resumed_rates == pytest.approx(optimizer_learning_rates(run / "checkpoints" / "checkpoint-3"))
    if variant == "loraplus":  # groups A, embedding, B, B without decay
        assert resumed_rates[0] > 0 and resumed_rates[2] == pytest.approx(LORAPLUS_RATIO * resumed_rates[0])

    merged_dir = tmp_path / "merged"
    flags = ("--model", tiny_model_dir, "--adapter", run, "--output-dir", merged_dir, "--precision", "fp32")
    assert run_stage(export.main, export.ExportConfig, [str(flag) for flag in flags]) == 0
    input_ids = tokenizer("Anna: Lunch at 12:30?\nBen: Yes, see you!", return_tensors="pt")["input_ids"]
    adapted, merged = adapted_and_merged_logits(tiny_model_dir, run, merged_dir, input_ids)
    assert torch.allclose(merged, adapted, atol=1e-4)


def evaluate_results(evaluate_script, tiny_model_dir, data_dir, output_dir, *adapters) -> dict:
    argv = ("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", output_dir, "--adapter", *adapters)
    more = ("--max-examples", "4", "--max-new-tokens", "8", "--no-published-loss", "--bootstrap-samples", "10")
    code = quiet(run_stage, evaluate_script.main, evaluate_script.EvalConfig, [str(a) for a in (*argv, *more)])
    assert code == 0
    return json.loads((output_dir / "evaluation_results.json").read_text(encoding="utf-8"))["models"]


def test_dora_and_plain_adapters_score_on_one_base_as_each_does_alone(variant_runs, tiny_model_dir, data_dir, tmp_path):
    evaluate_script = load_script("evaluate.py")
    names = ["plain", "dora", "rslora"]
    together = evaluate_results(
        evaluate_script, tiny_model_dir, data_dir, tmp_path, *(variant_runs / name for name in names)
    )
    assert list(together) == ["base", *names]
    for name in names:
        (tmp_path / name).mkdir()
        alone = evaluate_results(evaluate_script, tiny_model_dir, data_dir, tmp_path / name, variant_runs / name)
        assert alone["base"] == pytest.approx(together["base"])
        assert alone["fine_tuned"] == pytest.approx(together[name], rel=1e-6), name
    assert together["dora"]["loss"] != pytest.approx(together["plain"]["loss"], rel=1e-6)


def test_neftune_noises_training_but_not_the_validation_loss(tiny_model_dir, data_dir, tmp_path, capsys):
    """At learning rate 0 and no dropout, NEFTune is the only difference between the two runs."""
    logs = {}
    for name, flags in (("plain", ()), ("neftune", VARIANTS["neftune"])):
        schedule = ("--max-steps", "1", "--eval-steps", "1", "--logging-steps", "1", "--lora-dropout", "0")
        argv = train_args(tiny_model_dir, data_dir, tmp_path / name, *schedule, "--learning-rate", "0", *flags)
        code, _, err = run_train(argv, capsys)
        assert code == 0, err
        lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        logs[name] = {key: value for line in lines for key, value in json.loads(line).items()}
    assert logs["neftune"]["loss"] != pytest.approx(logs["plain"]["loss"], rel=1e-4)
    assert logs["neftune"]["eval_loss"] == logs["plain"]["eval_loss"]


def only_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return line


def no_model(*_args, **_kwargs):
    raise AssertionError("the model was loaded before the LoRA settings were checked")


def test_a_module_peft_cannot_adapt_is_refused_before_loading_the_model(tiny_model_dir, data_dir, tmp_path, capsys):
    argv = train_args(tiny_model_dir, data_dir, tmp_path / "out", "--use-dora", "--target-modules", "q_proj,norm")
    code, _, err = run_train(argv, capsys, build_model=no_model)
    line = only_error_line(err)
    assert code == 2
    assert "--target-modules q_proj,norm" in line and "--use-dora" in line and "Qwen2RMSNorm" in line, line
    assert "is not supported" in line


def test_bad_variant_values_are_reported_together(tiny_model_dir, data_dir, tmp_path, capsys):
    bad = ("--loraplus-lr-ratio", "-1", "--neftune-noise-alpha", "-5", "--lora-r", "0", "--lora-dropout", "1.5")
    code, _, err = run_train(train_args(tiny_model_dir, data_dir, tmp_path / "out", *bad), capsys, build_model=no_model)
    line = only_error_line(err)
    assert code == 2
    for message in (
        "--loraplus-lr-ratio must be positive (0 = off)",
        "--neftune-noise-alpha must be positive (0 = off)",
        "--lora-r must be at least 1",
        "--lora-dropout must be in [0, 1)",
    ):
        assert message in line, line


def test_loraplus_speeds_up_the_b_matrices_alone_not_doras_magnitudes(tiny_model_dir, data_dir, tmp_path):
    """--use-dora --loraplus-lr-ratio 16: B at 16 x the learning rate; A and DoRA's magnitude vectors (1-D, which
    PEFT's LoRA+ puts in its fast groups) at the learning rate."""
    script = load_script("train.py")
    config = script.TrainConfig(
        model=str(tiny_model_dir), data_dir=str(data_dir), output_dir=str(tmp_path), report_to="none",
        use_dora=True, loraplus_lr_ratio=16.0, learning_rate=1e-3,
    )  # fmt: skip
    tokenizer = modeling.load_tokenizer(config.model)
    train, validation = script.load_datasets(config, tokenizer)
    model = script.build_model(config, weights=True)
    tracker = {"name": "dora loraplus"}
    trainer, _ = script.make_trainer(config, model, tokenizer, train, validation, {}, tracker, world_size=1)
    rates = {id(p): group["lr"] for group in trainer.create_optimizer().param_groups for p in group["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(rates) == len(trainable) and any("lora_magnitude_vector" in name for name in trainable)
    expected = {name: 16e-3 if "lora_B" in name else 1e-3 for name in trainable}
    assert {name: rates[id(p)] for name, p in trainable.items()} == pytest.approx(expected)
