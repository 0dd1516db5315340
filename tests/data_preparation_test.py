"""data_preparation.py end to end: as a subprocess where the process matters, in-process where it is faster."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import QWEN_DIR, ROOT, requires_qwen_tokenizer, run_script, script_env
from transformers import AutoTokenizer

import data_preparation
from lora_summarization import data
from lora_summarization.cli import run_stage
from lora_summarization.disk_space import human_size
from lora_summarization.synthetic import make_examples, write_samsum_csvs

RECORD_FILES = [data.TRAIN_FILE, data.VALIDATION_FILE, data.TEST_FILE, data.UNIT_TEST_FILE]
SMALL = ("--test-size", "10", "--unit-test-size", "10")


def prepare(capsys, *args) -> tuple[int, str, str]:
    """Run the stage in this process, as the command line would; returns (exit code, stdout, stderr)."""
    code = run_stage(data_preparation.main, data_preparation.DataConfig, [str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def load(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def write_csvs(folder, splits: dict[str, list[dict]]):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return folder


def test_subprocess_run_is_complete_and_byte_identical_when_repeated(samsum_dir, tmp_path):
    out = tmp_path / "data"
    args = ("--source", samsum_dir, "--output-dir", out, "--no-token-stats", *SMALL)
    first = run_script("data_preparation.py", *args)
    assert first.returncode == 0, first.stderr
    files = snapshot(out)
    assert run_script("data_preparation.py", *args).returncode == 0
    assert snapshot(out) == files

    assert sorted(files) == sorted([*RECORD_FILES, data.DATA_CARD_FILE])
    card = load(out, data.DATA_CARD_FILE)
    assert card["rows_read"] == {"train": 200, "validation": 120, "test": 60}
    rows = {name: len(load(out, name)) for name in RECORD_FILES}
    assert rows == {
        data.TRAIN_FILE: 200 - card["overlap"]["removed"],
        data.VALIDATION_FILE: 110,
        data.TEST_FILE: 10,
        data.UNIT_TEST_FILE: 10,
    }
    assert {name: card["files"][name]["sha256"] for name in RECORD_FILES} == {
        name: hashlib.sha256(files[name]).hexdigest() for name in RECORD_FILES
    }
    assert card["token_lengths"] is None and card["settings"]["test_size"] == "10"
    assert "test_questions.json" in first.stdout and "Dropped rows: none" in first.stdout


def test_records_have_the_published_format_in_plain_utf8(tmp_path, capsys):
    splits = {"train": make_examples(20, seed=1), "validation": make_examples(12, seed=2), "test": make_examples(5)}
    splits["test"][0] = {
        "id": "13731370-1",
        "dialogue": "Anna: 😂 <file_photo>\nTom: & ok",
        "summary": "Anna laughs 😂.",
    }
    code, _, err = prepare(
        capsys,
        "--source",
        write_csvs(tmp_path / "src", splits),
        "--output-dir",
        tmp_path / "data",
        "--no-token-stats",
        "--test-size",
        "all",
        "--unit-test-size",
        "2",
    )
    assert code == 0, err
    raw = (tmp_path / "data" / data.TEST_FILE).read_bytes()
    assert "😂".encode() in raw and b"\\u" not in raw
    record = json.loads(raw)[0]
    assert list(record) == ["id", "instruction", "response", "dialogue", "summary"]
    assert record == {
        "id": "13731370-1",
        "instruction": "Summarize the following conversation:\n\nAnna: 😂 <file_photo>\nTom: & ok",
        "response": "Summary: Anna laughs 😂.",
        "dialogue": "Anna: 😂 <file_photo>\nTom: & ok",
        "summary": "Anna laughs 😂.",
    }


def test_original_json_export_drops_and_counts_the_empty_dialogue(tmp_path, capsys):
    source = tmp_path / "samsum"
    source.mkdir()
    for split, rows in {
        "train": make_examples(30, seed=1),
        "val": make_examples(12, seed=2),
        "test": make_examples(6),
    }.items():
        rows = [row | {"dialogue": row["dialogue"].replace("\n", "\r\n")} for row in rows]
        rows += [{"id": "13828807", "summary": "problem with visa", "dialogue": ""}] if split == "train" else []
        (source / f"{split}.json").write_text(json.dumps(rows, indent=4), encoding="utf-8")
    flags = ("--no-token-stats", "--test-size", "all", "--unit-test-size", "4")
    code, out, err = prepare(capsys, "--source", source, "--output-dir", tmp_path / "data", *flags)
    assert code == 0, err
    card = load(tmp_path / "data", data.DATA_CARD_FILE)
    assert card["rows_read"]["train"] == 31 and card["rows_dropped"]["train"] == {"dialogue empty": 1}
    assert "train 1 (dialogue empty)" in out
    train = load(tmp_path / "data", data.TRAIN_FILE)
    assert len(train) == 30 - card["overlap"]["removed"] and all("\r" not in r["instruction"] for r in train)


def overlapping_source(folder):
    """Train holds copies of 3 validation and 2 test dialogues, with other line endings, spacing and case."""
    splits = {"train": make_examples(40, seed=1), "validation": make_examples(12, seed=2), "test": make_examples(6)}
    copies = splits["validation"][:3] + splits["test"][:2]
    splits["train"] += [
        row | {"id": f"copy-{i}", "dialogue": row["dialogue"].replace("\n", " \r\n").lower()}
        for i, row in enumerate(copies)
    ]
    return write_csvs(folder, splits)


def test_train_rows_seen_in_evaluation_files_are_removed(tmp_path, capsys):
    out = tmp_path / "data"
    source = overlapping_source(tmp_path / "src")
    args = ("--source", source, "--no-token-stats", "--test-size", "all", "--unit-test-size", "4")
    assert prepare(capsys, *args, "--output-dir", out)[0] == 0
    evaluation = {data.overlap_key(r["dialogue"]) for name in RECORD_FILES[1:] for r in load(out, name)}
    train = load(out, data.TRAIN_FILE)
    assert not [r["id"] for r in train if data.overlap_key(r["dialogue"]) in evaluation]
    card = load(out, data.DATA_CARD_FILE)
    # The synthetic generator may repeat a dialogue by chance, so at least the 5 planted copies go.
    assert card["overlap"]["removed"] >= 5 and len(train) == 45 - card["overlap"]["removed"]
    assert not any(r["id"].startswith("copy-") for r in train)

    code, stdout, _ = prepare(capsys, *args, "--output-dir", tmp_path / "kept", "--keep-overlap")
    kept = load(tmp_path / "kept", data.TRAIN_FILE)
    assert code == 0 and len(kept) == 45 and "kept (--keep-overlap)" in stdout
    kept_card = load(tmp_path / "kept", data.DATA_CARD_FILE)["overlap"]
    assert kept_card["removed"] == 0 and kept_card["train_rows_overlapping"] == card["overlap"]["removed"]


def test_failed_write_leaves_the_previous_files_untouched(samsum_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "data"
    flags = ["--output-dir", out, "--no-token-stats", *SMALL]
    assert prepare(capsys, "--source", samsum_dir, *flags)[0] == 0
    before = snapshot(out)
    other_source = write_samsum_csvs(tmp_path / "other", seed=1)
    real_write_json = data.write_json
    calls = []

    def write_one_then_fail(path, payload):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        real_write_json(path, payload)

    monkeypatch.setattr(data, "write_json", write_one_then_fail)
    with pytest.raises(OSError, match="Input/output error"):
        prepare(capsys, "--source", other_source, *flags)
    assert snapshot(out) == before
    assert [path.name for path in out.parent.iterdir()] == ["data"], "the staging folder was not cleaned up"

    monkeypatch.setattr(data, "write_json", real_write_json)
    assert prepare(capsys, "--source", other_source, *flags)[0] == 0
    after = snapshot(out)
    assert all(after[name] != before[name] for name in before), "the failed run would have changed every file"


@contextmanager
def tmpfs_at(folder: Path, size: str):
    """A fresh tmpfs of `size` mounted at `folder`: another file system than its parent, as a Docker volume is."""
    folder.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_output_dir_on_another_file_system_is_written_in_place(samsum_dir, tmp_path):
    with tmpfs_at(tmp_path / "data", "4m") as out:
        result = run_script(
            "data_preparation.py", "--source", samsum_dir, "--output-dir", out, "--no-token-stats", *SMALL
        )
        assert result.returncode == 0, result.stderr
        assert sorted(snapshot(out)) == sorted([*RECORD_FILES, data.DATA_CARD_FILE])
        assert not [path.name for path in out.iterdir() if path.name.startswith(".")], "a staging folder was left"
    assert [path.name for path in tmp_path.iterdir()] == ["data"]


def test_full_disk_is_one_line_exit_1_and_leaves_the_previous_files(samsum_dir, tmp_path):
    bigger = write_samsum_csvs(tmp_path / "bigger", {"train": 2000, "validation": 120, "test": 60}, seed=1)
    with tmpfs_at(tmp_path / "data", "1m") as out:
        flags = ("--output-dir", out, "--no-token-stats", *SMALL)
        assert run_script("data_preparation.py", "--source", samsum_dir, *flags).returncode == 0
        before = snapshot(out)
        result = run_script("data_preparation.py", "--source", bigger, *flags)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
        error = result.stderr.strip()
        free = human_size(shutil.disk_usage(out).free)
        assert error.startswith(f"error: the disk holding {out} is full ({free} free,"), error
        assert "writing the data files needs about 1.3 MB" in error, error
        assert snapshot(out) == before
        assert not [path.name for path in out.iterdir() if path.name.startswith(".")], "a staging folder was left"


BAD_INPUTS = {
    # case: (files replaced in a good CSV source, None deletes one; extra flags; what the error line must say)
    "path not found": (None, [], ["nowhere not found", "--source"]),
    "no summary column": (
        {"train.csv": "id,dialogue,text\n1,A: x,x\n"},
        [],
        ["train.csv has no 'summary' column", "columns: id, dialogue, text"],
    ),
    "not utf-8": (
        {"test.csv": "id,dialogue,summary\n1,Zoë: café,x\n".encode("latin-1")},
        [],
        ["test.csv is not UTF-8"],
    ),
    "malformed json": ({"test.csv": None, "test.json": '[{"id": "1",'}, [], ["cannot read", "test.json"]),
    "corrupt parquet": ({"test.csv": None, "test.parquet": b"PAR1 nonsense"}, [], ["cannot read", "test.parquet"]),
    "no usable rows": (
        {"test.csv": 'id,dialogue,summary\n1,,x\n2," ",y\n'},
        [],
        ["test.csv has no usable rows", "dialogue blank 1, dialogue empty 1"],
    ),
    "missing split file": ({"validation.csv": None}, [], ["has no validation file", "val"]),
    "sizes too large": (
        {},
        ["--test-size", "7", "--unit-test-size", "12"],
        ["--test-size 7 is more than the 6 usable test rows", "--unit-test-size 12 leaves no rows"],
    ),
    "bad flags": (
        {},
        ["--test-size", "ten", "--unit-test-size", "0"],
        ["--test-size must be a positive whole number or 'all', not 'ten'", "--unit-test-size must be at least 1"],
    ),
}


def broken_source(folder, changes: dict[str, str | bytes | None]):
    write_csvs(
        folder, {"train": make_examples(20, seed=1), "validation": make_examples(12, seed=2), "test": make_examples(6)}
    )
    for name, content in changes.items():
        (folder / name).unlink(missing_ok=True)
        if isinstance(content, str):
            (folder / name).write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    changes, flags, expected = BAD_INPUTS[case]
    source = tmp_path / "nowhere" if changes is None else broken_source(tmp_path / "src", changes)
    out = tmp_path / "data"
    code, _, stderr = prepare(capsys, "--source", source, "--output-dir", out, "--no-token-stats", *flags)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert all(text in stderr for text in expected), stderr
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, stderr = prepare(capsys, "--source", tmp_path / "nowhere", "--no-token-stats", "--debug")
    assert code == 2 and "Traceback" in stderr and stderr.rstrip().endswith("a Hub dataset id")


def test_subprocess_hub_unreachable_names_the_local_flags(tmp_path):
    result = run_script("data_preparation.py", "--source", "someone/samsum-copy", "--output-dir", tmp_path / "data")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert "cannot load the dataset 'someone/samsum-copy' from the Hugging Face Hub" in error
    assert "--source with a local copy" in error and "--model" in error


def open_files(pid: int) -> set[str]:
    targets = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            targets.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return targets


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see when the source is read")
def test_ctrl_c_exits_130_with_one_line_and_leaves_the_data_folder_as_it_was(tmp_path):
    source = write_samsum_csvs(tmp_path / "big", {"train": 50_000, "validation": 200, "test": 100})
    out = tmp_path / "data"
    out.mkdir()
    (out / data.TRAIN_FILE).write_text("[]", encoding="utf-8")
    command = [sys.executable, str(ROOT / "data_preparation.py"), "--source", str(source), "--output-dir", str(out)]
    process = subprocess.Popen(
        [*command, "--no-token-stats", *SMALL],
        cwd=ROOT,
        env=script_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    train_csv = str(source / "train.csv")
    while train_csv not in open_files(process.pid) and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # while it reads the source; cleaning 50,000 rows takes a while longer
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.startswith("interrupted") and stderr.count("\n") == 1, stderr
    assert snapshot(out) == {data.TRAIN_FILE: b"[]"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "data"], "a staging folder was left behind"


@requires_qwen_tokenizer
def test_real_tokenizer_formatting_and_token_statistics(samsum_dir, tmp_path):
    out = tmp_path / "data"
    args = ["--source", samsum_dir, "--output-dir", out, "--model", QWEN_DIR, "--max-length", "100", *SMALL]
    result = run_script("data_preparation.py", *args)
    assert result.returncode == 0, result.stderr
    assert "Measuring token lengths" in result.stderr and "over --max-length 100" in result.stdout

    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    record = load(out, data.TEST_FILE)[0]
    chat = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["response"]}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nSummarize the following conversation:\n\n{record['dialogue']}<|im_end|>\n"
        f"<|im_start|>assistant\nSummary: {record['summary']}<|im_end|>\n"
    )

    def lengths(record) -> tuple[int, int]:
        user = [{"role": "user", "content": record["instruction"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        response = record["response"] + "<|im_end|>"
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), len(
            tokenizer(response, add_special_tokens=False)["input_ids"]
        )

    stats = load(out, data.DATA_CARD_FILE)["token_lengths"]
    for name in RECORD_FILES:
        measured = [lengths(r) for r in load(out, name)]
        totals = [prompt + response for prompt, response in measured]
        assert stats[name]["prompt"]["max"] == max(prompt for prompt, _ in measured)
        assert stats[name]["response"]["max"] == max(response for _, response in measured)
        assert stats[name]["total"]["max"] == max(totals)
        assert stats[name]["over_max_length"] == stats[name]["dialogue_shortened"] == sum(t > 100 for t in totals)
    assert stats[data.TRAIN_FILE]["over_max_length"] > 0
