"""A really full disk (a small tmpfs) under every writer: one line, exit 1, nothing half-written left behind."""

import errno
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING_FLAGS, run_in_process
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from train_test import only_error_line, run_train, train_args

from lora_summarization import export, run_folder, run_lock, training
from lora_summarization.cli import run_stage
from lora_summarization.disk_space import folder_size, human_size, is_disk_full

PAGE = 4096  # tmpfs charges every file in whole pages
QUIET = ("--eval-steps", "1000", "--logging-steps", "1", "--report-to", "none", *TINY_TRAINING_FLAGS)


def footprint(folder: Path) -> int:
    """Bytes that the files under `folder` take on a tmpfs."""
    return sum(math.ceil(path.stat().st_size / PAGE) * PAGE for path in folder.rglob("*") if path.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> an empty folder on a tmpfs of `size` bytes; skipped where mounting is not permitted."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip() or 'not root'}")
        mounted.append(folder)
        return folder

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a failed writer may hold a file open


@pytest.fixture(scope="session")
def two_step_run(tiny_model_dir, data_dir, tmp_path_factory) -> Path:
    """A 2-step run on the ordinary disk, to measure what its checkpoint and its final outputs take."""
    output_dir = tmp_path_factory.mktemp("measured")
    result = run_in_process("train.py", *train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "2", *QUIET))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def assert_checkpoint_loads(checkpoint: Path) -> None:
    assert load_file(checkpoint / "adapter_model.safetensors")
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(checkpoint.name[11:])


def assert_nothing_half_written(output_dir: Path) -> None:
    assert not (output_dir / "checkpoints" / training.CHECKPOINT_STAGING).exists()
    assert not (output_dir / run_folder.FINAL_STAGING).exists()
    assert not (output_dir / "adapter_config.json").exists()
    assert not (output_dir / run_lock.LOCK_FILE).exists()


def test_a_full_disk_at_the_second_checkpoint_keeps_the_first(
    tiny_model_dir, data_dir, two_step_run, small_tmpfs, capsys
):
    checkpoint = footprint(two_step_run / "checkpoints" / "checkpoint-2")
    output_dir = small_tmpfs(checkpoint * 3 // 2) / "out"  # room for one checkpoint and the logs, not for two
    argv = train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "4", "--save-steps", "2", *QUIET)
    code, _, err = run_train(argv, capsys)
    assert code == 1
    line = only_error_line(err)
    assert line.startswith(f"error: the disk holding {output_dir / 'checkpoints'} is full (")
    assert f"a checkpoint needs about {human_size(folder_size(two_step_run / 'checkpoints' / 'checkpoint-2'))}" in line
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert_checkpoint_loads(output_dir / "checkpoints" / "checkpoint-2")
    assert_nothing_half_written(output_dir)


def test_a_full_disk_in_the_final_save_leaves_no_adapter_but_the_checkpoint(
    tiny_model_dir, data_dir, two_step_run, small_tmpfs, capsys
):
    checkpoint = footprint(two_step_run / "checkpoints" / "checkpoint-2")
    final_outputs = footprint(two_step_run) - footprint(two_step_run / "checkpoints")
    output_dir = small_tmpfs(checkpoint + final_outputs // 2) / "out"
    code, _, err = run_train(train_args(tiny_model_dir, data_dir, output_dir, "--max-steps", "2", *QUIET), capsys)
    assert code == 1
    line = only_error_line(err)
    assert line.startswith(f"error: the disk holding {output_dir} is full (") and "the adapter needs about" in line
    assert_checkpoint_loads(output_dir / "checkpoints" / "checkpoint-2")
    assert_nothing_half_written(output_dir)
    assert not list(output_dir.glob("tokenizer*")) and not (output_dir / "adapter_model.safetensors").exists()


def raised(write) -> BaseException:
    with pytest.raises(BaseException) as caught:
        write()
    return caught.value


def test_every_writers_own_full_disk_error_is_recognised(small_tmpfs):
    folder = small_tmpfs(64 * 1024)
    tensors = {"weight": torch.zeros(100_000)}
    torch_error = raised(lambda: torch.save(tensors, str(folder / "optimizer.pt")))
    assert isinstance(torch_error, RuntimeError) and is_disk_full(torch_error, folder)
    assert not is_disk_full(torch_error, folder.parent)  # torch's message has no errno: only a disk with no room left
    (folder / "optimizer.pt").unlink()
    safetensors_error = raised(lambda: save_file(tensors, folder / "adapter_model.safetensors"))
    assert isinstance(safetensors_error, SafetensorError) and is_disk_full(safetensors_error, folder)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped) and is_disk_full(Exception("No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_an_export_onto_a_full_disk_exits_1_with_one_line(tiny_model_dir, two_step_run, small_tmpfs, capsys):
    output_dir = small_tmpfs(1_000_000) / "merged"  # the tiny merged model alone is ~20 MB in bf16
    argv = ["--model", tiny_model_dir, "--adapter", two_step_run, "--output-dir", output_dir]
    code = run_stage(export.main, export.ExportConfig, [str(arg) for arg in argv])
    line = only_error_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith(f"error: the disk holding {output_dir} is full (") and "the merged model needs about" in line
