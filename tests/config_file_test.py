"""--config FILE: every stage reads its fields from YAML or JSON, flags on the command line win, and a file with
an unknown field or a bad value is refused like a bad flag."""

import json

import pytest
from conftest import STAGE_CONFIGS, load_script
from data_preparation_test import RECORD_FILES, SMALL, load, prepare

from lora_summarization.cli import parse_config


def stage_config(script: str):
    return getattr(load_script(script), STAGE_CONFIGS[script])


@pytest.mark.parametrize("script", list(STAGE_CONFIGS))
def test_every_stage_takes_its_fields_from_a_yaml_or_json_file_and_flags_win(script, tmp_path):
    config_class = stage_config(script)
    defaults = parse_config(config_class, [])
    values = {"seed": 7, "model": "some/model", "debug": True}
    (tmp_path / "config.yaml").write_text("".join(f"{name}: {json.dumps(value)}\n" for name, value in values.items()))
    (tmp_path / "config.json").write_text(json.dumps(values))
    for name in ("config.yaml", "config.json"):
        config = parse_config(config_class, ["--config", str(tmp_path / name), "--model", "from/flag"])
        assert (config.seed, config.model, config.debug) == (7, "from/flag", True), name
        assert config.output_dir == defaults.output_dir  # fields the file leaves out keep their defaults


def test_train_values_are_parsed_with_their_fields_types(tmp_path):
    config_file = tmp_path / "train.yaml"
    # YAML 1.1 reads 5e-5 as text and `null` as None: each value is parsed as its flag's would be.
    config_file.write_text("learning_rate: 5e-5\nlora_r: 4\nuse_dora: true\nsystem_prompt: null\nepochs: 1\n")
    config = parse_config(stage_config("train.py"), ["--config", str(config_file)])
    assert (config.learning_rate, config.lora_r, config.use_dora, config.system_prompt) == (5e-5, 4, True, None)
    assert isinstance(config.epochs, float)


def test_evaluate_takes_lists_from_a_config_file(tmp_path):
    config_file = tmp_path / "evaluate.json"
    config_file.write_text(json.dumps({"adapter": ["run_a", "run_b"], "max_examples": 5}))
    config = parse_config(stage_config("evaluate.py"), ["--config", str(config_file)])
    assert (config.adapter, config.max_examples) == (["run_a", "run_b"], 5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_r: 4\nlearning_rte: 1e-4\n", "has unknown fields: learning_rte"),
        ("lora_r: four\n", "argument --lora_r/--lora-r: invalid int value: 'four'"),
        ("- lora_r\n", "must hold a mapping of field names to values"),
        ("lora_r: [4\n", "cannot be read"),
    ],
)
def test_a_bad_config_file_exits_2_naming_the_problem(tmp_path, capsys, text, message):
    config_file = tmp_path / "train.yaml"
    config_file.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        parse_config(stage_config("train.py"), ["--config", str(config_file)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_data_preparation_runs_from_a_config_file(samsum_dir, tmp_path, capsys):
    out = tmp_path / "data"
    config_file = tmp_path / "data.yaml"
    config_file.write_text(f"source: {samsum_dir}\noutput_dir: {tmp_path / 'elsewhere'}\nno_token_stats: true\n")
    code, _, err = prepare(capsys, "--config", config_file, "--output-dir", out, *SMALL)
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir() if path.name in RECORD_FILES) == sorted(RECORD_FILES)
    assert load(out, "data_card.json")["settings"]["no_token_stats"] is True
    assert not (tmp_path / "elsewhere").exists()
