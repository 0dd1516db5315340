"""python -m lora_summarization.summarize: the summaries evaluate.py scores, for a user's own dialogues."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from conftest import load_script

from lora_summarization import data, summarize
from lora_summarization.cli import run_stage

EXAMPLES = 4
SYSTEM_PROMPT = "Be brief."


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, trained_adapter_dir):
    """The trained adapter, recorded as trained with a system prompt that both tools must then use."""
    folder = shutil.copytree(
        trained_adapter_dir, tmp_path_factory.mktemp("adapter") / "a", ignore=shutil.ignore_patterns("checkpoints")
    )
    summary = json.loads((folder / "training_summary.json").read_text())
    summary["settings"]["system_prompt"] = SYSTEM_PROMPT
    (folder / "training_summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, tiny_model_dir, adapter, data_dir) -> list[dict]:
    """evaluate.py's prediction lines for the first test examples."""
    evaluate_script = load_script("evaluate.py")
    output_dir = tmp_path_factory.mktemp("evaluation")
    argv = ["--model", tiny_model_dir, "--adapter", adapter, "--data-dir", data_dir, "--output-dir", output_dir]
    argv += ["--max-examples", EXAMPLES, "--max-new-tokens", "16", "--no-published-loss"]
    assert run_stage(evaluate_script.main, evaluate_script.EvalConfig, [str(arg) for arg in argv]) == 0
    results = json.loads((output_dir / "evaluation_results.json").read_text())
    assert results["settings"]["system_prompt"] == SYSTEM_PROMPT
    return [json.loads(line) for line in (output_dir / "evaluation_predictions.jsonl").read_text().splitlines()]


def run_summarize(capsys, *argv) -> tuple[int, str, str]:
    code = run_stage(summarize.main, summarize.SummarizeConfig, summarize.with_inputs_flag([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_jsonl_dialogues_get_exactly_the_summaries_evaluate_scored(capsys, tmp_path, adapter, evaluated):
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text(
        "".join(json.dumps({"id": line["id"], "dialogue": line["dialogue"]}) + "\n" for line in evaluated)
    )
    # No --model: the base named in the adapter; no --system-prompt: the one it was trained with.
    code, out, err = run_summarize(capsys, "--adapter", adapter, dialogues, "--max-new-tokens", "16")
    assert code == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert printed == [{"id": line["id"], "summary": line["fine_tuned"]["prediction"]} for line in evaluated]


def test_a_text_file_or_standard_input_prints_the_summary(capsys, monkeypatch, tmp_path, adapter, evaluated):
    dialogue = evaluated[0]["dialogue"]
    (tmp_path / "dialogue.txt").write_text(dialogue + "\n", encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(dialogue))
    flags = ("--adapter", adapter, "--max-new-tokens", "16")
    code, out, err = run_summarize(capsys, *flags, tmp_path / "dialogue.txt", "-")
    assert code == 0, err
    assert out == (evaluated[0]["fine_tuned"]["prediction"] + "\n") * 2  # a summary may hold line breaks


def test_bare_file_arguments_become_inputs_and_unknown_flags_stay_refused():
    argv = ["--adapter", "a.txt", "dialogue.txt", "-", "--max-new-tokens", "8", "a.txt"]
    assert summarize.with_inputs_flag(argv) == [
        *("--adapter", "a.txt", "--max-new-tokens", "8"),
        *("--inputs", "dialogue.txt", "-", "a.txt"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_stage(summarize.main, summarize.SummarizeConfig, summarize.with_inputs_flag(["--bogus", "d.txt"]))
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no dialogue given"),
        ('{"id": "1"}\n', 'line 1 needs the text field "dialogue"'),
        ("{not json\n", "line 1 is not valid JSON"),
        ('{"dialogue": "  "}\n', "line 1 holds no dialogue"),
    ],
)
def test_bad_inputs_are_refused_in_one_line(capsys, tmp_path, adapter, content, expected):
    inputs = []
    if content is not None:
        (tmp_path / "dialogues.jsonl").write_text(content, encoding="utf-8")
        inputs = [tmp_path / "dialogues.jsonl"]
    code, _, err = run_summarize(capsys, "--adapter", adapter, *inputs)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and expected in err


def test_missing_file_and_missing_adapter_are_refused(capsys, tmp_path, adapter, data_dir):
    code, _, err = run_summarize(capsys, "--adapter", adapter, tmp_path / "nowhere.txt")
    assert code == 2 and f"{tmp_path / 'nowhere.txt'} not found" in err
    dialogue = data_dir / data.TEST_FILE  # any existing file: the adapter check comes before reading it
    code, _, err = run_summarize(capsys, "--adapter", tmp_path / "no_adapter", dialogue)
    assert code == 2 and "adapter folder" in err and "not found" in err
