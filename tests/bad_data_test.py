"""A damaged data/ folder stops every stage that reads it with exit 2 and one line, before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_script

from lora_summarization import data

# The file each stage reads first, and the flags that reach that read (the model is the tiny test model).
STAGES = {
    "train.py": (data.TRAIN_FILE, ["--max-steps", "1"]),
    "unit_test.py": (data.UNIT_TEST_FILE, []),
    "evaluate.py": (data.TEST_FILE, ["--adapter", "none"]),
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


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", STAGES)
def test_damaged_data_file_is_one_line_and_exit_2(tmp_path, tiny_model_dir, data_dir, stage, fault):
    damaged_dir = shutil.copytree(data_dir, tmp_path / "data")
    file, flags = STAGES[stage]
    damage, expected = FAULTS[fault]
    damage(damaged_dir / file)
    result = run_script(
        stage, "--model", tiny_model_dir, "--data-dir", damaged_dir, "--output-dir", tmp_path / "out", *flags
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    error = result.stderr.strip()
    assert error.startswith(f"error: {damaged_dir / file}") and expected in error, error
    assert error.endswith("rerun data_preparation.py"), error
