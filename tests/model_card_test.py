"""lora_summarization.model_card: the card written after training, and the metrics evaluation adds to it."""

from __future__ import annotations

import re

import numpy as np
import pytest
from huggingface_hub import ModelCard
from peft import PeftModel

from lora_summarization import modeling
from lora_summarization.evaluation import ROUGE_TYPES, ModelScores, compare_models, save_generation_config
from lora_summarization.model_card import CARD_FILE, NOT_EVALUATED, add_evaluation, write_model_card
from lora_summarization.prompts import INSTRUCTION

SETTINGS = {
    "model": "Qwen/Qwen2.5-1.5B-Instruct",
    "data_dir": "data",
    "output_dir": "fine_tuned_model",
    "epochs": 3,
    "max_length": 512,
    "learning_rate": 5e-05,
    "lora_r": 8,
    "lora_alpha": 16,
    "target_modules": "q_proj,k_proj,v_proj,o_proj",
    "precision": "fp32",
    "system_prompt": None,
}
SUMMARY = {
    "examples": 14_690,
    "dialogues_shortened": 262,
    "effective_batch": 8,
    "processes": 1,
    "optimizer_steps": 5_509,
    "trainable_parameters": 1_089_536,
    "base_parameters": 1_543_714_304,
    "precision": "fp32",
    "device": "cuda",
    "tokens_trained_on": 9_123_456,
    "runtime_seconds": 5_123.4,
    "first_train_loss": 2.4137,
    "last_train_loss": 1.3208,
    "first_validation_loss": 1.9012,
    "last_validation_loss": 1.4105,
    "settings": SETTINGS,
}


def results(gain: float = 0.2, rouge: bool = True) -> dict:
    """What evaluate.py writes, built with evaluation's own types: two examples, constant differences."""
    base_rouge = {name: np.array([0.3, 0.4]) for name in ROUGE_TYPES} if rouge else None
    tuned_rouge = {name: scores + gain for name, scores in base_rouge.items()} if rouge else None
    tokens, content_tokens = np.array([10, 30]), np.array([8, 24])
    base = ModelScores(np.array([2.0, 3.0]), tokens, np.array([2.5, 3.5]), content_tokens, rouge=base_rouge)
    tuned = ModelScores(np.array([1.0, 2.0]), tokens, np.array([0.5, 1.5]), content_tokens, rouge=tuned_rouge)
    differences = compare_models(base, tuned, samples=50, seed=0)
    return {"n": 2, "base": base.summary(), "fine_tuned": tuned.summary(), "difference": differences}


def card_text(folder) -> str:
    return (folder / CARD_FILE).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    match = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no '## {heading}' section"
    return match[1]


def test_card_metadata_is_read_by_huggingface_hub(tmp_path):
    card = ModelCard.load(write_model_card(tmp_path, SUMMARY))
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert card.data.library_name == "peft"
    assert set(card.data.tags) >= {"lora", "summarization", "samsum"}
    assert card.data.datasets == ["knkarthick/samsum"]
    assert card.data.license == "cc-by-nc-nd-4.0"
    assert "CC BY-NC-ND 4.0" in section(card.text, "License")


def test_a_local_base_model_folder_is_named_in_the_text_but_not_in_the_metadata(tmp_path, tiny_model_dir):
    summary = {**SUMMARY, "settings": {**SETTINGS, "model": str(tiny_model_dir)}}
    card = ModelCard.load(write_model_card(tmp_path, summary))
    assert card.data.base_model is None  # the Hub rejects a path as base_model
    assert f"`{tiny_model_dir}`" in card.text


def test_card_shows_the_training_numbers_every_setting_and_no_evaluation_yet(tmp_path):
    text = card_text(write_model_card(tmp_path, SUMMARY).parent)
    training = section(text, "Training")
    for fact in ("| examples | 14,690 |", "| optimizer steps | 5,509 |", "| tokens trained on | 9,123,456 |"):
        assert fact in training
    assert "| runtime | 85.4 min |" in training
    assert "| train loss (first, last) | 2.4137, 1.3208 |" in training
    assert "| validation loss (first, last) | 1.9012, 1.4105 |" in training
    assert "| trainable parameters | 1,089,536 of 1,543,714,304 (0.07%) |" in training
    assert "| device | cuda × 1 |" in training and "| precision | fp32 |" in training
    for key, value in SETTINGS.items():
        assert f"| `--{key.replace('_', '-')}` | `{value}` |" in training
    assert "262 dialogues were shortened" in section(text, "Data")
    assert "the `Summary:` prefix, the summary and the closing `<|im_end|>` token" in section(text, "Data")
    assert section(text, "Evaluation").strip() == NOT_EVALUATED


@pytest.fixture
def adapter_dir(tiny_model_dir, tokenizer, tmp_path):
    """An adapter folder as train.py leaves it: PEFT's own README.md, the adapter and the tokenizer."""
    folder = tmp_path / "adapter"
    modeling.apply_lora(modeling.load_base_model(str(tiny_model_dir))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_cards_usage_code_loads_the_adapter_and_decodes_as_evaluated(
    adapter_dir, tiny_model_dir, tokenizer, capsys
):
    save_generation_config(adapter_dir, tokenizer, max_new_tokens=2)  # train.py saves it beside the adapter
    summary = {**SUMMARY, "settings": {**SETTINGS, "model": str(tiny_model_dir), "system_prompt": "Be brief."}}
    text = card_text(write_model_card(adapter_dir, summary).parent)
    (code,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    namespace = {}
    exec(code, namespace)  # as pasted, on the tiny model
    assert isinstance(namespace["model"], PeftModel)
    prompt = namespace["tokenizer"].decode(namespace["inputs"]["input_ids"][0])
    assert "Be brief." in prompt and INSTRUCTION + namespace["dialogue"] in prompt
    used = namespace["generation_config"]
    assert (used.do_sample, used.repetition_penalty, used.max_new_tokens) == (False, 1.0, 2)
    assert capsys.readouterr().out  # it printed the generated answer


def test_add_evaluation_replaces_the_section_once_and_keeps_the_rest(tmp_path):
    before = card_text(write_model_card(tmp_path, SUMMARY).parent)
    add_evaluation(tmp_path, results(gain=0.1))
    add_evaluation(tmp_path, results(gain=0.2))  # a second evaluation run replaces the first
    after = card_text(tmp_path)
    assert after.count("## Evaluation") == 1
    evaluation = section(after, "Evaluation")
    assert "On 2 test examples" in evaluation
    assert "| loss | 2.7500 | 1.7500 | -1.0000 [-1.0000, -1.0000] | 0.0% | 100.0% |" in evaluation
    assert "| content loss | 3.2500 | 1.2500 | -2.0000 [-2.0000, -2.0000] | 0.0% | 100.0% |" in evaluation
    assert "| ROUGE-1 | 35.0000 | 55.0000 | +20.0000 [+20.0000, +20.0000] | 0.0% | 100.0% |" in evaluation
    assert "45.0000" not in after and NOT_EVALUATED not in after  # the first run's fine-tuned ROUGE is gone
    outside = re.compile(r"^## Evaluation\n.*?(?=^## )", re.MULTILINE | re.DOTALL)
    assert outside.sub("", after) == outside.sub("", before)


def test_add_evaluation_without_generation_shows_only_the_loss(tmp_path):
    write_model_card(tmp_path, SUMMARY)
    evaluation = section(card_text(add_evaluation(tmp_path, results(rouge=False)).parent), "Evaluation")
    assert [row for row in evaluation.splitlines() if row.startswith("| ") and "metric" not in row] == [
        "| loss | 2.7500 | 1.7500 | -1.0000 [-1.0000, -1.0000] | 0.0% | 100.0% |",
        "| content loss | 3.2500 | 1.2500 | -2.0000 [-2.0000, -2.0000] | 0.0% | 100.0% |",
    ]
    assert "ROUGE" not in evaluation


def test_add_evaluation_replaces_the_evaluation_part_of_peft_default_card(adapter_dir):
    peft_card = card_text(adapter_dir)  # unit_test.py's adapter, or one saved before train.py wrote cards
    text = card_text(add_evaluation(adapter_dir, results()).parent)
    assert text.count("## Evaluation") == 1 and "| ROUGE-1 | 35.0000 | 55.0000 |" in text
    assert "### Testing Data" in peft_card and "### Testing Data" not in text
    assert text.startswith(peft_card.split("## Evaluation")[0])
