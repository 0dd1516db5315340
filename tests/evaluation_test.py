"""Unit tests of lora_summarization/evaluation.py on the tiny model: loss, generation, ROUGE, bootstrap."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, GenerationConfig

from lora_summarization import data
from lora_summarization.cli import UsageError
from lora_summarization.evaluation import (
    comparison_plan,
    encode_test_set,
    follow_training,
    generate_summaries,
    greedy_generation_config,
    length_sorted_batches,
    loss_scores,
    paired_bootstrap,
    published_recipe_losses,
    rouge_scores,
    save_generation_config,
    score_model,
    split_sentences,
)
from lora_summarization.modeling import load_adapter, load_base_model, load_tokenizer

# Qwen2.5-1.5B-Instruct's generation_config.json: it samples unless told otherwise.
QWEN_SAMPLING_CONFIG = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.1,
}

PAIRS = [  # (prediction, reference)
    ("Anna and Tom will meet at the park on Monday.", "Anna and Tom will meet at the park on Monday."),
    ("Tom meets Anna. They are going to the cinema!", "Anna and Tom will go to the cinema on Friday."),
    ("Kate is running late again", "Kate is stuck in traffic. She will be late for the meeting."),
    ("", "John will send Mark the link."),
    ("Peter plays football. Lucy watched movies?", "Lucy watched a movie. Peter played football on Sunday."),
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def test_set(tiny_tokenizer, data_dir):
    records = data.read_records(data_dir / data.TEST_FILE)[:6]
    return encode_test_set(tiny_tokenizer, records, max_length=512, system_prompt=None)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_rouge_equals_rouge_scores_own_result_on_fixed_pairs():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    ours = rouge_scores([prediction for prediction, _ in PAIRS], [reference for _, reference in PAIRS])
    for index, (prediction, reference) in enumerate(PAIRS):
        plain = scorer.score(reference, prediction)
        by_sentence = scorer.score(split_sentences(reference), split_sentences(prediction))
        for name in ("rouge1", "rouge2", "rougeL"):
            assert ours[name][index] == plain[name].fmeasure
        assert ours["rougeLsum"][index] == by_sentence["rougeLsum"].fmeasure
    assert ours["rouge1"][0] == 1.0 and ours["rouge1"][3] == 0.0


def test_split_sentences_puts_one_sentence_per_line():
    assert split_sentences(" Tom is late. Anna waits!  Why?\nOK ") == "Tom is late.\nAnna waits!\nWhy?\nOK"
    # Without a sentence split, ROUGE-Lsum on one line would equal ROUGE-L.
    lsum = rouge_scores([PAIRS[4][0]], [PAIRS[4][1]])
    assert lsum["rougeLsum"][0] != lsum["rougeL"][0]


def test_paired_bootstrap_is_seeded_and_reports_interval_and_win_rate():
    base = np.array([0.2, 0.4, 0.1, 0.5, 0.3, 0.3])
    fine_tuned = base + np.array([0.1, 0.2, 0.0, 0.3, 0.1, -0.05])
    first = paired_bootstrap(fine_tuned, base, lower_is_better=False, samples=1000, seed=7)
    assert first == paired_bootstrap(fine_tuned, base, lower_is_better=False, samples=1000, seed=7)
    assert first["mean"] == pytest.approx(np.mean(fine_tuned - base))
    low, high = first["ci95"]
    assert 0 < low <= first["mean"] <= high
    assert first["share_not_better"] < 0.05
    assert first["win_rate"] == pytest.approx(4 / 6) and first["tie_rate"] == pytest.approx(1 / 6)


def test_paired_bootstrap_of_a_loss_is_token_weighted_and_lower_is_better():
    base, fine_tuned, tokens = np.array([2.0, 3.0, 4.0]), np.array([1.0, 3.5, 3.0]), np.array([10, 30, 60])
    result = paired_bootstrap(fine_tuned, base, lower_is_better=True, samples=500, seed=0, weights=tokens)
    assert result["mean"] == pytest.approx(np.average(fine_tuned, weights=tokens) - np.average(base, weights=tokens))
    assert result["win_rate"] == pytest.approx(2 / 3)
    assert 0 <= result["share_not_better"] <= 1
    # A model that is worse on every example is "not better" in every resample.
    worse = paired_bootstrap(base + 1, base, lower_is_better=True, samples=100, seed=0, weights=tokens)
    assert worse["share_not_better"] == 1.0 and worse["win_rate"] == 0.0


def test_length_sorted_batches_partition_the_indices_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    flat = [lengths[index] for batch in batches for index in batch]
    assert flat == sorted(lengths, reverse=True)


def test_response_and_content_losses_equal_the_models_own_loss_per_example(tiny_model, tiny_tokenizer, test_set):
    scores = loss_scores(tiny_model, tiny_tokenizer, test_set.examples, batch_size=4)
    for index, example in enumerate(test_set.examples):
        input_ids = torch.tensor([example.input_ids])
        response = tiny_model(input_ids=input_ids, labels=torch.tensor([example.labels])).loss
        content = tiny_model(input_ids=input_ids, labels=torch.tensor([example.content_labels])).loss
        assert scores.losses[index] == pytest.approx(response.item(), rel=1e-5)
        assert scores.content_losses[index] == pytest.approx(content.item(), rel=1e-5)
        assert scores.label_tokens[index] == example.num_label_tokens
        assert scores.content_tokens[index] == example.num_content_tokens < example.num_label_tokens
    summary = scores.summary()
    assert summary["content_loss"] == pytest.approx(
        np.sum(scores.content_losses * scores.content_tokens) / scores.content_tokens.sum()
    )


def test_published_recipe_loss_is_the_plain_mean_over_512_padded_positions(tiny_model, tiny_tokenizer, test_set):
    examples = test_set.examples[:3]  # full logits over the whole vocabulary at 512 positions are costly
    ours = published_recipe_losses(tiny_model, tiny_tokenizer, examples, batch_size=2)
    pad = tiny_tokenizer.pad_token_id
    input_ids = torch.full((len(examples), 512), pad)
    attention_mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    with torch.no_grad():  # the published way: full logits, labels = input ids, one mean over every position
        expected = tiny_model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.item()
    assert ours.mean() == pytest.approx(expected, abs=1e-5)
    assert ours.min() != ours.max()  # per example, not one number repeated


def test_generation_is_greedy_despite_the_models_sampling_config(tmp_path, tiny_model_dir, tiny_tokenizer, test_set):
    sampling_dir = tmp_path / "sampling-model"
    shutil.copytree(tiny_model_dir, sampling_dir)
    generation_config = json.loads((tiny_model_dir / "generation_config.json").read_text())
    (sampling_dir / "generation_config.json").write_text(json.dumps({**generation_config, **QWEN_SAMPLING_CONFIG}))
    sampling_model = AutoModelForCausalLM.from_pretrained(sampling_dir).eval()
    plain_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    one_at_a_time = generate_summaries(plain_model, tiny_tokenizer, test_set.prompts, max_new_tokens=8, batch_size=1)
    torch.manual_seed(1)
    batched = generate_summaries(sampling_model, tiny_tokenizer, test_set.prompts, max_new_tokens=8, batch_size=4)
    torch.manual_seed(2)
    again = generate_summaries(sampling_model, tiny_tokenizer, test_set.prompts, max_new_tokens=8, batch_size=4)
    assert batched == again == one_at_a_time


def test_base_with_the_adapter_disabled_scores_as_the_plain_base_model(
    tiny_model_dir, trained_adapter_dir, tiny_tokenizer, test_set
):
    def scores(model):
        return score_model(model, tiny_tokenizer, test_set, batch_size=4, max_new_tokens=16, generate=True, name="t")

    plain = scores(load_base_model(str(tiny_model_dir)).eval())
    with_adapter = load_adapter(load_base_model(str(tiny_model_dir)), trained_adapter_dir).eval()
    with with_adapter.disable_adapter():
        disabled = scores(with_adapter)
    enabled = scores(with_adapter)

    np.testing.assert_array_equal(disabled.losses, plain.losses)
    assert disabled.predictions == plain.predictions
    for name in plain.rouge:
        np.testing.assert_array_equal(disabled.rouge[name], plain.rouge[name])
    assert enabled.summary()["loss"] < plain.summary()["loss"]


def test_saved_generation_config_is_the_greedy_one_generation_uses(tmp_path, tiny_tokenizer):
    path = save_generation_config(tmp_path, tiny_tokenizer, max_new_tokens=40)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["do_sample"] is False and saved["repetition_penalty"] == 1.0 and saved["max_new_tokens"] == 40
    assert saved["eos_token_id"] == tiny_tokenizer.eos_token_id
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == greedy_generation_config(tiny_tokenizer, 40).to_dict()


def test_comparison_plan_is_every_model_against_the_base_and_the_first_adapter():
    assert comparison_plan(["base", "a", "b", "c"], "base") == [
        ("a", "base"),
        ("b", "base"),
        ("c", "base"),
        ("b", "a"),
        ("c", "a"),
    ]
    assert comparison_plan(["base", "fine_tuned"], "base") == [("fine_tuned", "base")]
    assert comparison_plan(["model"], "base") == []
    assert comparison_plan(["x/fine_tuned", "y/fine_tuned"], "base") == [("y/fine_tuned", "x/fine_tuned")]


def write_training_summary(folder, **settings):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_summary.json").write_text(json.dumps({"settings": {"lr": 1, **settings}}), encoding="utf-8")
    return str(folder)


def test_settings_follow_training_unless_given(tmp_path):
    brief = write_training_summary(tmp_path / "brief", system_prompt="Be brief.", max_length=256)
    plain = write_training_summary(tmp_path / "plain", system_prompt=None, max_length=256)
    unknown = str(tmp_path / "no-summary")
    nothing_given = {"system_prompt": None, "max_length": None}
    assert follow_training([brief, unknown], nothing_given) == {"system_prompt": "Be brief.", "max_length": 256}
    assert follow_training([unknown], nothing_given) == {"system_prompt": None, "max_length": 512}
    with pytest.warns(UserWarning, match="--max-length 128 differs from 256"):
        assert follow_training([brief], {"max_length": 128}) == {"max_length": 128}
    with pytest.raises(UsageError, match="different --system-prompt .*pass --system-prompt"):
        follow_training([brief, plain], nothing_given)
    both = follow_training([brief, plain], {"system_prompt": "Be brief.", "max_length": None})
    assert both == {"system_prompt": "Be brief.", "max_length": 256}
