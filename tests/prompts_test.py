from conftest import QWEN_DIR, requires_qwen_tokenizer
from transformers import AutoTokenizer

from lora_summarization.modeling import load_tokenizer
from lora_summarization.prompts import (
    IGNORE_INDEX,
    build_messages,
    encode_example,
    extract_summary,
    prompt_ids,
)
from lora_summarization.training import ResponseCollator, as_features

DIALOGUE = "Anna: Are we still on for Friday? <file_photo>\nTom: Yes 😂 & see you at 8"
SUMMARY = "Anna and Tom will meet on Friday at 8."


def label_text(tokenizer, labels) -> str:
    return tokenizer.decode([label for label in labels if label != IGNORE_INDEX])


def test_labels_cover_exactly_the_summary_and_end_of_turn(tokenizer):
    encoded = encode_example(tokenizer, DIALOGUE, SUMMARY, max_length=512)
    assert label_text(tokenizer, encoded.labels) == f"Summary: {SUMMARY}{tokenizer.eos_token}"
    first_label = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[:first_label] == prompt_ids(tokenizer, DIALOGUE)
    assert encoded.labels[first_label:] == encoded.input_ids[first_label:]
    assert not encoded.dialogue_shortened


def test_system_prompt_is_rendered_the_same_in_training_and_generation(tokenizer):
    system = "You summarize chats."
    encoded = encode_example(tokenizer, DIALOGUE, SUMMARY, max_length=512, system_prompt=system)
    prompt = prompt_ids(tokenizer, DIALOGUE, system_prompt=system)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert system in tokenizer.decode(prompt)


def test_long_dialogue_is_shortened_but_the_summary_is_whole(tokenizer):
    long_dialogue = "\n".join(f"Tom: message number {i} about the trip" for i in range(400))
    encoded = encode_example(tokenizer, long_dialogue, SUMMARY, max_length=128)
    assert encoded.dialogue_shortened
    assert len(encoded.input_ids) <= 128
    assert label_text(tokenizer, encoded.labels) == f"Summary: {SUMMARY}{tokenizer.eos_token}"
    assert "message number 0" in tokenizer.decode(encoded.input_ids)


def test_summary_longer_than_the_budget_keeps_every_label(tokenizer):
    long_summary = " ".join(["They talk about the trip."] * 40)
    encoded = encode_example(tokenizer, DIALOGUE, long_summary, max_length=64)
    assert label_text(tokenizer, encoded.labels) == f"Summary: {long_summary}{tokenizer.eos_token}"
    assert encoded.num_label_tokens > 64


@requires_qwen_tokenizer
def test_real_qwen_prompt_ids_are_a_prefix_of_the_full_conversation():
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    full = tokenizer.apply_chat_template(build_messages(DIALOGUE, SUMMARY), tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt = prompt_ids(tokenizer, DIALOGUE)
    assert full_ids[: len(prompt)] == prompt
    encoded = encode_example(tokenizer, DIALOGUE, SUMMARY, max_length=512)
    assert encoded.input_ids == full_ids[: len(encoded.input_ids)]
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.pad_token_id == 151643


def test_padding_never_erases_a_label_when_pad_equals_end_of_turn(tokenizer):
    """SmolLM2-style tokenizers pad with their end-of-turn token; labels are made before padding."""
    short = encode_example(tokenizer, "A: hi", "Hi.", max_length=512)
    longer = encode_example(tokenizer, DIALOGUE, SUMMARY, max_length=512)
    batch = ResponseCollator(pad_token_id=tokenizer.eos_token_id)(as_features([short, longer]))
    row = batch["labels"][0]
    assert row[len(short.labels) - 1] == tokenizer.eos_token_id
    assert (row[len(short.labels) :] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(longer.input_ids))


def test_tokenizer_without_pad_token_gets_one_without_resizing(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    vocabulary = len(tokenizer)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token
    assert len(reloaded) == vocabulary


def test_extract_summary_removes_the_prefix_only_at_the_start():
    assert extract_summary("Summary: Tom is late. Summary: later") == "Tom is late. Summary: later"
    assert extract_summary("  summary:Tom is late.\n") == "Tom is late."
    assert extract_summary("Tom is late.") == "Tom is late."


def test_content_labels_are_the_summary_and_end_of_turn_without_the_format_prefix(tokenizer):
    for max_length in (512, 64):  # whole, and with the dialogue shortened
        encoded = encode_example(tokenizer, DIALOGUE * 8, SUMMARY, max_length=max_length)
        assert label_text(tokenizer, encoded.content_labels).strip() == f"{SUMMARY}{tokenizer.eos_token}"
        prefix = [label for label in encoded.labels[: encoded.content_start] if label != IGNORE_INDEX]
        assert tokenizer.decode(prefix).strip() == "Summary:"
        assert encoded.num_content_tokens == encoded.num_label_tokens - len(prefix) > 0
