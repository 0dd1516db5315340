"""What a run trained: the settings that shape the training, the data itself, the model's identity, and the parts
trained before a resume that changed them.

Every checkpoint holds this record as resume_settings.json, and training_summary.json holds it as `trained`;
`--resume` compares it with the current run before the model is loaded and refuses any difference unless
`--resume-anyway` is given. evaluate.py groups adapters into arms by it (lora_summarization/arms.py).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from .cli import UsageError, read_json_object

SETTINGS_FILE = "resume_settings.json"
MODEL_CONFIG_FILE = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_values(record: dict) -> dict:
    """The config fields recorded by flag in a record's settings (`--learning-rate` -> `learning_rate`)."""
    return {key[2:].replace("-", "_"): value for key, value in record.get("settings", {}).items() if key[:2] == "--"}


def model_folder(model: str) -> Path | None:
    """A local model folder as given; a Hub id as its snapshot folder in the local Hub cache, never downloaded
    (None when it is not cached)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        config = try_to_load_from_cache(model, MODEL_CONFIG_FILE)
    except HFValidationError:  # neither a folder nor a Hub id
        return None
    return Path(config).parent if isinstance(config, str) else None


def weight_sha256(path: Path) -> str:
    """A Hub-cache file is a link to blobs/<the sha256 of its content> (for files stored with Git LFS, as weights
    are): its name is the digest, read without hashing. A plain file is hashed (about 2 s per GB)."""
    target = path.resolve()
    return target.name if path.is_symlink() and SHA256_NAME.fullmatch(target.name) else file_sha256(path)


def model_identity(model: str) -> str | None:
    """The model by its content, not its path: sha256 over the sha256 of config.json and of each weight file
    (*.safetensors, *.bin), by file name. A Hub id is read from its cached snapshot, where the weights' digests
    are their blob names, so a Hub id and a local copy of the same files have one identity. None when the model
    is neither a local folder nor cached."""
    folder = model_folder(model)
    if folder is None or not (folder / MODEL_CONFIG_FILE).is_file():
        return None
    weights = sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)})
    lines = [f"{MODEL_CONFIG_FILE} {file_sha256(folder / MODEL_CONFIG_FILE)}"]
    lines += [f"{path.name} {weight_sha256(path)}" for path in weights]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def resume_settings(config, fields: Iterable[str], processes: int, data_files: Iterable[Path]) -> dict:
    """The named config fields (as flags), the process count, and the sha256 of the data files and of
    the base model's config.json when `config.model` is a local folder."""
    settings = {flag(name): getattr(config, name) for name in fields}
    settings["number of processes"] = processes
    files = {Path(path).name: file_sha256(path) for path in data_files}
    model_config = Path(config.model) / MODEL_CONFIG_FILE
    if model_config.is_file():
        files["--model config.json"] = file_sha256(model_config)
    return {"settings": settings, "file_sha256": files}


def read_record(checkpoint: str | Path) -> dict | None:
    """The record a train.py checkpoint holds (None when it has none)."""
    path = Path(checkpoint) / SETTINGS_FILE
    record = read_json_object(path, "a checkpoint's settings written by train.py")
    if record is not None and not isinstance(record.get("settings"), dict):
        raise UsageError(f"{path} is not a checkpoint's settings written by train.py; remove it or fix it")
    return record


def trained_record(settings: dict, model: str, optimizer_steps: int, earlier: list[dict]) -> dict:
    """What a run trains: its resume `settings`, the model's identity, the planned optimizer steps, and the `earlier`
    parts (earlier_parts)."""
    return {**settings, "model_sha256": model_identity(model), "optimizer_steps": optimizer_steps, "earlier": earlier}


def earlier_parts(checkpoint: str | Path, step: int, overrides: list[str]) -> list[dict]:
    """The records of the parts of a run trained before each resume that changed what it trains (--resume-anyway),
    oldest first, each with the step it ended at: the checkpoint's, and the checkpoint itself when this resume
    overrides its settings."""
    recorded = read_record(checkpoint) or {}
    earlier = recorded.get("earlier", [])
    if overrides:
        earlier = [
            *earlier,
            {**{key: value for key, value in recorded.items() if key != "earlier"}, "until_step": step},
        ]
    return earlier


def shown(value) -> str:
    return "not set" if value is None else str(value)


# The Trainer reloads optimizer.pt and scheduler.pt on resume: their parameter groups' learning rates and weight
# decay, and the scheduler's base rates, replace whatever these flags say.
RESTORED_BY_THE_OPTIMIZER = ("--learning-rate", "--weight-decay", "--loraplus-lr-ratio")


def changed(recorded: dict, current: dict, key: str) -> bool:
    return key in current["settings"] and recorded["settings"].get(key) != current["settings"][key]


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
    recorded = read_record(checkpoint)
    if recorded is not None:
        changes = differences(recorded, current)
    else:
        changes = [f"{checkpoint} records no settings to compare ({SETTINGS_FILE} is missing)"]
    if changes and not anyway:
        raise UsageError(
            f"--resume: the checkpoint was made with other settings: {'; '.join(changes)}; "
            "pass --resume-anyway to continue regardless"
        )
    if undone := [name for name in RESTORED_BY_THE_OPTIMIZER if recorded and changed(recorded, current, name)]:
        raise UsageError(
            f"--resume-anyway cannot change {', '.join(undone)}: the checkpoint's optimizer and scheduler state "
            "restore it; train with it from the start instead (--overwrite-output-dir, or another --output-dir)"
        )
    if changes:
        print(f"warning: --resume-anyway: continuing although {'; '.join(changes)}", file=sys.stderr)
    return changes
