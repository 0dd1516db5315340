"""SAMSum records: the published recipe's JSON format, read and written the same way by every stage."""

from __future__ import annotations

import json
from pathlib import Path

from .cli import UsageError
from .prompts import instruction_text, response_text

TRAIN_FILE = "train_data.json"
VALIDATION_FILE = "validation_data.json"
TEST_FILE = "test_questions.json"
UNIT_TEST_FILE = "unit_test_data.json"
DATA_CARD_FILE = "data_card.json"


def make_record(example_id: str, dialogue: str, summary: str) -> dict:
    return {
        "id": example_id,
        "instruction": instruction_text(dialogue),
        "response": response_text(summary),
        "dialogue": dialogue,
        "summary": summary,
    }


def read_records(path: Path) -> list[dict]:
    """Records written by data_preparation.py; a missing or empty file is a usage error."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} not found; run data_preparation.py first (or pass --data-dir)")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not records:
        raise UsageError(f"{path} holds no examples; rerun data_preparation.py")
    return records
