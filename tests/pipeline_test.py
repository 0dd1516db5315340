"""The four stages run as the README tells a user to, in one project folder, each on what the previous wrote.

Only --model and --source point at the tiny model and synthetic SAMSum files, plus flags that make a
random tiny model learn within seconds; every path is the scripts' default.
"""

import json

from conftest import TINY_TRAINING_FLAGS, run_script

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

    run_stage_script(project, "evaluate.py", "--model", tiny_model_dir, "--max-new-tokens", "16")
    results = json.loads((project / "evaluation_results.json").read_text())
    assert results["n"] == 12
    assert results["fine_tuned"]["loss"] < results["base"]["loss"]
    assert "ROUGE-L" in (project / "fine_tuned_model" / "README.md").read_text(encoding="utf-8")
