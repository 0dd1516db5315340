"""--resume past a damaged latest checkpoint: set aside with a warning, the run continues from the one before."""

import json
import shutil

import pytest
from conftest import TINY_TRAINING_FLAGS, run_in_process
from train_test import assert_same_adapter, only_error_line, run_train, train_args

SCHEDULE = ("--max-steps", "4", "--save-steps", "2", "--eval-steps", "1000", "--logging-steps", "1")
FLAGS = (*SCHEDULE, "--report-to", "none", *TINY_TRAINING_FLAGS)


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, data_dir, tmp_path_factory):
    """A whole 4-step run that left checkpoint-2 and checkpoint-4 beside its adapter."""
    output_dir = tmp_path_factory.mktemp("finished")
    result = run_in_process("train.py", *train_args(tiny_model_dir, data_dir, output_dir, *FLAGS))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_sets_a_damaged_latest_checkpoint_aside_and_continues_from_the_previous_one(
    tiny_model_dir, data_dir, finished_run, tmp_path, capsys, damaged
):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    checkpoints = output_dir / "checkpoints"
    truncate(checkpoints / "checkpoint-4" / damaged)
    code, out, err = run_train([*train_args(tiny_model_dir, data_dir, output_dir, *FLAGS), "--resume"], capsys)
    assert code == 0, err
    assert f"warning: {checkpoints / 'checkpoint-4'} cannot be loaded ({damaged}" in err
    assert (checkpoints / "broken-checkpoint-4" / damaged).stat().st_size < (
        finished_run / "checkpoints" / "checkpoint-4" / damaged
    ).stat().st_size
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in out
    assert json.loads((output_dir / "training_summary.json").read_text())["optimizer_steps"] == 4
    assert_same_adapter(finished_run, output_dir)


def test_resume_without_a_loadable_checkpoint_exits_2_with_one_line(
    tiny_model_dir, data_dir, finished_run, tmp_path, capsys
):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    for step in (2, 4):
        truncate(output_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json")
    code, _, err = run_train([*train_args(tiny_model_dir, data_dir, output_dir, *FLAGS), "--resume"], capsys)
    assert code == 2
    line = only_error_line(err)
    assert line.startswith(f"error: --resume: no checkpoint in {output_dir / 'checkpoints'} can be loaded")
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == [
        "broken-checkpoint-2",
        "broken-checkpoint-4",
    ]
