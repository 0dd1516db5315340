"""lora_summarization.data called directly: readers, cleaning rules, splits, overlap and token statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lora_summarization import data
from lora_summarization.cli import UsageError
from lora_summarization.prompts import encode_example
from lora_summarization.synthetic import make_examples


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id", "dialogue", "summary"], dtype=object)


def split_examples() -> dict[str, list[dict]]:
    return {
        "train": make_examples(30, seed=1),
        "validation": make_examples(12, seed=2),
        "test": make_examples(8, seed=3),
    }


def write_source(folder, fmt: str, splits: dict[str, list[dict]]):
    """The same examples in one of the layouts SAMSum is distributed in."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        table = pd.DataFrame(rows)
        if fmt == "csv":
            table.to_csv(folder / f"{split}.csv", index=False)
        elif fmt == "json":  # the original samsum export: an indented array, val.json, \r\n between turns
            name = "val" if split == "validation" else split
            (folder / f"{name}.json").write_text(json.dumps(rows, indent=4, ensure_ascii=False), encoding="utf-8")
        elif fmt == "json-lines-in-.json":  # what datasets' Dataset.to_json writes
            table.to_json(folder / f"{split}.json", orient="records", lines=True, force_ascii=False)
        elif fmt == "jsonl":
            table.to_json(folder / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
        elif fmt == "parquet":
            table.to_parquet(folder / f"{split}.parquet")
        elif fmt == "single-file":
            combined = pd.concat([pd.DataFrame(r).assign(split=s) for s, r in splits.items()])
            combined.to_parquet(folder / "samsum.parquet")
            return folder / "samsum.parquet"
    return folder


def test_clean_text_normalises_line_endings_and_strips_only_the_ends():
    assert data.clean_text(" \n Anna: hi \r\nTom: yo\rAnna: ok \n\n") == "Anna: hi \nTom: yo\nAnna: ok"


def test_unusable_rows_are_dropped_and_counted_by_reason():
    rows = [
        ("1", "Anna: hi", "Anna says hi."),
        ("2", None, "s"),
        ("3", float("nan"), "s"),
        ("4", "", "s"),
        ("5", " \r\n\t", "s"),
        ("6", "Anna: hi", None),
        ("7", "Anna: hi", ""),
        ("8", "Anna: hi", "   "),
        ("9", None, ""),  # counted once, for its dialogue
        ("10", "Anna: hi", 42),
    ]
    records, drops = data.clean_split(frame(rows), "train")
    assert [record["id"] for record in records] == ["1"]
    assert drops == {
        "dialogue missing": 3,
        "dialogue empty": 1,
        "dialogue blank": 1,
        "summary missing": 1,
        "summary empty": 1,
        "summary blank": 1,
        "summary not text": 1,
    }


def test_text_passes_through_untouched():
    dialogue = (
        "Anna: look <file_photo>\nTom: Haha ok 😂\nTom: Tom & Jerry &amp; co <3\n"
        "no speaker prefix on this line\nAnna:   spaced   out   \n\nAnna: bye"
    )
    summary = "Anna sent a <file_photo> & Tom laughed 😂"
    records, drops = data.clean_split(frame([("13731370-1", dialogue, summary)]), "test")
    assert drops == {}
    assert records == [data.make_record("13731370-1", dialogue, summary)]


def test_missing_id_column_gets_split_and_row_number():
    records, _ = data.clean_split(pd.DataFrame({"dialogue": ["A: x", "A: y"], "summary": ["x", "y"]}), "test")
    assert [record["id"] for record in records] == ["test-0", "test-1"]


@pytest.mark.parametrize("fmt", ["csv", "json", "json-lines-in-.json", "jsonl", "parquet", "single-file"])
def test_every_source_format_gives_the_same_records(tmp_path, fmt):
    splits = split_examples()
    expected, _ = data.clean_splits(data.load_samsum(str(write_source(tmp_path / "csv", "csv", splits))))
    records, drops = data.clean_splits(data.load_samsum(str(write_source(tmp_path / fmt, fmt, splits))))
    assert records == expected
    assert all(not reasons for reasons in drops.values())


def test_original_json_export_crlf_and_empty_dialogue(tmp_path):
    splits = split_examples()
    exported = {
        split: [row | {"dialogue": row["dialogue"].replace("\n", "\r\n")} for row in rows]
        for split, rows in splits.items()
    }
    exported["train"].insert(5, {"id": "13828807", "summary": "problem with visa", "dialogue": ""})
    source = data.load_samsum(str(write_source(tmp_path / "json", "json", exported)))
    records, drops = data.clean_splits(source)
    assert len(source.frames["train"]) == len(splits["train"]) + 1
    assert drops == {"train": {"dialogue empty": 1}, "validation": {}, "test": {}}
    assert [record["dialogue"] for record in records["train"]] == [row["dialogue"] for row in splits["train"]]
    assert "\r" not in "".join(record["instruction"] for record in records["train"])


def test_ids_stay_strings_in_their_source_form(tmp_path):
    folder = tmp_path / "ids"
    folder.mkdir()
    rows = [
        {"id": "0013", "dialogue": "A: x", "summary": "x"},
        {"id": "13731370-1", "dialogue": "A: y", "summary": "y"},
    ]
    for split in data.SPLITS:
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    (folder / "test.csv").unlink()
    (folder / "test.jsonl").write_text('{"id": 7, "dialogue": "A: z", "summary": "z"}\n', encoding="utf-8")
    records, _ = data.clean_splits(data.load_samsum(str(folder)))
    assert [record["id"] for record in records["train"]] == ["0013", "13731370-1"]
    assert [record["id"] for record in records["test"]] == ["7"]


def test_single_file_with_an_unknown_split_is_refused(tmp_path):
    path = tmp_path / "all.csv"
    pd.DataFrame([{"dialogue": "A: x", "summary": "x", "split": "dev"}]).to_csv(path, index=False)
    with pytest.raises(UsageError, match="unknown split dev"):
        data.load_samsum(str(path))


def records_of(examples: list[dict]) -> list[dict]:
    return [data.make_record(ex["id"], ex["dialogue"], ex["summary"]) for ex in examples]


def test_split_files_are_disjoint_seeded_and_independent():
    splits = {name: records_of(rows) for name, rows in split_examples().items()}
    files = data.split_files(splits, test_size=3, unit_test_size=5, seed=7)
    assert {name: len(records) for name, records in files.items()} == {
        data.TRAIN_FILE: 30,
        data.VALIDATION_FILE: 7,
        data.TEST_FILE: 3,
        data.UNIT_TEST_FILE: 5,
    }
    validation_ids = [r["id"] for r in files[data.VALIDATION_FILE] + files[data.UNIT_TEST_FILE]]
    assert sorted(validation_ids) == sorted(r["id"] for r in splits["validation"])
    assert files == data.split_files(splits, test_size=3, unit_test_size=5, seed=7)
    other_seed = data.split_files(splits, test_size=3, unit_test_size=5, seed=8)
    assert other_seed[data.UNIT_TEST_FILE] != files[data.UNIT_TEST_FILE]
    # The unit-test draw does not depend on --test-size, and `all` (None) is the whole test split in order.
    whole_test = data.split_files(splits, test_size=None, unit_test_size=5, seed=7)
    assert whole_test[data.UNIT_TEST_FILE] == files[data.UNIT_TEST_FILE]
    assert whole_test[data.TEST_FILE] == splits["test"]


def test_overlap_ignores_line_endings_spacing_and_case():
    train = records_of(make_examples(6, seed=1))
    evaluation = records_of(make_examples(2, seed=2))
    leaked = data.make_record("x", "  " + evaluation[0]["dialogue"].upper().replace("\n", " \n "), "other")
    files = {
        data.TRAIN_FILE: [*train[:3], leaked, *train[3:]],
        data.VALIDATION_FILE: evaluation[:1],
        data.TEST_FILE: evaluation[1:],
        data.UNIT_TEST_FILE: [],
    }
    kept, card = data.remove_train_overlap(files, keep=False)
    assert kept[data.TRAIN_FILE] == train
    assert card["removed"] == 1 and card["train_rows_overlapping_by_file"][data.VALIDATION_FILE] == 1
    unchanged, card = data.remove_train_overlap(files, keep=True)
    assert unchanged[data.TRAIN_FILE] == files[data.TRAIN_FILE]
    assert card["train_rows_overlapping"] == 1 and card["removed"] == 0


def test_token_statistics_measure_the_training_encoding(tokenizer):
    records = records_of(make_examples(12, seed=5))
    lengths = [len(encode_example(tokenizer, r["dialogue"], r["summary"], 10**9).input_ids) for r in records]
    max_length = int(np.median(lengths))
    stats = data.token_statistics(tokenizer, {data.TEST_FILE: records}, max_length)[data.TEST_FILE]
    over = sum(length > max_length for length in lengths)
    assert 0 < over < len(records)
    assert stats["total"]["max"] == max(lengths)
    assert stats["total"]["p50"] == pytest.approx(np.percentile(lengths, 50), abs=0.05)
    assert stats["over_max_length"] == stats["dialogue_shortened"] == over
    assert stats["over_max_length_after_shortening"] == 0
    assert stats["prompt"]["max"] + stats["response"]["max"] >= stats["total"]["max"] > stats["prompt"]["max"]


@pytest.mark.parametrize(
    ("records", "fields", "expected"),
    [
        ([{"dialogue": "A: hi", "summary": None}], data.REQUIRED_COLUMNS, "record 1 has 'summary' not text"),
        ([{"dialogue": "A: hi", "summary": "x"}], data.FIELDS_WITH_ID, "record 1 has no 'id'"),
        ([{"id": "1", "dialogue": "A: hi", "summary": "x"}, "A: hi"], data.FIELDS_WITH_ID, "record 2 is a JSON string"),
    ],
)
def test_records_without_the_text_a_stage_reads_are_refused(tmp_path, records, fields, expected):
    path = tmp_path / data.TEST_FILE
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(UsageError, match=expected):
        data.read_records(path, fields)
