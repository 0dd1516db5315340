"""A damaged data/ folder stops every stage that reads it with exit 2 and one line, before any model loads.

Each stage runs through its own `run_stage` entry point in this process (the refusal comes before any model
loads, and a process start costs ~10 s here); one case runs as a real command, for what a user sees on stderr."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import load_script, run_script

from lora_summarization import data
from lora_summarization.cli import run_stage

# The file each stage reads first, the flags that reach that read (the model is the tiny test model), and the
# stage's config class.
STAGES = {
    "train.py": (data.TRAIN_FILE, ["--max-steps", "1"], "TrainConfig"),
    "unit_test.py": (data.UNIT_TEST_FILE, [], "UnitTestConfig"),
    "evaluate.py": (data.TEST_FILE, ["--adapter", "none"], "EvalConfig"),
}


def truncate(path):
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])


def drop_dialogue_of_the_third_record(path):
    records = json.loads(path.read_text(encoding="utf-8"))
    del records[2]["dialogue"]
    path.write_text(json.dumps(records), encoding="utf-8")


def wrap_in_an_object(path):
    records = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({"records": records}), encoding="utf-8")


# fault: (how the real file is damaged, what the error line must say besides the file and the fix)
FAULTS = {
    "truncated": (truncate, "is not valid JSON"),
    "record without dialogue": (drop_dialogue_of_the_third_record, "record 3 has no 'dialogue'"),
    "object instead of a list": (wrap_in_an_object, "holds a JSON object, not a list of records"),
}


def damaged_copy(tmp_path, data_dir, stage: str, fault: str):
    damaged_dir = shutil.copytree(data_dir, tmp_path / "data")
    file, flags, _ = STAGES[stage]
    FAULTS[fault][0](damaged_dir / file)
    return damaged_dir, ["--data-dir", str(damaged_dir), "--output-dir", str(tmp_path / "out"), *flags]


def assert_one_error_line(stderr: str, path, fault: str) -> None:
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    error = stderr.strip()
    assert error.startswith(f"error: {path}") and FAULTS[fault][1] in error, error
    assert error.endswith("rerun data_preparation.py"), error


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", STAGES)
def test_damaged_data_file_is_one_line_and_exit_2(tmp_path, tiny_model_dir, data_dir, stage, fault, capsys):
    damaged_dir, flags = damaged_copy(tmp_path, data_dir, stage, fault)
    script = load_script(stage)
    config_class = getattr(script, STAGES[stage][2])
    assert run_stage(script.main, config_class, ["--model", str(tiny_model_dir), *flags]) == 2
    assert_one_error_line(capsys.readouterr().err, damaged_dir / STAGES[stage][0], fault)


def test_a_damaged_file_is_one_line_on_the_commands_stderr(tmp_path, tiny_model_dir, data_dir):
    damaged_dir, flags = damaged_copy(tmp_path, data_dir, "train.py", "truncated")
    result = run_script("train.py", "--model", tiny_model_dir, *flags)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, damaged_dir / data.TRAIN_FILE, "truncated")
