"""Loading the base model and tokenizer, applying or loading LoRA, precision and parameter counts."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
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


def several_gpus_without_torchrun() -> int:
    """How many GPUs the HF Trainer of a single (non-distributed) process would wrap in DataParallel, multiplying
    the micro-batch by their number; 0 when it would use one device."""
    if "WORLD_SIZE" in os.environ or not torch.cuda.is_available():
        return 0
    count = torch.cuda.device_count()
    return count if count > 1 else 0


def pin_one_gpu_unless_distributed() -> None:
    """Make a single-process run use its first visible GPU (before CUDA initialises), instead of DataParallel."""
    if count := several_gpus_without_torchrun():
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        print(f"{count} GPUs visible; this single process uses one of them (CUDA_VISIBLE_DEVICES={first})")
        os.environ["CUDA_VISIBLE_DEVICES"] = first


def bf16_supported() -> bool:
    """bf16 runs on every CPU (autocast) and on Ampere or newer GPUs (older ones emulate it, far slower than fp32)."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    warnings.warn("no CUDA device found: running on the CPU, which is only practical for tiny models", stacklevel=2)
    return torch.device("cpu")


LARGEST_MODEL_FOR_CPU = 1_000_000_000  # parameters; the tiny test models train on a CPU in seconds, 1.5B takes days

CHECK_THE_GPU = 'check the driver with nvidia-smi and python -c "import torch; print(torch.cuda.is_available())"'


def cpu_training_problem(name: str) -> str | None:
    """Why training `name` here would take days, or None: no usable GPU and more than ~1B parameters, counted from
    its config on the meta device (no weights are read)."""
    if torch.cuda.is_available():
        return None
    parameters = sum(parameter_counts(load_base_model(name, weights=False)))
    if parameters <= LARGEST_MODEL_FOR_CPU:
        return None
    return (
        f"no usable CUDA GPU was found and {name} has {parameters:,} parameters, which would take days to train on "
        f"the CPU; {CHECK_THE_GPU}, or pass --allow-cpu to train on the CPU anyway"
    )


def precision_problem(precision: str) -> str | None:
    """Why `--precision` cannot be used on this machine, or None; every stage checks it before loading weights."""
    if precision not in PRECISIONS:
        return f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
    if precision == "bf16" and not bf16_supported():
        return (
            "--precision bf16 needs a GPU with bfloat16 support, which this one lacks; pass --precision fp32 "
            "(tf32 also needs an Ampere or newer GPU)"
        )
    return None


def configure_precision(precision: str) -> torch.dtype:
    """Set matmul precision for `precision` and return the dtype to load the base weights in."""
    problem = precision_problem(precision)
    if problem:
        raise UsageError(problem)
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


def lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str = "q_proj,k_proj,v_proj,o_proj",
    use_dora: bool = False,
    use_rslora: bool = False,
) -> LoraConfig:
    """The PEFT LoRA config; the defaults are the published recipe's adapter.

    `use_dora`: weight-decomposed LoRA (Liu et al. 2024); `use_rslora`: scaling alpha / sqrt(r) instead of
    alpha / r (Kalajdzievski 2023).
    """
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
        bias="none",
        use_dora=use_dora,
        use_rslora=use_rslora,
    )


def apply_lora(
    model,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: str = "q_proj,k_proj,v_proj,o_proj",
    gradient_checkpointing: bool = False,
    use_dora: bool = False,
    use_rslora: bool = False,
):
    """Wrap `model` in a PEFT LoRA adapter; the defaults are the published recipe's adapter."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings produce no grad; without this the checkpointed blocks would pass none to LoRA.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(r, alpha, dropout, target_modules, use_dora, use_rslora))


def lora_refusal(model_name: str, **lora_settings) -> str | None:
    """PEFT's reason to refuse these `lora_config` settings on this model (a module type it cannot adapt, a name
    not in the model, ...), found on a weightless copy built from config.json; None when they fit."""
    base = load_base_model(model_name, weights=False)
    try:
        with warnings.catch_warnings():  # a probe before the checks of the data: the real run warns about the same
            warnings.simplefilter("ignore", FutureWarning)
            get_peft_model(base, lora_config(**lora_settings))
    except (ValueError, TypeError) as error:
        return str(error).strip().splitlines()[0]
    return None


def lora_problems(
    model_name: str,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str,
    use_dora: bool,
    use_rslora: bool,
    *,
    loraplus_lr_ratio: float,
    neftune_noise_alpha: float,
) -> list[str]:
    """Bad LoRA values, then what PEFT itself refuses, tried on the model built without its weights."""
    rules = [
        ("--lora-r", r >= 1, "at least 1"),
        ("--lora-alpha", alpha > 0, "positive"),
        ("--lora-dropout", 0 <= dropout < 1, "in [0, 1)"),
        ("--loraplus-lr-ratio", loraplus_lr_ratio >= 0, "positive (0 = off)"),
        ("--neftune-noise-alpha", neftune_noise_alpha >= 0, "positive (0 = off)"),
    ]
    problems = [f"{flag} must be {rule}" for flag, ok, rule in rules if not ok]
    if problems:
        return problems
    try:
        refusal = lora_refusal(
            model_name,
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            use_dora=use_dora,
            use_rslora=use_rslora,
        )
    except UsageError as error:  # no config.json to build the model from
        return [str(error)]
    if refusal is None:
        return []
    flags = f"--lora-r {r} --lora-alpha {alpha} --lora-dropout {dropout} --target-modules {target_modules}"
    flags += " --use-dora" * use_dora + " --use-rslora" * use_rslora
    return [f"PEFT refuses the adapter of {flags} on {model_name} (change those flags): {refusal}"]


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, frozen base) parameters; tied weights are counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params if not p.requires_grad)


def describe_parameters(model) -> str:
    trainable, base = parameter_counts(model)
    return f"trainable parameters: {trainable:,} of {base:,} ({100 * trainable / base:.2f}%)"


ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_ADAPTER_WEIGHTS_FILE = "adapter_model.bin"


def check_adapter_folder(adapter_dir: str | Path) -> None:
    """Refuse a missing folder, a folder without a PEFT adapter, and weights saved only as a pickle."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UsageError(f"adapter folder {folder} not found; run train.py first or pass --adapter with its folder")
    if not (folder / ADAPTER_CONFIG_FILE).exists():
        raise UsageError(f"{folder} holds no {ADAPTER_CONFIG_FILE}, so it is not a PEFT adapter; pass --adapter")
    if (folder / ADAPTER_WEIGHTS_FILE).exists():
        return
    if (folder / PICKLED_ADAPTER_WEIGHTS_FILE).exists():
        raise UsageError(
            f"{folder} holds the adapter weights only as a pickle ({PICKLED_ADAPTER_WEIGHTS_FILE}), which can run "
            f"code when loaded; convert them to {ADAPTER_WEIGHTS_FILE} (PeftModel.save_pretrained writes it)"
        )
    raise UsageError(f"{folder} holds no {ADAPTER_WEIGHTS_FILE}; pass --adapter with the folder train.py wrote")


def _adapter_does_not_fit(error: Exception) -> bool:
    # torch's load_state_dict says "size mismatch" when the LoRA matrices were shaped for other layer sizes;
    # PEFT says "not found in the base model" when the adapter's target modules do not exist.
    return "size mismatch" in str(error) or "not found in the base model" in str(error)


def load_adapter(
    base_model, adapter_dir: str | Path, is_trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """Attach a saved LoRA adapter (PEFT safetensors) to `base_model`; refuse one made for another base model.

    A `base_model` that is already a PeftModel gets one more adapter, under `adapter_name` (inactive until
    `set_adapter`). The shapes decide whether an adapter fits: the base model's name in the adapter config is
    only compared for a warning, since a local folder and a Hub id can name the same model.
    """
    check_adapter_folder(adapter_dir)
    expected_base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    try:
        if isinstance(base_model, PeftModel):
            base_model.load_adapter(str(adapter_dir), adapter_name, is_trainable=is_trainable)
            model = base_model
        else:
            model = PeftModel.from_pretrained(
                base_model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable
            )
    except (RuntimeError, ValueError) as error:
        if not _adapter_does_not_fit(error):
            raise
        expected = f"; it was made for {expected_base}: pass --model with that model" if expected_base else ""
        raise UsageError(
            f"the adapter in {adapter_dir} does not fit the base model {base_model.name_or_path} "
            f"(its weights have other shapes or layer names){expected}"
        ) from error
    if expected_base and Path(expected_base).name != Path(base_model.name_or_path).name:
        warnings.warn(
            f"the adapter in {adapter_dir} was trained on {expected_base}, not {base_model.name_or_path}", stacklevel=2
        )
    return model
