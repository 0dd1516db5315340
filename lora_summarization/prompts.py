"""The one place where a (dialogue, summary) pair becomes chat messages, token ids and labels.

Training, evaluation and generation all go through these functions, so the prompt the model is
scored on is exactly the prompt it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "Summarize the following conversation:\n\n"
RESPONSE_PREFIX = "Summary: "
IGNORE_INDEX = -100


def instruction_text(dialogue: str) -> str:
    return INSTRUCTION + dialogue


def response_text(summary: str) -> str:
    return RESPONSE_PREFIX + summary


def build_messages(dialogue: str, summary: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for one example; without a summary, the prompt alone (for generation)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": instruction_text(dialogue)})
    if summary is not None:
        messages.append({"role": "assistant", "content": response_text(summary)})
    return messages


def extract_summary(generated: str) -> str:
    """The summary text of a model's answer, with the `Summary:` prefix removed if present."""
    text = generated.strip()
    if text.lower().startswith(RESPONSE_PREFIX.strip().lower()):
        text = text[len(RESPONSE_PREFIX.strip()) :]
    return text.strip()


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (`<|im_end|>` for Qwen): the tokenizer's eos token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, so the end of an assistant turn is unknown")
    return tokenizer.eos_token_id


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, dialogue: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header (what generation starts from)."""
    text = tokenizer.apply_chat_template(
        build_messages(dialogue, system_prompt=system_prompt), tokenize=False, add_generation_prompt=True
    )
    return _tokenize(tokenizer, text)


@dataclass
class EncodedExample:
    """Token ids with labels on the response (`Summary: <summary><|im_end|>`), -100 elsewhere.

    The *content* labels drop the fixed `Summary:` prefix: they are the summary text and the end token,
    the part of the loss that measures summarization rather than learning the answer's format.
    """

    input_ids: list[int]
    labels: list[int]
    dialogue_shortened: bool
    content_start: int  # index of the first content label (after the `Summary:` prefix tokens)

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def content_labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.content_start + self.labels[self.content_start :]

    @property
    def num_content_tokens(self) -> int:
        return len(self.labels) - self.content_start


def _prefix_token_count(tokenizer, response: list[int]) -> int:
    """How many leading response tokens spell the `Summary:` prefix; a token that also holds summary text is content."""
    prefix = RESPONSE_PREFIX.strip()
    for count in range(1, len(response) + 1):
        decoded = tokenizer.decode(response[:count]).strip()
        if len(decoded) >= len(prefix):
            return count if decoded == prefix else count - 1
    return 0


def _encode_untruncated(tokenizer, dialogue: str, summary: str, system_prompt: str | None) -> EncodedExample:
    prompt = prompt_ids(tokenizer, dialogue, system_prompt)
    full_text = tokenizer.apply_chat_template(build_messages(dialogue, summary, system_prompt), tokenize=False)
    full = _tokenize(tokenizer, full_text)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    response = full[len(prompt) :]
    eot = end_of_turn_id(tokenizer)
    if eot not in response:
        raise ValueError("the chat template does not close the assistant turn with the tokenizer's eos token")
    # Keep the answer up to and including the end-of-turn token; what follows (Qwen's "\n") is not learned.
    response = response[: response.index(eot) + 1]
    content_start = len(prompt) + _prefix_token_count(tokenizer, response)
    return EncodedExample(prompt + response, [IGNORE_INDEX] * len(prompt) + response, False, content_start)


def encode_example(
    tokenizer, dialogue: str, summary: str, max_length: int, system_prompt: str | None = None
) -> EncodedExample:
    """Input ids and labels (-100 on every prompt token) for one training or evaluation example.

    An example longer than `max_length` is shortened in its dialogue, token by token from the end,
    never in its summary: if the chat skeleton and the summary alone exceed `max_length`, the
    dialogue is emptied and the example stays longer than `max_length` rather than losing labels.
    """
    encoded = _encode_untruncated(tokenizer, dialogue, summary, system_prompt)
    if len(encoded.input_ids) <= max_length:
        return encoded
    dialogue_ids = _tokenize(tokenizer, dialogue)
    keep = len(dialogue_ids)
    while len(encoded.input_ids) > max_length and keep > 0:
        # Re-tokenizing a cut text can merge tokens differently, so cut and re-check until it fits.
        keep = max(0, keep - (len(encoded.input_ids) - max_length))
        shortened = tokenizer.decode(dialogue_ids[:keep]).rstrip("\ufffd").rstrip()
        encoded = _encode_untruncated(tokenizer, shortened, summary, system_prompt)
    encoded.dialogue_shortened = True
    return encoded
