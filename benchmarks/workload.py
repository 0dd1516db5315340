"""What both benchmarks run on: the real Qwen2.5 tokenizer, SAMSum-shaped synthetic dialogues, random-weight models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

from lora_summarization import modeling, synthetic, training
from lora_summarization.cli import UsageError
from lora_summarization.prompts import EncodedExample

ROOT = Path(__file__).resolve().parents[1]
QWEN_DIR = Path(os.environ.get("QWEN_TOKENIZER_DIR") or ROOT.parent / "shared" / "qwen2.5-1.5b-instruct")
QWEN_HUB_ID = "Qwen/Qwen2.5-1.5B-Instruct"
QWEN_VOCAB_SIZE = 151_936
MODELS = ("proxy", "qwen2.5-1.5b")
# Qwen2 architecture and the real vocabulary (so the LM head costs what it costs in Qwen2.5), on a small body.
PROXY_BODY = {
    "hidden_size": 256,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def qwen_source(folder: str) -> str:
    """The local Qwen2.5 folder if it exists, else the Hub id (which works online or from the HF cache)."""
    if Path(folder).is_dir():
        return folder
    print(f"note: {folder} not found; falling back to the Hub id {QWEN_HUB_ID}", file=sys.stderr)
    return QWEN_HUB_ID


def load_qwen_tokenizer(folder: str):
    """(where it came from, the tokenizer): the local folder, else the Hub id."""
    source = qwen_source(folder)
    try:
        return source, modeling.load_tokenizer(source)
    except UsageError as error:
        raise UsageError(f"no Qwen2.5 tokenizer in {folder} or from the Hub; pass --tokenizer FOLDER") from error


def samsum_like_examples(tokenizer, n: int, seed: int, max_length: int = 512) -> list[EncodedExample]:
    """`n` synthetic dialogues with SAMSum's length distribution, encoded exactly as training encodes them."""
    records = synthetic.make_examples(n, seed=seed, realistic_lengths=True)
    return training.encode_records(tokenizer, records, max_length, system_prompt=None)


def model_config(name: str, source: str):
    if name == "proxy":
        return Qwen2Config(
            vocab_size=QWEN_VOCAB_SIZE,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
            **PROXY_BODY,
        )
    if name == "qwen2.5-1.5b":
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read the Qwen2.5-1.5B config from {source}; pass --tokenizer FOLDER") from error
    raise UsageError(f"--model must be one of {', '.join(MODELS)}, not {name!r}")


def random_weight_model(name: str, source: str, dtype: torch.dtype, seed: int = 0):
    """The architecture with random weights (throughput does not depend on the weights), SDPA attention."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(name, source), dtype=dtype, attn_implementation="sdpa")


def random_weight_lora_model(name: str, source: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The base model wrapped in the project's LoRA adapter (the published r, alpha, dropout and modules)."""
    return modeling.apply_lora(random_weight_model(name, source, dtype, seed)).to(device)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2))
