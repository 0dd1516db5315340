"""A study: arms x seeds of train.py runs in one folder, their states read from their own folders, and the report.

The study folder holds study.json (the settings' values, which of them are grid dimensions, the seeds, the launcher),
runs/<run>/ (one train.py output folder per run) with runs/<run>.log beside it, evaluation/ (one evaluate.py call
over every finished run) and report.md. Nothing but the folders says how far a run got, so a study survives the
death of whatever launched it.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .cli import UsageError, write_json
from .run_lock import live_holder

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train.py"
EVALUATE_SCRIPT = ROOT / "evaluate.py"
STUDY_FILE = "study.json"
RUNS = "runs"
EVALUATION = "evaluation"
REPORT = "report.md"
DEFAULT_SEEDS = (42, 43, 44)
# What says where and how a run is launched, not what it trains: the study sets them itself or refuses them.
LAUNCH_ONLY = ("output_dir", "resume", "resume_anyway", "overwrite_output_dir", "dry_run", "debug")
# One evaluation scores every run against one base model on one test set.
SINGLE_VALUED = ("model", "data_dir")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class TrainField:
    name: str
    kind: str  # bool, int, float or str
    optional: bool  # `X | None`: `none` is None
    default: object


def train_fields(script: Path = TRAIN_SCRIPT) -> dict[str, TrainField]:
    """TrainConfig's fields, read from train.py's source: a stage does not import another stage, and importing it
    would cost the seconds its torch imports take."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    config = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "TrainConfig")
    fields = {}
    for statement in config.body:
        if isinstance(statement, ast.AnnAssign):
            kinds = [part.strip() for part in ast.unparse(statement.annotation).split("|")]
            name = statement.target.id
            default = field_default(statement.value)
            fields[name] = TrainField(name, kinds[0], "None" in kinds[1:], default)
    return fields


def field_default(value: ast.expr):
    """The literal default of `x: int = 3` or `x: int = field(default=3, ...)`."""
    if isinstance(value, ast.Call):
        value = next(keyword.value for keyword in value.keywords if keyword.arg == "default")
    return ast.literal_eval(value)


def parse_value(field: TrainField, text: str):
    if field.optional and text.lower() == "none":
        return None
    if field.kind == "bool":
        if text.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError("true or false")
        return text.lower() in TRUE_WORDS
    try:
        return {"int": int, "float": float, "str": str}[field.kind](text)
    except ValueError:
        raise ValueError(f"a number ({field.kind})") from None


def check_value(field: TrainField, value):
    """A value from a --config file, already typed by YAML: the field's type, ints accepted for floats."""
    if value is None and field.optional:
        return None
    if isinstance(value, str):
        return parse_value(field, value)
    kind = {"bool": bool, "int": int, "float": (int, float), "str": str}[field.kind]
    if not isinstance(value, kind) or (field.kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"a {field.kind}")
    return float(value) if field.kind == "float" else value


def requested_values(assignments: list[str]) -> dict[str, list]:
    """Each train.py setting's values from FIELD=V1,V2 words (a later word for the same field wins; `--config`'s
    entries come first, as FIELD=<JSON list>); every problem at once."""
    fields, problems, values = train_fields(), [], {}
    for name, raw in map(setting_values, assignments):
        key = name.strip().replace("-", "_")
        if key not in fields or key in LAUNCH_ONLY:
            why = "is set by the study for each run" if key in LAUNCH_ONLY else "is not a train.py setting"
            problems.append(f"{name} {why}")
            continue
        try:
            parsed = [check_value(fields[key], item) for item in raw]
        except ValueError as error:
            problems.append(f"{name}={','.join(map(str, raw))}: each value must be {error}")
            continue
        values[key] = list(dict.fromkeys(parsed))  # in the order given, each value once
    problems += [f"{key} takes one value (one evaluation)" for key in SINGLE_VALUED if len(values.get(key, ())) > 1]
    if problems:
        raise UsageError("; ".join(problems) + "; see python train.py --help for the settings")
    return values


def setting_values(assignment: str) -> tuple[str, list]:
    """`name=v1,v2`, or `name=["a,b", "c"]` (a JSON list) for values that hold commas."""
    name, equals, text = assignment.partition("=")
    if not equals or not text:
        raise UsageError(f"{assignment}: settings are FIELD=V1,V2,... (e.g. learning_rate=5e-5,1e-4)")
    if not text.startswith("["):
        return name, text.split(",")
    try:
        values = json.loads(text)
    except ValueError:
        raise UsageError(f"{assignment}: a value starting with [ must be a JSON list") from None
    return name, values


@dataclass
class Study:
    folder: Path
    values: dict[str, list]  # every setting the study sets, seeds apart
    dimensions: list[str]  # the settings with several values, in the order given
    seeds: list[int]
    launcher: dict
    evaluation: dict  # evaluate.py's options
    submissions: list[dict]  # SLURM jobs: {"array": id, "runs": [...], "evaluation": id}

    @property
    def fixed(self) -> dict:
        return {key: values[0] for key, values in self.values.items() if key not in self.dimensions}

    def runs(self) -> list[Run]:
        arms = itertools.product(*(self.values[key] for key in self.dimensions))
        return [
            Run(self.folder, dict(zip(self.dimensions, arm, strict=True)), seed, self.fixed)
            for arm, seed in itertools.product(arms, self.seeds)
        ]

    def setting(self, name: str):
        return self.values[name][0] if name in self.values else train_fields()[name].default

    def save(self) -> None:
        write_json(self.folder / STUDY_FILE, self.to_json())

    def to_json(self) -> dict:
        return {
            "grid": {key: self.values[key] for key in self.dimensions},
            "fixed": self.fixed,
            "seeds": self.seeds,
            "launcher": self.launcher,
            "evaluation": self.evaluation,
            "submissions": self.submissions,
        }


@dataclass
class Run:
    study_folder: Path
    arm: dict  # the grid's values of this run
    seed: int
    fixed: dict

    @property
    def name(self) -> str:
        parts = [f"{key}={format_value(value)}" for key, value in self.arm.items()] + [f"seed{self.seed}"]
        return re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts))

    @property
    def arm_name(self) -> str:
        """The run's arm, as experiment trackers group it: its grid values, or the study's name."""
        values = ", ".join(f"{key}={format_value(value)}" for key, value in self.arm.items())
        return values or self.study_folder.resolve().name

    @property
    def folder(self) -> Path:
        return self.study_folder / RUNS / self.name

    @property
    def log(self) -> Path:
        return self.study_folder / RUNS / f"{self.name}.log"

    def train_flags(self) -> list[str]:
        """train.py's flags for this run; it always resumes, so a repeated command continues whatever stopped."""
        settings = {**self.fixed, **self.arm, "seed": self.seed}
        flags = ["--output-dir", str(self.folder), "--resume"]
        for key, value in settings.items():
            if value is not None:
                flags += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
        return flags


def format_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def open_study(folder: Path, requested: dict[str, list], launcher: dict | None, evaluation: dict | None) -> Study:
    """The study in `folder` with the requested values added, or a new one; a change of a fixed setting is refused.

    A command without settings continues the study as it is; without a launcher (--status, --evaluate-only) the
    study keeps its launcher and evaluation options."""
    seeds = requested.pop("seed", None)
    stored = read_study(folder)
    if stored is None:
        dimensions = [key for key, values in requested.items() if len(values) > 1]
        return Study(folder, requested, dimensions, seeds or list(DEFAULT_SEEDS), launcher or {}, evaluation or {}, [])
    if requested or seeds:
        refuse_changed_settings(stored, requested)
        for key in stored.dimensions:
            stored.values[key] = list(dict.fromkeys(stored.values[key] + requested.get(key, [])))
        stored.seeds = list(dict.fromkeys(stored.seeds + (seeds or [])))
    if launcher is not None:
        stored.launcher, stored.evaluation = launcher, evaluation
    return stored


def refuse_changed_settings(study: Study, requested: dict[str, list]) -> None:
    changed = [
        f"{key}: the study has {describe(study.values.get(key))}, this command {describe(requested.get(key))}"
        for key in sorted(set(study.values) | set(requested))
        if key not in study.dimensions and study.values.get(key) != requested.get(key)
    ]
    if changed:
        raise UsageError(
            f"{study.folder} is a study with other fixed settings ({'; '.join(changed)}); rerun it with its own "
            "settings (add values only to its grid dimensions, or seeds), or pass another --output-dir"
        )


def describe(values: list | None) -> str:
    return "train.py's default" if values is None else ",".join(map(format_value, values))


def read_study(folder: Path) -> Study | None:
    path = folder / STUDY_FILE
    if not path.exists():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    values = {**stored["grid"], **{key: [value] for key, value in stored["fixed"].items()}}
    return Study(
        folder,
        values,
        list(stored["grid"]),
        stored["seeds"],
        stored["launcher"],
        stored["evaluation"],
        stored["submissions"],
    )


# --- a run's state, from its folder, its log and the scheduler's queue


@dataclass
class RunState:
    run: Run
    state: str  # finished, running, queued, interrupted, failed, not started
    detail: str = ""

    def line(self) -> str:
        return f"{self.run.name}: {self.state}{f' ({self.detail})' if self.detail else ''}"


def run_state(run: Run, queued: dict[str, str]) -> RunState:
    """`queued` describes the scheduler's job of each run it still holds ("job 12_3, pending")."""
    folder = run.folder
    if (folder / "adapter_config.json").exists() and (folder / "training_summary.json").exists():
        return RunState(run, "finished")
    if holder := live_holder(folder):
        return RunState(run, "running", progress(run) + f"; PID {holder.get('pid')} on {holder.get('host')}")
    if run.name in queued:
        return RunState(run, "queued", queued[run.name])
    last = last_line(run.log)
    if last.startswith(("error:", "Traceback")) or re.match(r"\w+(Error|Exception)\b", last):
        return RunState(run, "failed", f"{run.log}: {last}")
    if checkpoint := latest_checkpoint_step(folder):
        return RunState(run, "interrupted", f"at checkpoint {checkpoint}")
    if run.log.exists():
        return RunState(run, "interrupted", "before its first checkpoint")
    return RunState(run, "not started")


def progress(run: Run) -> str:
    """`step x of y`: the last step train.py logged, of the steps its plan printed."""
    planned = re.findall(r"optimizer steps: ([\d,]+)", read_text(run.log))
    return f"at step {last_logged_step(run.folder / 'train_log.jsonl')} of {planned[-1] if planned else '?'}"


def last_logged_step(train_log: Path) -> int:
    for line in reversed(read_text(train_log).splitlines()):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue  # a line being written
    return 0


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def last_line(path: Path) -> str:
    """The log's last line; a progress bar's carriage-return updates count as lines."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", read_text(path)) if line.strip()]
    return lines[-1] if lines else ""


def latest_checkpoint_step(folder: Path) -> int | None:
    steps = [int(path.name.split("-")[1]) for path in (folder / "checkpoints").glob("checkpoint-[0-9]*")]
    return max(steps, default=None)


def states(study: Study, queued: dict[str, str]) -> list[RunState]:
    return [run_state(run, queued) for run in study.runs()]


def of_state(found: Iterable[RunState], *names: str) -> list[RunState]:
    return [state for state in found if state.state in names]
