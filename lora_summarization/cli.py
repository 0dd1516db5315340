"""Command-line plumbing shared by the stage scripts: dataclass configs as flags, and clean exits."""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from transformers import HfArgumentParser

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input or setup: the stage exits with code 2 and this one-line message."""


def parse_config(config_class, argv: list[str] | None = None):
    """Fill `config_class` from the command line; every field is a `--flag` (dashes or underscores).

    Unknown flags are rejected with exit code 2 (argparse's own usage error).
    """
    parser = HfArgumentParser(config_class)
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return config


def run_stage(main: Callable, config_class, argv: list[str] | None = None) -> int:
    """Parse the config, run `main(config)` and turn a UsageError into one line on stderr and exit 2."""
    config = parse_config(config_class, argv)
    try:
        return main(config) or EXIT_OK
    except UsageError as error:
        if getattr(config, "debug", False):
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def config_as_dict(config) -> dict:
    return {key: value for key, value in dataclasses.asdict(config).items() if key != "debug"}


def write_json(path: Path, payload) -> None:
    """Write JSON atomically, UTF-8 without escaping plain text."""
    write_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to a temp file and rename it: `path` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    tmp.replace(path)
