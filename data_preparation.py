"""Stage 1: turn SAMSum into the published recipe's JSON records, with leak-free splits and a data card.

Run (from the repository root):

    python data_preparation.py

or offline, with local copies of the data and the tokenizer:

    python data_preparation.py --source /path/to/samsum --model /path/to/Qwen2.5-1.5B-Instruct

Writes data/train_data.json, data/validation_data.json, data/test_questions.json,
data/unit_test_data.json and data/data_card.json. Every field of DataConfig is also a flag.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lora_summarization import data
from lora_summarization.cli import UsageError, config_as_dict, run_stage


@dataclass
class DataConfig:
    source: str = field(
        default="knkarthick/samsum",
        metadata={"help": "Hub dataset id, or a local folder with train/validation/test .csv/.json/.jsonl/.parquet"},
    )
    output_dir: str = field(default="data", metadata={"help": "Folder for the record files and data_card.json."})
    model: str = field(
        default="Qwen/Qwen2.5-1.5B-Instruct",
        metadata={"help": "Hub id or local folder of the tokenizer whose chat template measures token lengths."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for drawing the test and unit-test examples."})
    test_size: str = field(
        default="100", metadata={"help": "Test examples drawn from the test split, or 'all' for the whole split."}
    )
    unit_test_size: int = field(
        default=100, metadata={"help": "Unit-test examples drawn from validation; the rest is validation_data.json."}
    )
    max_length: int = field(
        default=512, metadata={"help": "Training's token limit: the data card counts examples longer than this."}
    )
    no_token_stats: bool = field(default=False, metadata={"help": "Skip the tokenizer and the token statistics."})
    keep_overlap: bool = field(
        default=False,
        metadata={"help": "Keep train rows whose dialogue is in an evaluation file (the published recipe did)."},
    )
    debug: bool = field(default=False, metadata={"help": "Show the traceback of an input error."})


def main(config: DataConfig) -> int:
    test_size = check_settings(config)
    source = data.load_samsum(config.source)
    splits, drops = data.clean_splits(source)
    data.check_split_sizes(splits, test_size, config.unit_test_size)
    files = data.split_files(splits, test_size, config.unit_test_size, config.seed)
    files, overlap = data.remove_train_overlap(files, keep=config.keep_overlap)
    token_lengths = None if config.no_token_stats else measure_token_lengths(config, files)
    card = data.data_card(source, drops, overlap, token_lengths, config_as_dict(config))
    card = data.write_data_dir(Path(config.output_dir), files, card)
    print_summary(config, card)
    return 0


def check_settings(config: DataConfig) -> int | None:
    """Every problem with the flags at once, before any data is read; returns the parsed --test-size."""
    problems, test_size = [], None
    try:
        test_size = data.parse_test_size(config.test_size)
    except UsageError as error:
        problems.append(str(error))
    if config.unit_test_size < 1:
        problems.append(f"--unit-test-size must be at least 1, not {config.unit_test_size}")
    if config.max_length < 1:
        problems.append(f"--max-length must be at least 1, not {config.max_length}")
    if problems:
        raise UsageError("; ".join(problems))
    return test_size


def measure_token_lengths(config: DataConfig, files: dict[str, list[dict]]) -> dict:
    # Imported here: modeling pulls in torch and peft (seconds), which --no-token-stats does not need.
    from lora_summarization.modeling import load_tokenizer

    return data.token_statistics(load_tokenizer(config.model), files, config.max_length)


def print_summary(config: DataConfig, card: dict) -> None:
    read = ", ".join(f"{split} {rows:,}" for split, rows in card["rows_read"].items())
    print(f"Read {config.source}: {read} rows")
    drops = [
        f"{split} " + ", ".join(f"{count:,} ({reason})" for reason, count in reasons.items())
        for split, reasons in card["rows_dropped"].items()
        if reasons
    ]
    print("Dropped rows: " + ("; ".join(drops) or "none"))
    overlap = card["overlap"]
    action = "kept (--keep-overlap)" if config.keep_overlap else "removed"
    print(f"Train rows whose dialogue is in an evaluation file: {overlap['train_rows_overlapping']:,}, {action}")
    print(f"Wrote {Path(config.output_dir)}/:")
    for name, written in card["files"].items():
        print(f"  {name:<22}{written['rows']:>8,} examples")
    if card["token_lengths"]:
        train = card["token_lengths"][data.TRAIN_FILE]
        total = train["total"]
        print(
            f"Train tokens per example: p50 {total['p50']:.0f}, p99 {total['p99']:.0f}, max {total['max']:,}; "
            f"{train['over_max_length']:,} over --max-length {config.max_length} (dialogue shortened in training)"
        )
    print(f"Data card: {Path(config.output_dir) / data.DATA_CARD_FILE}")


if __name__ == "__main__":
    sys.exit(run_stage(main, DataConfig))
