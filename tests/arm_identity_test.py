"""Arms by what was trained: train.py records the model's identity, the data hashes, the planned steps and every
resume override; evaluate.py pools runs equal in those whatever their launch details, and refuses what is not two
seeds or was not scored alike."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
from conftest import TINY_TRAINING_FLAGS, load_script, run_in_process, write_data_dir

from lora_summarization import data
from lora_summarization.arms import arm_identity, group_arms
from lora_summarization.cli import config_as_dict
from lora_summarization.resume_guard import file_sha256, model_identity

STEPS = ("--max-steps", "2", "--save-steps", "1", "--eval-examples", "4", "--report-to", "none")


def train(*argv):
    result = run_in_process("train.py", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary(folder) -> dict:
    return json.loads((folder / "training_summary.json").read_text())


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_model_dir, data_dir):
    """Seeds 1 and 2 of one arm launched as differently as train.py allows (another copy of the model and of the data,
    another batch split, other intervals, activation checkpointing); seed 1 on data re-prepared into that same copy;
    and seed 1 resumed at step 1 with another LoRA dropout."""
    root = tmp_path_factory.mktemp("arm-runs")
    model_copy = shutil.copytree(tiny_model_dir, root / "model_copy")
    data_copy = shutil.copytree(data_dir, root / "data_copy")
    folders = {name: root / name for name in ("a_s1", "a_s2", "other_data_s1", "resumed_s1")}
    train("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", folders["a_s1"], "--seed", "1", *STEPS,
          *TINY_TRAINING_FLAGS, "--eval-steps", "2")  # fmt: skip
    train("--model", model_copy, "--data-dir", data_copy, "--output-dir", folders["a_s2"], "--seed", "2", *STEPS,
          *TINY_TRAINING_FLAGS, "--batch-size", "2", "--grad-accum", "4", "--eval-steps", "1", "--logging-steps", "1",
          "--gradient-checkpointing")  # fmt: skip
    write_data_dir(data_copy, {data.TRAIN_FILE: 60, data.VALIDATION_FILE: 16})
    train("--model", tiny_model_dir, "--data-dir", data_copy, "--output-dir", folders["other_data_s1"],
          "--seed", "1", *STEPS, *TINY_TRAINING_FLAGS)  # fmt: skip
    shutil.copytree(folders["a_s1"], folders["resumed_s1"])
    shutil.rmtree(folders["resumed_s1"] / "checkpoints" / "checkpoint-2")
    train("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", folders["resumed_s1"], "--seed", "1",
          *STEPS, *TINY_TRAINING_FLAGS, "--eval-steps", "2", "--resume", "--resume-anyway",
          "--lora-dropout", "0.1")  # fmt: skip
    return folders


def evaluate(tiny_model_dir, test_dir, output_dir, *adapters, tokens="4"):
    return run_in_process(
        "evaluate.py", "--model", tiny_model_dir, "--data-dir", test_dir, "--output-dir", output_dir,
        "--adapter", *adapters, "--max-new-tokens", tokens, "--no-published-loss", "--bootstrap-samples", "50",
    )  # fmt: skip


@pytest.fixture(scope="session")
def arms_evaluated(runs, tiny_model_dir, study_data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("arms-evaluated")
    result = evaluate(tiny_model_dir, study_data_dir, output_dir, *runs.values())
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="session")
def checkpoints_evaluated(runs, tiny_model_dir, study_data_dir, tmp_path_factory):
    """The checkpoints of steps 1 and 2 of seeds 1 and 2, with summaries of 2 tokens instead of 4."""
    output_dir = tmp_path_factory.mktemp("checkpoints-evaluated")
    checkpoints = [runs[run] / "checkpoints" / f"checkpoint-{step}" for step in (1, 2) for run in ("a_s1", "a_s2")]
    result = evaluate(tiny_model_dir, study_data_dir, output_dir, *checkpoints, tokens="2")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def results_in(folder) -> dict:
    return json.loads((folder / "evaluation_results.json").read_text())


def refusal(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    return line


def test_the_summary_records_the_model_by_content_and_the_data_by_hash(runs, tiny_model_dir, data_dir):
    first, second = summary(runs["a_s1"])["trained"], summary(runs["a_s2"])["trained"]
    assert first["model_sha256"] == second["model_sha256"] == model_identity(str(tiny_model_dir))
    assert first["file_sha256"][data.TRAIN_FILE] == file_sha256(data_dir / data.TRAIN_FILE)
    assert first["file_sha256"] == second["file_sha256"] and first["optimizer_steps"] == 2
    other = summary(runs["other_data_s1"])["trained"]["file_sha256"][data.TRAIN_FILE]
    assert other != first["file_sha256"][data.TRAIN_FILE]
    checkpoint = json.loads((runs["a_s1"] / "checkpoints" / "checkpoint-1" / "resume_settings.json").read_text())
    assert checkpoint == {**first, "earlier": []}


def test_a_resume_override_is_recorded_with_the_step_it_ended_at(runs):
    trained = summary(runs["resumed_s1"])["trained"]
    (part,) = trained["earlier"]
    assert part["until_step"] == 1 and part["settings"]["--lora-dropout"] == 0.05
    assert trained["settings"]["--lora-dropout"] == 0.1
    checkpoint = runs["resumed_s1"] / "checkpoints" / "checkpoint-2" / "resume_settings.json"
    assert json.loads(checkpoint.read_text())["earlier"] == [part]  # a further resume keeps it


def test_runs_equal_in_what_was_trained_form_one_arm_however_launched(runs, arms_evaluated):
    results = results_in(arms_evaluated)
    (pooled,) = [(name, arm["models"], arm["seeds"]) for name, arm in results["arms"].items()]
    arms = [comparison["model"] for comparison in results["comparisons"] if comparison["against"] == "base"]
    assert len(arms) == 3 and pooled[0] in arms and pooled[1:] == (["a_s1", "a_s2"], [1, 2])
    other_data = summary(runs["other_data_s1"])["trained"]["file_sha256"][data.TRAIN_FILE]
    assert any(f"data={other_data[:6]}" in name and "resumed=None" in name for name in arms)
    assert any("lora_dropout=0.1" in name and "resumed=until step 1: lora_dropout=0.05" in name for name in arms)


def test_checkpoints_are_named_by_run_and_step_and_pooled_by_step(checkpoints_evaluated):
    results = results_in(checkpoints_evaluated)
    assert list(results["models"]) == ["base", "a_s1/checkpoint-1", "a_s2/checkpoint-1", "a_s1/checkpoint-2",
                                       "a_s2/checkpoint-2"]  # fmt: skip
    assert {name: arm["models"] for name, arm in results["arms"].items()} == {
        "step=1": ["a_s1/checkpoint-1", "a_s2/checkpoint-1"],
        "step=2": ["a_s1/checkpoint-2", "a_s2/checkpoint-2"],
    }


def test_one_adapter_twice_or_one_seed_twice_in_an_arm_is_refused(runs, tiny_model_dir, study_data_dir, tmp_path):
    copy = shutil.copytree(runs["a_s1"], tmp_path / "copy_of_a_s1")
    line = refusal(evaluate(tiny_model_dir, study_data_dir, tmp_path, runs["a_s1"], copy))
    assert f"{runs['a_s1']} and {copy} hold identical adapter weights" in line
    mislabelled = shutil.copytree(runs["a_s2"], tmp_path / "mislabelled")
    recorded = summary(mislabelled)
    recorded["settings"]["seed"] = 1
    (mislabelled / "training_summary.json").write_text(json.dumps(recorded))
    line = refusal(evaluate(tiny_model_dir, study_data_dir, tmp_path, runs["a_s1"], mislabelled))
    assert "a_s1 and mislabelled are both seed 1 of one arm" in line


def test_compare_refuses_files_scored_with_other_settings(arms_evaluated, checkpoints_evaluated, tmp_path):
    files = [folder / "evaluation_predictions.jsonl" for folder in (arms_evaluated, checkpoints_evaluated)]
    line = refusal(run_in_process("evaluate.py", "--compare", *files, "--output-dir", tmp_path))
    assert f"different --max-new-tokens (4 in {files[0]}, 2 in {files[1]})" in line


@functools.cache
def train_config():
    return load_script("train.py").TrainConfig


def settings(**changes) -> dict:
    return config_as_dict(train_config()(**changes))


def trained(train_sha: str = "1" * 64, model_sha: str = "2" * 64, earlier=()) -> dict:
    files = {data.TRAIN_FILE: train_sha, data.VALIDATION_FILE: "3" * 64}
    return {"file_sha256": files, "model_sha256": model_sha, "optimizer_steps": 40, "earlier": list(earlier)}


def record(row_settings: dict, row_trained: dict | None, steps: int | None = 40) -> dict:
    return {**row_settings, "trained": arm_identity(row_settings, row_trained, steps)}


LAUNCH_DETAILS = {
    "eval_steps": 7,
    "save_steps": 9,
    "logging_steps": 1,
    "eval_examples": 5,
    "save_total_limit": 1,
    "gradient_checkpointing": True,
    "data_dir": "./data/",
    "model": "/models/qwen",
    "report_to": "none",
    "output_dir": "elsewhere",
    "resume": True,
    "resume_anyway": True,
    "overwrite_output_dir": True,
    "dry_run": True,
    "allow_cpu": True,
}
OTHER_SPLITS = [{"batch_size": 8, "grad_accum": 1}, {"batch_size": 1, "grad_accum": 8}]
OTHER_PLANS = [{"epochs": 1}, {"max_steps": 40}]  # the optimizer steps they resolve to are recorded, and are equal


@pytest.mark.parametrize(
    "changes", [{name: value} for name, value in LAUNCH_DETAILS.items()] + OTHER_SPLITS + OTHER_PLANS
)
def test_a_launch_detail_never_splits_an_arm_and_intervals_split_one_only_with_keep_best(changes):
    launched = {"one": settings(seed=1), "two": settings(seed=2, **changes)}
    assert group_arms({row: record(value, trained()) for row, value in launched.items()}) == {
        "fine_tuned": list(launched)
    }
    if set(changes) & {"eval_steps", "save_steps", "eval_examples"}:
        chosen = {row: {**value, "keep_best": True} for row, value in launched.items()}
        assert len(group_arms({row: record(value, trained()) for row, value in chosen.items()})) == 2


def test_a_summary_written_before_a_field_existed_takes_its_default_then():
    older = {name: value for name, value in settings(seed=1).items() if name not in ("use_dora", "keep_best")}
    assert group_arms({"old": record(older, trained()), "new": record(settings(seed=2), trained())}) == {
        "fine_tuned": ["old", "new"]
    }


def test_runs_of_other_data_or_models_or_without_hashes_are_never_pooled_and_are_named_by_it():
    arms = group_arms(
        {
            "a1": record(settings(seed=1), trained()),
            "a2": record(settings(seed=2), trained()),
            "data": record(settings(seed=1), trained(train_sha="abcdef" + "0" * 58)),
            "model": record(settings(seed=1), trained(model_sha="fedcba" + "0" * 58)),
            "unhashed": settings(seed=3),  # a results file written before identities: its settings alone
        }
    )
    assert sorted(arms.values()) == [["a1", "a2"], ["data"], ["model"], ["unhashed"]]
    (data_arm,) = [name for name, rows in arms.items() if rows == ["data"]]
    (model_arm,) = [name for name, rows in arms.items() if rows == ["model"]]
    assert "data=abcdef" in data_arm and "model=fedcba" in model_arm


def test_resume_overrides_count_as_what_was_trained_and_a_resume_on_other_hardware_does_not():
    before = {"settings": {"--learning-rate": 1e-4, "--batch-size": 2, "--grad-accum": 4, "number of processes": 1}}
    part = {**trained(), **before, "until_step": 10}
    on_two_gpus = {**trained(), "settings": {**before["settings"], "--learning-rate": 5e-5, "number of processes": 2}}
    arms = group_arms(
        {
            "plain_low": record(settings(seed=1), trained()),
            "plain_high": record(settings(seed=1, learning_rate=1e-4), trained()),
            "overridden": record(settings(seed=2), trained(earlier=[part])),
            "moved": record(
                settings(seed=2, batch_size=4, grad_accum=2), trained(earlier=[{**on_two_gpus, "until_step": 5}])
            ),
        }
    )
    assert sorted(arms.values()) == [["overridden"], ["plain_high"], ["plain_low", "moved"]]
    (name,) = [name for name, rows in arms.items() if rows == ["overridden"]]
    assert "resumed=until step 10: learning_rate=0.0001" in name


def test_a_model_has_one_identity_in_any_folder_and_in_the_hub_cache(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    identity = model_identity(str(tiny_model_dir))
    assert identity == model_identity(str(shutil.copytree(tiny_model_dir, tmp_path / "copy")))
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "blobs").mkdir()
    for file in tiny_model_dir.iterdir():
        blob = repo / "blobs" / (file_sha256(file) if file.suffix == ".safetensors" else file.name)
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_identity("someone/tiny") == identity
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("64", "65", 1))
    assert model_identity(str(changed)) != identity
