"""Try an adapter on conversations of your own, with exactly the prompt and greedy decoding that evaluate.py scores.

    python -m lora_summarization.summarize --adapter fine_tuned_model dialogue.txt
    python -m lora_summarization.summarize --adapter fine_tuned_model - < dialogue.txt
    python -m lora_summarization.summarize --adapter fine_tuned_model dialogues.jsonl

A text file (or `-`, standard input) holds one dialogue, a `Name: message` turn per line; its summary is printed.
A JSONL file holds one dialogue per line (`{"id": ..., "dialogue": ...}`, the id optional); each gives one JSON
line `{"id": ..., "summary": ...}`. The base model is the one named in the adapter's adapter_config.json unless
--model is given; the system prompt is the one the adapter was trained with (training_summary.json), or with
`--adapter none` the one in --model's folder (a merged export carries it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from .cli import UsageError, run_stage
from .evaluation import DEFAULT_MAX_NEW_TOKENS, follow_training, generate_summaries
from .export import trained_on
from .modeling import (
    PRECISIONS,
    check_adapter_folder,
    configure_precision,
    load_adapter,
    load_base_model,
    load_tokenizer,
    resolve_device,
)
from .prompts import prompt_ids

NO_ADAPTER = "none"
STANDARD_INPUT = "-"


@dataclass
class SummarizeConfig:
    inputs: list[str] = field(
        default_factory=list,
        metadata={"help": "dialogue files (also given without the flag): .txt, .jsonl, or - for standard input"},
    )
    adapter: str = field(
        default="fine_tuned_model", metadata={"help": "adapter folder written by train.py; `none` = --model alone"}
    )
    model: str | None = field(default=None, metadata={"help": "base model; unset = the one the adapter names"})
    system_prompt: str | None = field(default=None, metadata={"help": "system prompt; unset = training's"})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "longest summary, in tokens"})
    batch_size: int = field(default=16, metadata={"help": "dialogues generated at a time"})
    precision: str = field(default="fp32", metadata={"help": f"one of {', '.join(PRECISIONS)}"})
    debug: bool = field(default=False, metadata={"help": "print the traceback of a usage error"})


@dataclass
class Dialogue:
    text: str
    id: str | None = None  # set for a JSONL line, whose summary is printed as JSON


def main(config: SummarizeConfig) -> int:
    dialogues = [dialogue for path in check_inputs(config) for dialogue in read_dialogues(path)]
    trained = config.model if config.adapter == NO_ADAPTER else config.adapter  # --model: a merged export
    system_prompt = follow_training([trained], {"system_prompt": config.system_prompt})["system_prompt"]
    tokenizer, model = load_model(config)
    prompts = [prompt_ids(tokenizer, dialogue.text, system_prompt) for dialogue in dialogues]
    summaries = generate_summaries(model, tokenizer, prompts, config.max_new_tokens, config.batch_size, "adapter")
    for dialogue, summary in zip(dialogues, summaries, strict=True):
        print(summary if dialogue.id is None else json.dumps({"id": dialogue.id, "summary": summary}))
    return 0


def check_inputs(config: SummarizeConfig) -> list[str]:
    if not config.inputs:
        raise UsageError("no dialogue given; pass a .txt or .jsonl file, or - to read standard input")
    if config.adapter == NO_ADAPTER and config.model is None:
        raise UsageError(f"--adapter {NO_ADAPTER} needs --model with the model to run")
    missing = [path for path in config.inputs if path != STANDARD_INPUT and not Path(path).is_file()]
    if missing:
        raise UsageError(f"{', '.join(missing)} not found; pass existing dialogue files")
    if config.adapter != NO_ADAPTER:
        check_adapter_folder(config.adapter)
    return config.inputs


def read_dialogues(path: str) -> list[Dialogue]:
    if path == STANDARD_INPUT:
        return [one_dialogue(sys.stdin.read(), "standard input")]
    text = Path(path).read_text(encoding="utf-8")
    return jsonl_dialogues(text, path) if path.endswith(".jsonl") else [one_dialogue(text, path)]


def one_dialogue(text: str, source: str) -> Dialogue:
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise UsageError(f"{source} holds no dialogue")
    return Dialogue(text)


def jsonl_dialogues(text: str, path: str) -> list[Dialogue]:
    dialogues = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number} is not valid JSON ({error.msg})") from None
        if not (isinstance(record, dict) and isinstance(record.get("dialogue"), str)):
            raise UsageError(f'{path} line {number} needs the text field "dialogue"')
        dialogue = one_dialogue(record["dialogue"], f"{path} line {number}")
        dialogue.id = str(record.get("id", number))
        dialogues.append(dialogue)
    if not dialogues:
        raise UsageError(f"{path} holds no dialogue")
    return dialogues


def load_model(config: SummarizeConfig):
    """The tokenizer and the model (with the adapter attached unless `none`), on the device, in eval mode."""
    name = config.model or trained_on(config.adapter)
    tokenizer = load_tokenizer(name)
    model = load_base_model(name, configure_precision(config.precision))
    if config.adapter != NO_ADAPTER:
        model = load_adapter(model, config.adapter)
    return tokenizer, model.to(resolve_device()).eval()


def with_inputs_flag(argv: list[str]) -> list[str]:
    """The command line with its bare file arguments moved behind `--inputs`, for the dataclass parser."""
    _, unparsed = HfArgumentParser(SummarizeConfig).parse_known_args(argv)
    bare = [arg for arg in unparsed if arg == STANDARD_INPUT or not arg.startswith("-")]
    flags = list(argv)
    for arg in reversed(bare):  # from the end, where a file name may repeat a flag's value before it
        del flags[len(flags) - 1 - flags[::-1].index(arg)]
    return [*flags, "--inputs", *bare] if bare else flags


if __name__ == "__main__":
    sys.exit(run_stage(main, SummarizeConfig, with_inputs_flag(sys.argv[1:])))
