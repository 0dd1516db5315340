"""The four stages run as the README tells a user to, in one project folder, each on what the previous wrote.

Only --model and --source point at the tiny model and synthetic SAMSum files, plus flags that make a
random tiny model learn within seconds; every path is the scripts' default.
"""

import json
import math
import subprocess
import sys

import torch
from conftest import TINY_TRAINING_FLAGS, run_script, script_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_summarization import data
from lora_summarization.synthetic import write_samsum_csvs


def run_stage_script(project, script, *args):
    result = run_script(script, *map(str, args), cwd=project)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    return result


def test_the_four_stages_run_in_order_on_their_default_paths(tiny_model_dir, tmp_path):
    samsum = write_samsum_csvs(tmp_path / "samsum", {"train": 120, "validation": 50, "test": 30})
    project = tmp_path / "project"
    project.mkdir()

    run_stage_script(
        project,
        "data_preparation.py",
        *("--source", samsum, "--model", tiny_model_dir, "--test-size", "12", "--unit-test-size", "20"),
    )
    card = json.loads((project / "data" / data.DATA_CARD_FILE).read_text())
    assert card["files"][data.UNIT_TEST_FILE]["rows"] == 20 and card["files"][data.TEST_FILE]["rows"] == 12

    smoke = run_stage_script(
        project, "unit_test.py", "--model", tiny_model_dir, "--steps", "30", "--learning-rate", "1e-2"
    )
    assert smoke.stdout.strip().endswith("PASSED")
    assert (project / "finetune_100_model" / "adapter_model.safetensors").exists()

    run_stage_script(project, "train.py", "--model", tiny_model_dir, "--max-steps", "60", *TINY_TRAINING_FLAGS)
    summary = json.loads((project / "fine_tuned_model" / "training_summary.json").read_text())
    train_rows = card["files"][data.TRAIN_FILE]["rows"]
    assert summary["examples"] == train_rows

    # The published-recipe loss, which costs full-vocabulary logits over 512 positions, is tested on its own.
    run_stage_script(project, "evaluate.py", "--model", tiny_model_dir, "--max-new-tokens", "16", "--no-published-loss")
    results = json.loads((project / "evaluation_results.json").read_text())
    assert results["n"] == 12
    assert results["fine_tuned"]["loss"] < results["base"]["loss"]
    assert "ROUGE-L" in (project / "fine_tuned_model" / "README.md").read_text(encoding="utf-8")


def test_train_evaluate_and_export_run_in_bf16(tiny_model_dir, data_dir, tmp_path):
    """The README's first remedy for memory and speed, through every stage that takes --precision (unit_test.py's
    bf16 run is in unit_test_script_test.py)."""
    bf16 = ("--precision", "bf16")
    model_and_data = ("--model", tiny_model_dir, "--data-dir", data_dir)
    schedule = ("--max-steps", "4", "--eval-steps", "2", "--logging-steps", "1", "--report-to", "none")
    run_stage_script(tmp_path, "train.py", *model_and_data, *bf16, *schedule, *TINY_TRAINING_FLAGS)
    adapter = tmp_path / "fine_tuned_model"
    summary = json.loads((adapter / "training_summary.json").read_text())
    losses = [summary[key] for key in ("first_train_loss", "last_train_loss", "last_validation_loss")]
    assert summary["precision"] == "bf16" and all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(w).all() for w in load_file(adapter / "adapter_model.safetensors").values())
    assert not (adapter / "runs").exists()  # --report-to none

    evaluation = ("--max-examples", "4", "--max-new-tokens", "8", "--no-published-loss")
    run_stage_script(tmp_path, "evaluate.py", *model_and_data, *bf16, *evaluation)
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert all(math.isfinite(row[key]) for row in results["models"].values() for key in ("loss", "content_loss"))

    export = [sys.executable, "-m", "lora_summarization.export", "--model", str(tiny_model_dir), *bf16]
    exported = subprocess.run(export, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_model")
    assert merged.dtype == torch.bfloat16
