"""--report-to: the logging integrations a run names (tensorboard, wandb, mlflow, ...), checked before any model
loads; and the run's name, group and W&B id there, kept in the run folder so that a resumed run continues the same
tracker run."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .cli import read_json_object, write_json

TRACKER_RUN_FILE = "tracker_run.json"
GROUP_VARIABLE = "WANDB_RUN_GROUP"  # study.py names a run's arm here; W&B reads it too


def integrations(report_to: str) -> list[str]:
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    return [] if names == ["none"] else names


def report_to_problems(report_to: str) -> list[str]:
    """Unknown or uninstalled logging integrations, found before any model loads."""
    # Here, not at the top: study.py reads GROUP_VARIABLE without the seconds that loading torch takes.
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = get_available_reporting_integrations()
    problems = []
    for name in integrations(report_to):
        if name not in INTEGRATION_TO_CALLBACK:
            problems.append(f"--report-to {name} is unknown; choose from none, {', '.join(INTEGRATION_TO_CALLBACK)}")
        elif name not in available:
            problems.append(f"--report-to {name} needs its package installed (pip install {name})")
    return problems


def arm_group(identity: dict) -> str:
    """The group of a run in the trackers: the arm given by study.py, else `arm-` and a digest of what the run
    trains (arms.arm_identity), so that the seeds of one arm share a group wherever they were launched."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return os.environ.get(GROUP_VARIABLE) or f"arm-{digest[:8]}"


def tracker_run(output_dir: str | Path, group: str, seed: int) -> dict:
    """The run's name (its arm and seed), group, and W&B id: the id recorded in the run folder, so that a resumed
    run continues its tracker run; a new one for a run started afresh (which clears the folder)."""
    path = Path(output_dir) / TRACKER_RUN_FILE
    recorded = read_json_object(path, "a tracker record written by train.py") or {}
    run = {"name": f"{group} seed {seed}", "group": group, "wandb_id": recorded.get("wandb_id") or uuid.uuid4().hex}
    write_json(path, run)
    return run


@contextmanager
def tracker_environment(run: dict) -> Iterator[None]:
    """W&B takes the run's id, group and resumption from the environment when the Trainer starts it; values the
    user set win, and the environment is restored after."""
    wanted = {"WANDB_RUN_ID": run["wandb_id"], GROUP_VARIABLE: run["group"], "WANDB_RESUME": "allow"}
    added = {name: value for name, value in wanted.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
