"""SAMSum records: reading, cleaning, leak-free splits, atomic writes and the data card.

Records are the published recipe's JSON format, read and written the same way by every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .cli import UsageError, write_json
from .prompts import IGNORE_INDEX, encode_example, instruction_text, response_text

TRAIN_FILE = "train_data.json"
VALIDATION_FILE = "validation_data.json"
TEST_FILE = "test_questions.json"
UNIT_TEST_FILE = "unit_test_data.json"
DATA_CARD_FILE = "data_card.json"

SPLITS = ("train", "validation", "test")
# File names (without extension) accepted for each split in a local folder: the knkarthick/samsum
# layout, the original samsum export (val.json) and the Kaggle mirror (samsum-train.csv).
SPLIT_FILE_STEMS = {
    "train": ("train", "samsum-train"),
    "validation": ("validation", "val", "samsum-validation"),
    "test": ("test", "samsum-test"),
}
REQUIRED_COLUMNS = ("dialogue", "summary")
OVERLAP_KEY = "dialogue with whitespace runs collapsed and case folded"


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
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); rerun data_preparation.py") from error
    if not records:
        raise UsageError(f"{path} holds no examples; rerun data_preparation.py")
    return records


# --- reading ---------------------------------------------------------------------------------------


@dataclass
class Source:
    """The raw splits of a SAMSum source, where each came from (for messages) and a description for the card."""

    frames: dict[str, pd.DataFrame]
    origins: dict[str, str]
    card: dict


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array (the original samsum export) or, as `datasets` writes `.json` files, JSON Lines."""
    with path.open(encoding="utf-8") as file:
        is_array = file.read(64).lstrip().startswith("[")
    return pd.read_json(path, lines=not is_array, dtype=False, encoding="utf-8")


READERS = {
    # Every CSV field is text: ids keep their form ("0013", "13731370-1") and "NA" or "None" stay words.
    ".csv": lambda path: pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8"),
    ".json": _read_json,
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False, encoding="utf-8"),
    ".parquet": pd.read_parquet,
}
FOLDER_HELP = "a folder with train/validation/test .csv/.json/.jsonl/.parquet files"
SOURCE_HELP = f"{FOLDER_HELP}, or a Hub dataset id"


def looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that names no existing path is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix.lower() in READERS


def load_samsum(source: str) -> Source:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_single_file(path)
    if looks_like_path(source):
        raise UsageError(f"--source {source} not found; pass {SOURCE_HELP}")
    return _load_hub(source)


def read_table(path: Path) -> pd.DataFrame:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UsageError(f"{path}: unsupported file type; SAMSum files must end in {', '.join(READERS)}")
    try:
        frame = reader(path)
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason}); re-save it as UTF-8") from error
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot read {path}: {first_line}; check that it is a readable {path.suffix} file") from error
    check_columns(frame, str(path))
    return frame


def check_columns(frame: pd.DataFrame, origin: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        names = " and ".join(f"'{column}'" for column in missing)
        found = ", ".join(map(str, frame.columns)) or "none"
        raise UsageError(f"{origin} has no {names} column (columns: {found}); rename the column(s) or fix the file")


def find_split_file(folder: Path, split: str) -> Path:
    stems = SPLIT_FILE_STEMS[split]
    found = [folder / f"{stem}{ext}" for stem in stems for ext in READERS if (folder / f"{stem}{ext}").is_file()]
    if not found:
        raise UsageError(
            f"{folder} has no {split} file (named {' or '.join(stems)}, ending in {', '.join(READERS)}); "
            "add it or pass another --source"
        )
    if len(found) > 1:
        raise UsageError(f"{folder} has several {split} files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_card(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256_of(path)}


def _load_folder(folder: Path) -> Source:
    paths = {split: find_split_file(folder, split) for split in SPLITS}
    return Source(
        frames={split: read_table(path) for split, path in paths.items()},
        origins={split: str(path) for split, path in paths.items()},
        card={"kind": "local folder", "path": str(folder), "files": {s: _file_card(p) for s, p in paths.items()}},
    )


def _load_single_file(path: Path) -> Source:
    """One file holding every split, told apart by a `split` column."""
    frame = read_table(path)
    if "split" not in frame.columns:
        raise UsageError(f"{path} has no 'split' column to tell train/validation/test apart; pass a folder instead")
    unknown = sorted(set(frame["split"].astype(str)) - set(SPLITS))
    if unknown:
        raise UsageError(f"{path} has rows of unknown split {', '.join(unknown)}; use {', '.join(SPLITS)}")
    frames = {split: frame[frame["split"] == split].reset_index(drop=True) for split in SPLITS}
    origins = {split: f"{path} (split {split})" for split in SPLITS}
    return Source(frames, origins, {"kind": "local file"} | _file_card(path))


def _load_hub(name: str) -> Source:
    try:
        dataset = datasets.load_dataset(name)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot load the dataset '{name}' from the Hugging Face Hub (unreachable or unknown id); "
            f"pass --source with a local copy ({FOLDER_HELP}) "
            "and --model with a local tokenizer folder (or --no-token-stats)"
        ) from error
    missing = [split for split in SPLITS if split not in dataset]
    if missing:
        raise UsageError(f"Hub dataset {name} has no {', '.join(missing)} split (it has: {', '.join(dataset)})")
    frames = {split: dataset[split].to_pandas() for split in SPLITS}
    for split, frame in frames.items():
        check_columns(frame, f"{name} ({split} split)")
    return Source(frames, {split: f"{name} ({split} split)" for split in SPLITS}, {"kind": "hub", "id": name})


# --- cleaning --------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Line endings to `\\n` and surrounding whitespace stripped; nothing else is touched."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def drop_reason(column: str, value) -> str | None:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return f"{column} missing"
    if not isinstance(value, str):
        return f"{column} not text"
    if value == "":
        return f"{column} empty"
    if not value.strip():
        return f"{column} blank"
    return None


def clean_split(frame: pd.DataFrame, split: str) -> tuple[list[dict], Counter]:
    """Records of the usable rows, and how many rows were dropped for each reason."""
    ids = frame["id"] if "id" in frame.columns else [f"{split}-{index}" for index in range(len(frame))]
    records, drops = [], Counter()
    for example_id, dialogue, summary in zip(ids, frame["dialogue"], frame["summary"], strict=True):
        reason = drop_reason("dialogue", dialogue) or drop_reason("summary", summary)
        if reason:
            drops[reason] += 1
        else:
            records.append(make_record(str(example_id), clean_text(dialogue), clean_text(summary)))
    return records, drops


def clean_splits(source: Source) -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
    records, drops = {}, {}
    for split, frame in source.frames.items():
        records[split], dropped = clean_split(frame, split)
        drops[split] = dict(sorted(dropped.items()))
        if not records[split]:
            reasons = ", ".join(f"{reason} {count}" for reason, count in drops[split].items()) or "no rows at all"
            raise UsageError(f"{source.origins[split]} has no usable rows ({reasons}); check the file or --source")
    return records, drops


# --- splits and overlap ----------------------------------------------------------------------------


def parse_test_size(value: str) -> int | None:
    """`--test-size`: a positive whole number, or `all` (returned as None) for the whole test split."""
    if value.strip().lower() == "all":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise UsageError(f"--test-size must be a positive whole number or 'all', not {value!r}")
    return int(value)


def check_split_sizes(splits: dict[str, list[dict]], test_size: int | None, unit_test_size: int) -> None:
    problems = []
    if test_size is not None and test_size > len(splits["test"]):
        problems.append(
            f"--test-size {test_size} is more than the {len(splits['test']):,} usable test rows; "
            "pass a smaller --test-size or 'all'"
        )
    if unit_test_size >= len(splits["validation"]):
        problems.append(
            f"--unit-test-size {unit_test_size} leaves no rows for {VALIDATION_FILE} "
            f"(validation has {len(splits['validation']):,} usable rows); pass a smaller --unit-test-size"
        )
    if problems:
        raise UsageError("; ".join(problems))


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """`k` of `range(n)` drawn with `seed`, in source order."""
    return sorted(random.Random(seed).sample(range(n), k))


def split_files(
    splits: dict[str, list[dict]], test_size: int | None, unit_test_size: int, seed: int
) -> dict[str, list[dict]]:
    """The four record files; test and unit-test rows are drawn independently, each with `seed`."""
    test, validation = splits["test"], splits["validation"]
    if test_size is not None:
        test = [test[i] for i in sample_indices(len(test), test_size, seed)]
    unit_indices = set(sample_indices(len(validation), unit_test_size, seed))
    return {
        TRAIN_FILE: splits["train"],
        VALIDATION_FILE: [record for i, record in enumerate(validation) if i not in unit_indices],
        TEST_FILE: test,
        UNIT_TEST_FILE: [validation[i] for i in sorted(unit_indices)],
    }


def overlap_key(dialogue: str) -> str:
    return " ".join(dialogue.split()).casefold()


def train_overlap(files: dict[str, list[dict]]) -> dict:
    """Train rows whose dialogue is also in an evaluation file: their indices, and counts per file."""
    keys_by_file = {
        name: {overlap_key(record["dialogue"]) for record in records}
        for name, records in files.items()
        if name != TRAIN_FILE
    }
    train_keys = [overlap_key(record["dialogue"]) for record in files[TRAIN_FILE]]
    by_file = {name: sum(key in keys for key in train_keys) for name, keys in keys_by_file.items()}
    indices = [i for i, key in enumerate(train_keys) if any(key in keys for keys in keys_by_file.values())]
    return {"indices": indices, "by_file": by_file}


def remove_train_overlap(files: dict[str, list[dict]], keep: bool) -> tuple[dict[str, list[dict]], dict]:
    """Drop train rows that leak into evaluation (unless `keep`); the second value goes to the data card."""
    overlap = train_overlap(files)
    card = {
        "train_rows_overlapping": len(overlap["indices"]),
        "train_rows_overlapping_by_file": overlap["by_file"],
        "removed": 0 if keep else len(overlap["indices"]),
        "key": OVERLAP_KEY,
    }
    if keep:
        return files, card
    leaked = set(overlap["indices"])
    train = [record for i, record in enumerate(files[TRAIN_FILE]) if i not in leaked]
    if not train:
        raise UsageError("every train row's dialogue is also in an evaluation file; check --source")
    return files | {TRAIN_FILE: train}, card


# --- token statistics ------------------------------------------------------------------------------


def describe_lengths(lengths: list[int]) -> dict:
    values = np.asarray(lengths)
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {
        "mean": round(float(values.mean()), 1),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p95": round(float(p95), 1),
        "p99": round(float(p99), 1),
        "max": int(values.max()),
    }


def file_token_stats(tokenizer, records: list[dict], max_length: int, progress) -> dict:
    """Lengths of the encoding training uses (`encode_example`), before and after shortening to `max_length`."""
    prompt, response, over = [], [], []
    for record in records:
        # No limit: the full example, as the chat template renders it.
        encoded = encode_example(tokenizer, record["dialogue"], record["summary"], max_length=sys.maxsize)
        prompt.append(encoded.labels.count(IGNORE_INDEX))
        response.append(encoded.num_label_tokens)
        if len(encoded.input_ids) > max_length:
            over.append(encode_example(tokenizer, record["dialogue"], record["summary"], max_length))
        progress.update()
    return {
        "prompt": describe_lengths(prompt),
        "response": describe_lengths(response),
        "total": describe_lengths([p + r for p, r in zip(prompt, response, strict=True)]),
        "over_max_length": len(over),
        "dialogue_shortened": sum(encoded.dialogue_shortened for encoded in over),
        "over_max_length_after_shortening": sum(len(encoded.input_ids) > max_length for encoded in over),
    }


def token_statistics(tokenizer, files: dict[str, list[dict]], max_length: int) -> dict[str, dict]:
    total = sum(map(len, files.values()))
    with tqdm(total=total, desc="Measuring token lengths", unit="example", file=sys.stderr) as progress:
        return {name: file_token_stats(tokenizer, records, max_length, progress) for name, records in files.items()}


# --- writing ---------------------------------------------------------------------------------------


def write_data_dir(output_dir: Path, files: dict[str, list[dict]], card: dict) -> dict:
    """Write the record files and the data card (given each file's row count and sha256); return the card.

    Everything is written to a staging folder beside `output_dir` first and only then renamed into place
    (a rename is atomic on one file system), so a run that fails or is interrupted while preparing or
    writing leaves the previous files in `output_dir` byte for byte as they were.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    try:
        for name, records in files.items():
            write_json(staging / name, records)
        written = {name: {"rows": len(records), "sha256": sha256_of(staging / name)} for name, records in files.items()}
        card = card | {"files": written}
        write_json(staging / DATA_CARD_FILE, card)
        output_dir.mkdir(exist_ok=True)
        for name in [*files, DATA_CARD_FILE]:
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def data_card(source: Source, drops: dict, overlap: dict, token_lengths: dict | None, settings: dict) -> dict:
    """Everything about a prepared data folder except its files, which `write_data_dir` adds."""
    return {
        "source": source.card,
        "rows_read": {split: len(frame) for split, frame in source.frames.items()},
        "rows_dropped": drops,
        "overlap": overlap,
        "token_lengths": token_lengths,
        "settings": settings,
    }
