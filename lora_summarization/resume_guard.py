"""What a resumed run must share with its checkpoint: settings that shape the training, and the data itself.

Every checkpoint holds resume_settings.json; `--resume` compares it with the current run before the model
is loaded and refuses any difference unless `--resume-anyway` is given.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from .cli import UsageError

SETTINGS_FILE = "resume_settings.json"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def resume_settings(config, fields: Iterable[str], processes: int, data_files: Iterable[Path]) -> dict:
    """The named config fields (as flags), the process count, and the sha256 of the data files and of
    the base model's config.json when `config.model` is a local folder."""
    settings = {flag(name): getattr(config, name) for name in fields}
    settings["number of processes"] = processes
    files = {Path(path).name: file_sha256(path) for path in data_files}
    model_config = Path(config.model) / "config.json"
    if model_config.is_file():
        files["--model config.json"] = file_sha256(model_config)
    return {"settings": settings, "file_sha256": files}


def shown(value) -> str:
    return "not set" if value is None else str(value)


def differences(recorded: dict, current: dict) -> list[str]:
    changes = []
    for key, now in current["settings"].items():
        then = recorded["settings"].get(key)
        if key not in recorded["settings"] or then != now:
            changes.append(f"{key}: checkpoint {shown(then)}, now {shown(now)}")
    for name, sha in current["file_sha256"].items():
        if recorded["file_sha256"].get(name) != sha:
            changes.append(f"{name}: changed since the checkpoint")
    return changes


def check_resume(checkpoint: str | Path, current: dict, anyway: bool) -> list[str]:
    """Refuse to resume `checkpoint` with other settings or data; with `anyway`, warn and return the changes."""
    recorded_file = Path(checkpoint) / SETTINGS_FILE
    if recorded_file.is_file():
        changes = differences(json.loads(recorded_file.read_text(encoding="utf-8")), current)
    else:
        changes = [f"{checkpoint} records no settings to compare ({SETTINGS_FILE} is missing)"]
    if changes and not anyway:
        raise UsageError(
            f"--resume: the checkpoint was made with other settings: {'; '.join(changes)}; "
            "pass --resume-anyway to continue regardless"
        )
    if changes:
        print(f"warning: --resume-anyway: continuing although {'; '.join(changes)}", file=sys.stderr)
    return changes
