"""The adapter folder's model card (README.md, Hugging Face format): written after training, completed by evaluation.

write_model_card("fine_tuned_model", training_summary)   # train.py, after the adapter is saved
add_evaluation("fine_tuned_model", results)              # evaluate.py; replaces the Evaluation section
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import ModelCardData

from .cli import write_atomic
from .evaluation import METRIC_NAMES, scale_and_digits
from .prompts import INSTRUCTION

CARD_FILE = "README.md"
DATASET_ID = "knkarthick/samsum"
LICENSE = "cc-by-nc-nd-4.0"
TAGS = ["lora", "summarization", "samsum"]
EVALUATION_HEADING = "## Evaluation"
EVALUATION_SECTION = re.compile(rf"^{EVALUATION_HEADING}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
NOT_EVALUATED = "Not evaluated yet: run `python evaluate.py`, which writes the metrics here."
EXAMPLE_DIALOGUE = "Anna: Are we still on for lunch?\nBen: Yes, 12:30 at the usual place.\nAnna: Great, see you!"


def hub_id(name: str) -> str | None:
    """`name` if it can be a Hub model id; None for a local folder, which card metadata cannot name."""
    return None if name.startswith((".", "/", "~")) or Path(name).expanduser().exists() else name


def number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def cell(value) -> str:
    """A settings value as a markdown table cell: code-formatted, with pipes and newlines neutralised."""
    return "`" + str(value).replace("|", "\\|").replace("\n", "\\n") + "`"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def front_matter(base_model: str) -> str:
    data = ModelCardData(
        base_model=hub_id(base_model),
        library_name="peft",
        pipeline_tag="text-generation",
        license=LICENSE,
        datasets=[DATASET_ID],
        language=["en"],
        tags=TAGS,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def introduction(settings: dict) -> str:
    modules = settings.get("target_modules", "n/a").replace(",", ", ")
    return (
        f"# {Path(settings.get('model', 'base model')).name} LoRA adapter for dialogue summarization (SAMSum)\n\n"
        f"A LoRA adapter (rank {settings.get('lora_r')}, alpha {settings.get('lora_alpha')}, on {modules}) for "
        f"`{settings.get('model')}` that summarizes short messenger-style conversations in a sentence or three. "
        "This folder holds only the adapter (PEFT safetensors) and the tokenizer; the base model is loaded "
        "separately. It was written by this project's `train.py`.\n"
    )


def python_string(text: str) -> str:
    """A double-quoted Python string literal (JSON's escapes are Python's)."""
    return json.dumps(text, ensure_ascii=False)


def usage(settings: dict, adapter_dir: str) -> str:
    system = settings.get("system_prompt")
    system_message = "" if system is None else f'{{"role": "system", "content": {python_string(system)}}}, '
    return f"""## How to use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

tokenizer = AutoTokenizer.from_pretrained({python_string(adapter_dir)})
model = AutoModelForCausalLM.from_pretrained({python_string(settings.get("model", ""))}, dtype="auto")
model = PeftModel.from_pretrained(model, {python_string(adapter_dir)})
generation_config = GenerationConfig.from_pretrained({python_string(adapter_dir)})  # greedy, as evaluated

dialogue = {python_string(EXAMPLE_DIALOGUE)}
messages = [{system_message}{{"role": "user", "content": {python_string(INSTRUCTION)} + dialogue}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, generation_config=generation_config)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))  # Summary: ...
```

This is the prompt the adapter was trained on and the decoding `evaluate.py` scores: greedy, no repetition \
penalty (the folder's `generation_config.json`, not the base model's sampling). The answer starts with `Summary: `. \
To try it on a conversation of your own: \
`python -m lora_summarization.summarize --adapter {adapter_dir} dialogue.txt`. \
To serve the model without PEFT (vLLM, TGI), merge the adapter into the base model: \
`python -m lora_summarization.export --adapter {adapter_dir}` writes a plain safetensors model folder with the same \
generation config.
"""


def data_section(summary: dict, settings: dict) -> str:
    return (
        "## Data\n\n"
        f'[SAMSum](https://huggingface.co/datasets/{DATASET_ID}) (Gliwa et al., 2019, "SAMSum Corpus: A '
        'Human-annotated Dialogue Dataset for Abstractive Summarization"): about 16,000 English messenger-like '
        "conversations written by linguists, each with a human-written summary. Licensed CC BY-NC-ND 4.0; this "
        "folder contains no SAMSum text.\n\n"
        f"Trained on {number(summary.get('examples'))} examples from `{settings.get('data_dir')}/` (written by "
        f"`data_preparation.py`); {number(summary.get('dialogues_shortened'))} dialogues were shortened to fit "
        f"{settings.get('max_length')} tokens (summaries are never cut). The loss covers the answer only: the "
        "`Summary:` prefix, the summary and the closing `<|im_end|>` token, not the prompt.\n"
    )


def lora_variant(settings: dict) -> str:
    """The LoRA variants a run used (DoRA, rsLoRA, LoRA+, NEFTune), or plain LoRA."""
    variants = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if settings.get(key)]
    if settings.get("loraplus_lr_ratio"):
        variants.append(f"LoRA+ (B matrices at {settings['loraplus_lr_ratio']:g} x the learning rate)")
    if settings.get("neftune_noise_alpha"):
        variants.append(f"NEFTune (noise alpha {settings['neftune_noise_alpha']:g})")
    return ", ".join(variants) or "plain LoRA"


def cost_rows(summary: dict) -> list[tuple[str, str]]:
    """Throughput, peak memory and MFU of the run, and with --keep-best which checkpoint the adapter is."""
    peaks = ", ".join(f"{peak:,.0f}" for peak in summary.get("peak_memory_mib", []))
    rows = [
        (
            "training throughput",
            f"{number(summary.get('examples_per_second'), 2)} examples/s, "
            f"{number(summary.get('tokens_per_second'), 0)} non-padding tokens/s over "
            f"{duration(summary.get('training_step_seconds'))} inside optimizer steps "
            "(start-up, evaluation, checkpoints and logging excluded)",
        ),
        ("peak memory", f"{peaks or 'n/a'} MiB ({summary.get('peak_memory_measure', 'n/a')})"),
        ("model FLOPs utilisation", "n/a" if summary.get("mfu") is None else f"{summary['mfu']:.1%}"),
    ]
    if best := summary.get("kept_best"):
        rows.append(
            (
                "adapter (--keep-best)",
                f"checkpoint of step {number(best['step'])}, validation content loss "
                f"{number(best['validation_content_loss'])} (last evaluation, step "
                f"{number(best['last_evaluated_step'])}: {number(best['last_validation_content_loss'])})",
            )
        )
    return rows


def training_section(summary: dict, settings: dict) -> str:
    share = "n/a"
    if summary.get("trainable_parameters") and summary.get("base_parameters"):
        share = f"{100 * summary['trainable_parameters'] / summary['base_parameters']:.2f}%"
    facts = [
        ("adapter", lora_variant(settings)),
        ("examples", number(summary.get("examples"))),
        ("optimizer steps", number(summary.get("optimizer_steps"))),
        ("effective batch", number(summary.get("effective_batch"))),
        ("tokens trained on", number(summary.get("tokens_trained_on"))),
        ("runtime", duration(summary.get("runtime_seconds"))),
        *cost_rows(summary),
        (
            "train loss (first, last)",
            f"{number(summary.get('first_train_loss'))}, {number(summary.get('last_train_loss'))}",
        ),
        (
            "validation loss (first, last)",
            f"{number(summary.get('first_validation_loss'))}, {number(summary.get('last_validation_loss'))}",
        ),
        (
            "validation content loss (first, last)",
            f"{number(summary.get('first_validation_content_loss'))}, "
            f"{number(summary.get('last_validation_content_loss'))}",
        ),
        (
            "trainable parameters",
            f"{number(summary.get('trainable_parameters'))} of {number(summary.get('base_parameters'))} ({share})",
        ),
        ("device", f"{summary.get('device', 'n/a')} × {summary.get('processes', 1)}"),
        ("precision", str(summary.get("precision", "n/a"))),
    ]
    settings_rows = [(f"`--{key.replace('_', '-')}`", cell(value)) for key, value in settings.items()]
    return (
        "## Training\n\n"
        + table(("training run", ""), facts)
        + "\n\nSettings (every `train.py` flag, as run):\n\n"
        + table(("flag", "value"), settings_rows)
        + "\n"
    )


def licence_section(base_model: str) -> str:
    return (
        "## License\n\n"
        f"The base model, `{base_model}`, keeps its own licence. The adapter was trained on SAMSum, which is "
        "licensed CC BY-NC-ND 4.0 (non-commercial); as a conservative default the adapter carries the same licence "
        f"(`{LICENSE}`). Whether trained weights are a derivative of their data is unsettled: check before any "
        "commercial use.\n"
    )


def framework_versions() -> str:
    # PEFT's own card updater looks for "- PEFT <version>" under this heading and then leaves the card alone.
    packages = {"PEFT": "peft", "Transformers": "transformers", "PyTorch": "torch"}
    return "### Framework versions\n\n" + "\n".join(f"- {name} {version(pkg)}" for name, pkg in packages.items()) + "\n"


def write_model_card(output_dir: str | Path, training_summary: dict, staging_dir: str | Path | None = None) -> Path:
    """Write README.md in the adapter folder: what it is, how to load it, data, training, no evaluation yet.

    With `staging_dir`, the card is written there (to be moved into `output_dir` later) but still names `output_dir`.
    """
    settings = training_summary.get("settings", {})
    sections = [
        front_matter(settings.get("model", "")),
        introduction(settings),
        usage(settings, str(output_dir)),
        data_section(training_summary, settings),
        training_section(training_summary, settings),
        f"{EVALUATION_HEADING}\n\n{NOT_EVALUATED}\n",
        licence_section(settings.get("model", "")),
        framework_versions(),
    ]
    path = Path(staging_dir or output_dir) / CARD_FILE
    write_atomic(path, "\n".join(sections))
    return path


def metric_row(name: str, base: dict, tuned: dict, difference: dict) -> tuple[str, ...]:
    """One metric as evaluate.py prints it: ROUGE as F1 x 100, the difference with its 95% interval."""
    scale, _ = scale_and_digits(name)  # the card keeps 4 decimals for every metric
    low, high = (scale * bound for bound in difference["ci95"])
    return (
        METRIC_NAMES[name],
        f"{scale * base[name]:.4f}",
        f"{scale * tuned[name]:.4f}",
        f"{scale * difference['mean']:+.4f} [{low:+.4f}, {high:+.4f}]",
        f"{difference['share_not_better']:.1%}",
        f"{difference['win_rate']:.1%}",
    )


def evaluation_section(results: dict) -> str:
    base, tuned, differences = results["base"], results["fine_tuned"], results["difference"]
    rows = [metric_row(name, base, tuned, difference) for name, difference in differences.items()]
    header = ("metric", "base model", "fine-tuned", "difference [95% interval]", "not better", "win rate")
    rouge = "" if "rouge1" not in tuned else "ROUGE is F1 x 100 of the greedy summaries against the references. "
    return (
        f"{EVALUATION_HEADING}\n\n"
        f"On {number(results['n'])} test examples, by `evaluate.py`. The *loss* is the mean cross-entropy per token "
        "of the reference answer (the `Summary:` prefix, the summary and `<|im_end|>`); the *content loss* leaves "
        f"out the fixed prefix. {rouge}The difference is fine-tuned minus base with a paired-bootstrap 95% "
        "interval; *not better* is the share of bootstrap resamples in which the fine-tuned model does not improve "
        "on the base, *win rate* the share of examples on which it is better.\n\n" + table(header, rows) + "\n"
    )


def add_evaluation(adapter_dir: str | Path, results: dict) -> Path:
    """Replace the card's Evaluation section with the metrics (appended if the card has none); idempotent."""
    path = Path(adapter_dir) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = evaluation_section(results) + "\n"
    if EVALUATION_SECTION.search(text):
        text = EVALUATION_SECTION.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    write_atomic(path, text.rstrip("\n") + "\n")
    return path
