"""study.py on this machine: a 2 x 2 study end to end, rerun, grown by a seed and a failing value; bad input; the
GPU slots for 1, 2 and 4 GPUs and the processes that get them; SIGTERM passed on to the running runs."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest
from conftest import run_in_process

from lora_summarization import launchers
from lora_summarization.study import Run

# The same tiny schedule as TINY_TRAINING_FLAGS, as study settings; two learning rates x two seeds.
TINY = ("max_steps=4", "save_steps=2", "eval_steps=1000", "logging_steps=1", "warmup_steps=0")
TINY += ("batch_size=4", "grad_accum=2", "learning_rate=1e-2,5e-3")
EVALUATION = ("--max-examples", "4", "--max-new-tokens", "4")
RUNS = [f"learning_rate={rate}_seed{seed}" for rate in ("0.01", "0.005") for seed in (42, 43)]


def study_args(model_dir, data_dir, study_dir, *settings) -> list[str]:
    return [f"model={model_dir}", f"data_dir={data_dir}", *TINY, *settings, "--output-dir", study_dir, *EVALUATION]


def evaluated_runs(study_dir) -> list[str]:
    results = json.loads((study_dir / "evaluation" / "evaluation_results.json").read_text())
    return sorted(results["adapters"])


def log_headers(study_dir, name: str) -> list[str]:
    return [line for line in (study_dir / "runs" / f"{name}.log").read_text().splitlines() if line.startswith("# ")]


def adapter_times(study_dir, names: list[str]) -> dict[str, int]:
    return {name: (study_dir / "runs" / name / "adapter_model.safetensors").stat().st_mtime_ns for name in names}


@pytest.fixture(scope="module")
def local_study(tiny_model_dir, data_dir, tmp_path_factory):
    """The 2 x 2 study on two (pretended) GPUs: on this CPU each run gets CUDA_VISIBLE_DEVICES=0 or 1 and trains on
    the CPU, two at a time."""
    study_dir = tmp_path_factory.mktemp("study") / "lr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        started = time.perf_counter()
        result = run_in_process("study.py", "seed=42,43", *study_args(tiny_model_dir, data_dir, study_dir))
        print(f"\n2 x 2 tiny study on this machine: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stderr + result.stdout
    return study_dir


def test_a_2x2_study_trains_each_run_on_its_own_gpu_and_reports_one_evaluation_of_all(local_study):
    assert sorted(path.name for path in (local_study / "runs").iterdir() if path.is_dir()) == sorted(RUNS)
    assert evaluated_runs(local_study) == sorted(RUNS)
    devices = {name: log_headers(local_study, name)[0].split()[3] for name in RUNS}
    assert set(devices.values()) == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    study = json.loads((local_study / "study.json").read_text())
    assert study["grid"] == {"learning_rate": [0.01, 0.005]} and study["seeds"] == [42, 43]
    assert study["fixed"]["max_steps"] == 4 and study["launcher"]["name"] == "local"
    report = (local_study / "report.md").read_text()
    assert "4 runs: 4 finished" in report
    for arm in ("learning_rate=0.01", "learning_rate=0.005"):
        assert any(line.startswith(arm) and "42,43" in line and "+-" in line for line in report.splitlines())
    assert "learning_rate=0.005 minus learning_rate=0.01" in report
    assert "![" in report and (local_study / "evaluation" / "evaluation_chart.png").exists()


def test_rerunning_the_study_trains_and_evaluates_nothing_and_a_changed_fixed_setting_is_refused(
    local_study, tiny_model_dir, data_dir
):
    results = local_study / "evaluation" / "evaluation_results.json"
    before = results.stat().st_mtime_ns, [log_headers(local_study, name) for name in RUNS]
    again = run_in_process("study.py", "seed=42,43", *study_args(tiny_model_dir, data_dir, local_study))
    assert again.returncode == 0, again.stderr
    assert "0 of 4 runs to train" in again.stdout
    assert (results.stat().st_mtime_ns, [log_headers(local_study, name) for name in RUNS]) == before
    changed = run_in_process("study.py", *study_args(tiny_model_dir, data_dir, local_study, "max_steps=5"))
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1
    assert "max_steps: the study has 4, this command 5" in changed.stderr
    status = run_in_process("study.py", "--output-dir", local_study, "--status")
    assert [line.split(": ")[1] for line in status.stdout.splitlines()[:4]] == ["finished"] * 4
    assert f"report: {local_study / 'report.md'}" in status.stdout


def test_an_added_seed_and_a_failing_value_train_only_the_new_runs_and_the_failures_are_reported(
    local_study, tiny_model_dir, data_dir, tmp_path
):
    """Runs after the two tests above: the study grows by seed 44 and by a learning rate train.py refuses."""
    finished_before = adapter_times(local_study, RUNS)
    args = study_args(tiny_model_dir, data_dir, local_study, "learning_rate=1e-2,5e-3,-1")
    grown = run_in_process("study.py", "seed=42,43,44", *args)
    assert grown.returncode == 1, grown.stderr
    assert "5 of 9 runs to train" in grown.stdout
    failed = [f"learning_rate=-1.0_seed{seed}" for seed in (42, 43, 44)]
    for name in failed:
        assert f"failed: {name}: failed" in grown.stderr and "--learning-rate must not be negative" in grown.stderr
    new = ["learning_rate=0.01_seed44", "learning_rate=0.005_seed44"]
    assert evaluated_runs(local_study) == sorted(RUNS + new)
    assert adapter_times(local_study, RUNS) == finished_before
    report = (local_study / "report.md").read_text()
    assert "## Failed runs" in report and all(name in report for name in failed)
    assert any(line.startswith("learning_rate=0.01 ") and "42,43,44" in line for line in report.splitlines())


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (["learning_rat=1e-4"], "learning_rat is not a train.py setting"),
        (["output_dir=elsewhere"], "output_dir is set by the study"),
        (["lora-r=8,eight"], "lora-r=8,eight: each value must be a number (int)"),
        (["use_dora=maybe"], "use_dora=maybe: each value must be true or false"),
        (["model=a,b"], "model takes one value"),
        (["learning_rate"], "settings are FIELD=V1,V2"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_them(settings, named, tmp_path):
    result = run_in_process("study.py", *settings, "--output-dir", tmp_path / "study")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr
    assert not (tmp_path / "study").exists()


def test_settings_come_from_a_config_file_and_the_command_line_wins(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(
        "learning_rate: [1e-4, 2e-4]\ntarget_modules: ['q_proj,v_proj', all-linear]\nseed: 7\nmax_examples: 3\n"
    )
    result = run_in_process("study.py", "--config", config, "seed=8,9", "--output-dir", tmp_path / "s", "--status")
    assert result.returncode == 0, result.stderr
    assert "learning_rate=0.0002_target_modules=q_proj-v_proj_seed9: not started" in result.stdout
    assert len(result.stdout.splitlines()) == 2 * 2 * 2 + 1 and "seed7" not in result.stdout
    assert not (tmp_path / "s").exists()  # --status changes nothing


@pytest.mark.parametrize(
    ("devices", "per_run", "slots"),
    [
        ([], 1, [None]),
        (["0"], 1, ["0"]),
        (["0", "1"], 1, ["0", "1"]),
        (["0", "1", "2", "3"], 1, ["0", "1", "2", "3"]),
        (["0", "1", "2", "3"], 2, ["0,1", "2,3"]),
        (["GPU-a", "GPU-b"], 0, [None]),
    ],
)
def test_each_run_that_trains_at_once_gets_gpus_of_its_own(devices, per_run, slots):
    assert launchers.device_slots(devices, per_run) == slots


def test_visible_gpus_are_read_as_cuda_reads_them(monkeypatch):
    for listed, devices in [("0,1", ["0", "1"]), ("2, 3,-1,4", ["2", "3"]), ("", [])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        assert launchers.visible_devices() == devices


PRINT_DEVICE_AND_SPAN = (
    "import os, time; start = time.time(); time.sleep(0.3)\n"
    "print(os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu'), start, time.time())"
)


def fake_runs(tmp_path, count: int) -> list[Run]:
    return [Run(tmp_path, {}, seed, {}) for seed in range(count)]


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_the_processes_started_see_only_their_gpu_and_as_many_run_at_once_as_there_are_gpus(gpus, tmp_path):
    runs = fake_runs(tmp_path, 6)
    slots = launchers.device_slots([str(index) for index in range(gpus)], 1)
    command = lambda run, slot: [sys.executable, "-c", PRINT_DEVICE_AND_SPAN]  # noqa: E731
    assert launchers.run_locally(runs, slots, command) == 0
    spans = []
    for run in runs:
        header, *_, last = run.log.read_text().splitlines()
        device, start, end = last.split()
        assert header.split()[3] == f"CUDA_VISIBLE_DEVICES={device}"
        spans.append((device, float(start), float(end)))
    assert {device for device, _, _ in spans} == set(slots)
    for _, start, end in spans:
        at_once = [other for other in spans if other[1] < end and start < other[2]]
        assert len(at_once) <= gpus and len({other[0] for other in at_once}) == len(at_once)
    assert gpus == 1 or max(sum(o[1] < e and s < o[2] for o in spans) for _, s, e in spans) > 1


SIGTERM_RECORDED = (
    "import signal, sys, time; from pathlib import Path\n"
    "signal.signal(signal.SIGTERM, lambda *_: (Path(sys.argv[1]).write_text('checkpointed'), sys.exit(143)))\n"
    "Path(sys.argv[1] + '.started').write_text(''); time.sleep(60)"
)


def test_sigterm_to_the_launcher_stops_the_running_runs_with_sigterm_and_starts_no_other(tmp_path):
    runs = fake_runs(tmp_path, 3)
    marker = lambda run: tmp_path / f"{run.name}.marker"  # noqa: E731
    command = lambda run, slot: [sys.executable, "-c", SIGTERM_RECORDED, str(marker(run))]  # noqa: E731

    def terminate_once_both_run():
        while not all(marker(run).with_suffix(".marker.started").exists() for run in runs[:2]):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_both_run, daemon=True).start()
    assert launchers.run_locally(runs, ["0", "1"], command) == 143
    assert [marker(run).read_text() for run in runs[:2]] == ["checkpointed"] * 2
    assert not marker(runs[2]).with_suffix(".marker.started").exists()
