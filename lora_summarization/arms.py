"""Arms: adapters grouped by what determines the distribution of the trained adapter, never by how a run was launched.

An adapter's identity is its model (by content: resume_guard.model_identity), the sha256 of its training data, the
effective batch (batch x accumulation, not its split), the planned optimizer steps, the optimisation and LoRA settings,
precision, system prompt and max length, and what was trained before a resume that changed any of these. The
validation data and the evaluation and checkpoint intervals choose the adapter only with --keep-best, so only there
are they part of it. A checkpoint is the adapter of its step. Seeds of one identity form one arm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .cli import UsageError
from .data import TRAIN_FILE, VALIDATION_FILE
from .evaluation import read_training_summary
from .modeling import ADAPTER_WEIGHTS_FILE
from .resume_guard import field_values, file_sha256, read_record
from .training import checkpoint_step

# Where and how a run was launched: runs that differ only in these train the same adapter distribution. The batch
# split is replaced by the effective batch, and epochs and max_steps by the optimizer steps they resolve to.
LAUNCH_SETTINGS = (
    "model",
    "data_dir",
    "output_dir",
    "batch_size",
    "grad_accum",
    "gradient_checkpointing",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "resume",
    "resume_anyway",
    "overwrite_output_dir",
    "dry_run",
    "allow_cpu",
    "debug",
    "seed",
)
PLANNED_STEPS_SETTINGS = ("epochs", "max_steps")
CHOSEN_BY_VALIDATION = ("keep_best", "eval_steps", "save_steps", "eval_examples")  # the adapter's, with --keep-best
# Fields train.py gained after its first version, with the behaviour a summary written before them had.
ADDED_LATER = {
    "use_dora": False,
    "use_rslora": False,
    "loraplus_lr_ratio": 0.0,
    "neftune_noise_alpha": 0.0,
    "keep_best": False,
}
FINE_TUNED = "fine_tuned"  # the row of the adapter when there is only one, and the arm when there is only one
FINAL = "final"  # the `step` of the adapter train.py saved at the end, as opposed to a checkpoint's step
DIGEST = re.compile(r"[0-9a-f]{64}")


def settled_identity(settings: dict, trained: dict, optimizer_steps: int | None, step: int | str) -> dict:
    """The identity of adapters trained with `settings` (config fields) as recorded in `trained` (the record of
    resume_guard.trained_record; empty for summaries written before it, which are then known by their model and data
    paths), leaving out what was trained before a resume."""
    values = {**ADDED_LATER, **settings}
    by_validation = bool(values["keep_best"]) and step == FINAL
    left_out = LAUNCH_SETTINGS + (() if by_validation else CHOSEN_BY_VALIDATION)
    identity = {name: value for name, value in values.items() if name not in left_out}
    identity["effective_batch"] = values.get("batch_size", 0) * values.get("grad_accum", 0) or None
    steps = trained.get("optimizer_steps", optimizer_steps)
    if steps is not None:
        identity = {name: value for name, value in identity.items() if name not in PLANNED_STEPS_SETTINGS}
        identity["optimizer_steps"] = steps
    files = trained.get("file_sha256", {})
    identity["model"] = trained.get("model_sha256") or values.get("model")
    identity["data"] = files.get(TRAIN_FILE) or values.get("data_dir")
    if by_validation:
        identity["validation_data"] = files.get(VALIDATION_FILE) or values.get("data_dir")
    identity["step"] = step
    return identity


def arm_identity(
    settings: dict, trained: dict | None = None, optimizer_steps: int | None = None, step: int | str = FINAL
) -> dict:
    """settled_identity, and under `resumed` what the parts trained before a resume that changed it trained
    otherwise (`until step 40: learning_rate=0.01`); a resume that changed nothing of it (more GPUs, another batch
    split) leaves no trace."""
    trained = trained or {}
    identity = settled_identity(settings, trained, optimizer_steps, step)
    resumed = [change for part in trained.get("earlier", []) if (change := part_change(part, settings, identity, step))]
    if resumed:
        identity["resumed"] = resumed
    return identity


def part_change(part: dict, settings: dict, identity: dict, step: int | str) -> str | None:
    """How a part trained before a resume differs from `identity` (None when it does not)."""
    if "settings" not in part:  # its checkpoint recorded nothing
        return f"until step {part['until_step']}: settings not recorded"
    before = settled_identity({**settings, **field_values(part)}, part, None, step)
    changed = [f"{name}={shown(before[name])}" for name in sorted(before) if before[name] != identity.get(name)]
    return f"until step {part['until_step']}: {', '.join(changed)}" if changed else None


def adapter_record(folder: str | Path, adapter_sha256: str) -> dict | None:
    """What evaluate.py keeps of an adapter folder for its arm: the training settings (of a checkpoint, those it
    records), its identity under `trained`, and its weights' sha256; None when train.py recorded nothing there."""
    summary = read_training_summary(folder)
    if summary is not None:
        settings = summary.get("settings", {})
        trained = summary.get("trained")
        identity = arm_identity(settings, trained, summary.get("optimizer_steps"))
        if trained is None and summary.get("resume_overrides"):  # a summary written before `trained`
            identity["resumed"] = summary["resume_overrides"]
    elif (record := read_record(folder)) is not None:
        settings = field_values(record)
        identity = arm_identity(settings, record, step=checkpoint_step(folder))
    else:
        return None
    return {**settings, "trained": identity, "adapter_sha256": adapter_sha256}


def adapter_records(adapters: dict[str, str]) -> dict[str, dict | None]:
    """adapter_record of each row's folder; refused when two folders hold identical weights or two rows are the
    same seed of one arm."""
    digests = {row: file_sha256(Path(folder) / ADAPTER_WEIGHTS_FILE) for row, folder in adapters.items()}
    refuse_identical_adapters({adapters[row]: digest for row, digest in digests.items()})
    records = {row: adapter_record(adapters[row], digest) for row, digest in digests.items()}
    group_arms(records)
    return records


def refuse_identical_adapters(digests: dict[str, str | None]) -> None:
    """One adapter given twice (or a copy of it) would count as two seeds."""
    seen: dict[str, str] = {}
    for name, digest in digests.items():
        if digest is not None and digest in seen:
            raise UsageError(
                f"{seen[digest]} and {name} hold identical adapter weights (sha256 {digest[:12]}), one trained "
                "adapter twice; give each adapter once"
            )
        seen.setdefault(digest, name)


def group_arms(records: dict[str, dict | None]) -> dict[str, list[str]]:
    """Rows by arm: rows of one identity (`trained` in their record, else computed from the settings of a results
    file written before it) form one arm; a row without a record is an arm of its own under its row name.

    An arm is named by what tells the arms apart (`learning_rate=0.0001`, `data=1a2b3c` for data or model digests),
    or `fine_tuned` when there is one arm only. When every arm has one row, arms keep their row names, so single-seed
    runs read as before. Refused: identical adapter weights in two rows, or one seed twice in an arm.
    """
    refuse_identical_adapters({row: (record or {}).get("adapter_sha256") for row, record in records.items()})
    arms: dict[str, list[str]] = {}
    identities: dict[str, dict] = {}
    for row, record in records.items():
        key = row
        if record is not None:
            identity = record.get("trained") or arm_identity(record)
            key = json.dumps(identity, sort_keys=True)
            identities[key] = identity
        arms.setdefault(key, []).append(row)
    refuse_repeated_seeds(arms, records)
    if all(len(rows) == 1 for rows in arms.values()):
        return {rows[0]: rows for rows in arms.values()}
    differing = sorted({name for identity in identities.values() for name in identity if different(identities, name)})
    return {arm_name(identities[key], differing) if key in identities else key: rows for key, rows in arms.items()}


def refuse_repeated_seeds(arms: dict[str, list[str]], records: dict[str, dict | None]) -> None:
    for rows in arms.values():
        seeds: dict[object, str] = {}
        for row in rows:
            seed = (records[row] or {}).get("seed")
            if seed is not None and seed in seeds:
                raise UsageError(
                    f"{seeds[seed]} and {row} are both seed {seed} of one arm, so they are not two seeds; give each "
                    "run once, or train the other with another --seed"
                )
            seeds[seed] = row


def different(identities: dict[str, dict], name: str) -> bool:
    return len({json.dumps(identity.get(name)) for identity in identities.values()}) > 1


def shown(value) -> str:
    """A value as an arm's name shows it: digests by their first 6 characters, lists joined by `; `."""
    if isinstance(value, list):
        return "; ".join(map(shown, value))
    return value[:6] if isinstance(value, str) and DIGEST.fullmatch(value) else str(value)


def arm_name(identity: dict, differing: list[str]) -> str:
    return ", ".join(f"{name}={shown(identity.get(name))}" for name in differing) or FINE_TUNED
