"""Loading the base model and tokenizer, applying or loading LoRA, precision and parameter counts."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .cli import UsageError

PRECISIONS = ("fp32", "tf32", "bf16")


def _from_pretrained(loader: Callable, name: str, what: str, **kwargs):
    """Call a `from_pretrained` and turn "not found / Hub unreachable" into one actionable line."""
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as error:
        if Path(name).is_dir():
            raise UsageError(f"cannot load the {what} from folder {name}: {str(error).splitlines()[0]}") from error
        if name.startswith((".", "/", "~")):
            raise UsageError(f"model folder {name} not found; pass --model with an existing folder") from error
        raise UsageError(
            f"cannot load the {what} '{name}' from the Hugging Face Hub (unreachable or unknown id); "
            "pass --model with a local copy of the model folder"
        ) from error


def resolve_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    warnings.warn("no CUDA device found: running on the CPU, which is only practical for tiny models", stacklevel=2)
    return torch.device("cpu")


def configure_precision(precision: str) -> torch.dtype:
    """Set matmul precision for `precision` and return the dtype to load the base weights in."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    # tf32 and bf16 both let fp32 matmuls use TF32 tensor cores; fp32 keeps exact fp32 (the published setting).
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_tokenizer(name: str):
    """The model's tokenizer, given a pad token (its eos) if it has none; the vocabulary is not resized."""
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str, dtype: torch.dtype = torch.float32, weights: bool = True):
    """The causal LM; with `weights=False` it is built on the meta device from `config.json` alone."""
    if not weights:
        config = _from_pretrained(AutoConfig.from_pretrained, name, "model config")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _from_pretrained(
        AutoModelForCausalLM.from_pretrained, name, "model", dtype=dtype, attn_implementation="sdpa"
    )


def parse_target_modules(value: str) -> list[str] | str:
    """`q_proj,k_proj` -> a list; `all-linear` is passed to PEFT as is."""
    if value.strip() == "all-linear":
        return "all-linear"
    return [module.strip() for module in value.split(",") if module.strip()]


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: str, gradient_checkpointing: bool = False):
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings produce no grad; without this the checkpointed blocks would pass none to LoRA.
        model.enable_input_require_grads()
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, frozen base) parameters; tied weights are counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params if not p.requires_grad)


def describe_parameters(model) -> str:
    trainable, base = parameter_counts(model)
    return f"trainable parameters: {trainable:,} of {base:,} ({100 * trainable / base:.2f}%)"


def load_adapter(base_model, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Attach a saved LoRA adapter (PEFT safetensors) to `base_model`."""
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
