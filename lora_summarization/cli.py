"""Command-line plumbing shared by the stage scripts: dataclass configs as flags, and clean exits."""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml
from tqdm.auto import tqdm
from transformers import HfArgumentParser

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
INTERRUPTED_MESSAGE = "interrupted before the stage finished; rerun it to complete its outputs"


class UsageError(Exception):
    """Bad input or setup: the stage exits with code 2 and this one-line message."""


class RunFailed(Exception):
    """The run could not finish (e.g. a full disk): the stage exits with code 1 and this one-line message."""


CONFIG_FLAG = "--config"


def parse_config(config_class, argv: list[str] | None = None):
    """Fill `config_class` from the command line; every field is a `--flag` (dashes or underscores).

    `--config FILE` (YAML or JSON: a mapping of field names to values) sets the fields first; flags given on the
    command line win. Unknown flags or fields are rejected with exit code 2 (argparse's own usage error).

    A config class naming one of its list fields in `POSITIONAL` (study.py's settings) takes there the words that
    are not flags, after the config file's entries that are not fields, each as `name=<JSON list of its values>`.
    """
    parser = HfArgumentParser(config_class)
    parser.add_argument(CONFIG_FLAG, metavar="FILE", help="YAML or JSON file of these fields; command-line flags win")
    argv = sys.argv[1:] if argv is None else argv
    config_file = parser.parse_known_args(argv)[0].config
    values = read_config_file(parser, config_file) if config_file else {}
    positional = getattr(config_class, "POSITIONAL", None)
    fields = {field.name for field in dataclasses.fields(config_class)}
    words = [
        f"{name}={json.dumps(as_list(value))}" for name, value in values.items() if positional and name not in fields
    ]
    own = {name: value for name, value in values.items() if name in fields or not positional}
    parser.set_defaults(**config_file_values(parser, fields, config_file, own))
    config, namespace, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if positional:
        setattr(config, positional, [*words, *getattr(config, positional), *(arg for arg in unknown if arg[:1] != "-")])
        unknown = [arg for arg in unknown if arg[:1] == "-"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return config


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def read_config_file(parser, path: str) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"{CONFIG_FLAG} {path} cannot be read: {error}".splitlines()[0])
    if not isinstance(values, dict):
        parser.error(f"{CONFIG_FLAG} {path} must hold a mapping of field names to values")
    return {str(name): value for name, value in values.items()}


def config_file_values(parser, fields: set[str], path: str, values: dict) -> dict:
    """A --config file's fields, as defaults of `parser`; scalars as text, so argparse parses each with its
    field's type exactly as it would the flag's value."""
    unknown = sorted(name for name in values if name not in fields)
    if unknown:
        parser.error(f"{CONFIG_FLAG} {path} has unknown fields: {', '.join(unknown)}")
    return {name: value if value is None or isinstance(value, list) else str(value) for name, value in values.items()}


def run_stage(main: Callable, config_class, argv: list[str] | None = None) -> int:
    """Parse the config and run `main(config)`; a UsageError (exit 2), RunFailed (exit 1) or Ctrl-C (exit 130)
    becomes one line on stderr, with the traceback only under --debug."""
    config = parse_config(config_class, argv)
    try:
        return main(config) or EXIT_OK
    except UsageError as error:
        return report_exit(config, f"error: {error}", EXIT_USAGE)
    except RunFailed as error:
        return report_exit(config, f"error: {error}", EXIT_CHECK_FAILED)
    except KeyboardInterrupt:
        return report_exit(config, INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)


def report_exit(config, line: str, code: int) -> int:
    close_progress_bars()
    if getattr(config, "debug", False):
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


def close_progress_bars() -> None:
    """An error raised inside a loop leaves its tqdm bar open; closing it ends the bar's line (tqdm has no public
    list of open bars)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def config_as_dict(config) -> dict:
    return {key: value for key, value in dataclasses.asdict(config).items() if key != "debug"}


def write_json(path: Path, payload) -> None:
    """Write JSON atomically, UTF-8 without escaping plain text."""
    write_atomic(path, json_text(payload))


def read_json_object(path: Path, what: str) -> dict | None:
    """The JSON object in the file `path` (None when there is none); refused when the file holds anything else."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not {what}; remove it or fix it")
    return value


def json_text(payload) -> str:
    """The text `write_json` writes."""
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to a temp file and rename it: `path` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    tmp.replace(path)
