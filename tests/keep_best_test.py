"""train.py --keep-best: the adapter is the checkpoint with the lowest validation content loss, kept by rotation
and across --resume; evaluate.py scores a run's checkpoints side by side, with the settings of their run."""

import json
import shutil

import pytest
from conftest import load_script, run_in_process

from lora_summarization.cli import run_stage

# A learning rate that grows by 0.03 a step (a warm-up longer than the run): the validation loss falls while it is
# small, the same on every CPU, and wanders once it is far too high, so the best checkpoint is usually an early one
# and not the last. Which step is best depends on the CPU's floating-point path: the tests read it from the log.
# Checkpoints every 2 steps, 2 kept.
STEPS, EVERY = 12, 2
ZIGZAG = (
    *("--max-steps", STEPS, "--eval-steps", EVERY, "--save-steps", EVERY, "--save-total-limit", 2),
    *("--learning-rate", "30", "--lr-scheduler", "linear", "--warmup-steps", "1000", "--batch-size", "4"),
    *("--grad-accum", "2", "--eval-examples", "8", "--logging-steps", EVERY, "--report-to", "none"),
    *("--max-length", "480", "--keep-best"),
)


def keep_best_args(model_dir, data_dir, output_dir, *extra) -> list:
    return ["--model", model_dir, "--data-dir", data_dir, "--output-dir", output_dir, *ZIGZAG, *extra]


@pytest.fixture(scope="session")
def keep_best_run(tmp_path_factory, tiny_model_dir, data_dir):
    output_dir = tmp_path_factory.mktemp("keep-best") / "run"
    result = run_in_process("train.py", *keep_best_args(tiny_model_dir, data_dir, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def content_losses(output_dir) -> dict[int, float]:
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return {entry["step"]: entry["eval_content_loss"] for entry in log if "eval_content_loss" in entry}


def weights_bytes(folder) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def best_logged_step(output_dir) -> int:
    """The step of the lowest validation content loss in train_log.jsonl (the earliest of equal ones, as the
    Trainer keeps the first)."""
    losses = content_losses(output_dir)
    return min(losses, key=lambda step: (losses[step], step))


def assert_kept_best(output_dir, best_step: int) -> None:
    """Rotation kept the best checkpoint and the last, and the adapter is the best one's weights."""
    checkpoints = output_dir / "checkpoints"
    assert {int(path.name.removeprefix("checkpoint-")) for path in checkpoints.iterdir()} == {best_step, STEPS}
    assert weights_bytes(output_dir) == weights_bytes(checkpoints / f"checkpoint-{best_step}")
    if best_step != STEPS:
        assert weights_bytes(output_dir) != weights_bytes(checkpoints / f"checkpoint-{STEPS}")


def test_the_adapter_is_the_best_checkpoint_bit_for_bit_and_rotation_keeps_it(keep_best_run):
    output_dir, stdout = keep_best_run
    losses = content_losses(output_dir)
    best_step = best_logged_step(output_dir)
    assert sorted(losses) == list(range(EVERY, STEPS + 1, EVERY))
    assert_kept_best(output_dir, best_step)
    best = json.loads((output_dir / "training_summary.json").read_text())["kept_best"]
    assert best["step"] == best_step and best["validation_content_loss"] == losses[best_step]
    assert (best["last_evaluated_step"], best["last_validation_content_loss"]) == (STEPS, losses[STEPS])
    assert best["checkpoint"] == str(output_dir / "checkpoints" / f"checkpoint-{best_step}")
    state = json.loads((output_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == best["checkpoint"]  # the final folder, not the staging one
    assert (
        f"--keep-best: the adapter is {best['checkpoint']} (step {best_step}, validation content loss "
        f"{losses[best_step]:.4f}; the last evaluation, at step {STEPS}, had {losses[STEPS]:.4f})"
    ) in stdout
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert f"| adapter (--keep-best) | checkpoint of step {best_step}, validation content loss" in card


def test_a_resumed_run_keeps_the_best_checkpoint_of_the_steps_before_it(
    keep_best_run, tiny_model_dir, data_dir, tmp_path
):
    finished, _ = keep_best_run
    output_dir = tmp_path / "run"
    shutil.copytree(finished, output_dir)
    best_step = json.loads((finished / "training_summary.json").read_text())["kept_best"]["step"]
    # The best checkpoint becomes the latest: the resumed run retrains the last steps, none of them better.
    shutil.rmtree(output_dir / "checkpoints" / f"checkpoint-{STEPS}")
    for stale in ("adapter_model.safetensors", "training_summary.json"):
        (output_dir / stale).unlink()
    result = run_in_process("train.py", *keep_best_args(tiny_model_dir, data_dir, output_dir, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_kept_best(output_dir, best_step)
    assert weights_bytes(output_dir) == weights_bytes(finished)
    assert json.loads((output_dir / "training_summary.json").read_text())["kept_best"]["step"] == best_step


def test_keep_best_needs_checkpoints_at_evaluation_steps(tiny_model_dir, data_dir, tmp_path, capsys):
    train = load_script("train.py")
    argv = keep_best_args(tiny_model_dir, data_dir, tmp_path / "run", "--save-steps", "3")
    assert run_stage(train.main, train.TrainConfig, [str(arg) for arg in argv]) == 2
    assert capsys.readouterr().err == (
        "error: --keep-best chooses among checkpoints by their validation loss, so --save-steps (3) must be a "
        "multiple of --eval-steps (2)\n"
    )
    assert not (tmp_path / "run").exists()


def test_evaluate_scores_checkpoints_of_one_run_with_the_settings_they_were_trained_with(
    keep_best_run, tiny_model_dir, data_dir, tmp_path
):
    output_dir, _ = keep_best_run
    checkpoints = sorted((output_dir / "checkpoints").iterdir())
    flags = ("--data-dir", data_dir, "--output-dir", tmp_path, "--max-examples", "4", "--no-generate")
    result = run_in_process("evaluate.py", "--model", tiny_model_dir, "--adapter", *checkpoints, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    rows = [f"{output_dir.name}/{checkpoint.name}" for checkpoint in checkpoints]
    assert sorted(results["models"]) == sorted(["base", *rows])
    assert results["settings"]["max_length"] == 480  # from the checkpoints' resume_settings.json, not the default
    losses = [results["models"][row]["loss"] for row in rows]
    assert losses[0] != losses[1]
