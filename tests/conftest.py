"""Offline test rig: a tiny random-weight Qwen2 model, its tokenizer, and synthetic SAMSum files.

The tokenizer is the real Qwen2.5 one when `QWEN_TOKENIZER_DIR` (or ../shared/qwen2.5-1.5b-instruct)
exists; otherwise a small byte-level BPE carrying Qwen's special tokens and a ChatML template.
"""

from __future__ import annotations

import os

# The test models are tiny: one thread is faster than two, and immune to OpenMP spin-waits when the
# cores are shared (2 threads made a tiny training step 7x slower on a busy 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from lora_summarization.cli import run_stage
from lora_summarization.synthetic import make_examples, write_samsum_csvs

# The `slurm_cluster` fixture: a real one-node SLURM cluster (root and Debian's slurm packages).
pytest_plugins = ["slurm_cluster"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_QWEN_DIR = ROOT.parent / "shared" / "qwen2.5-1.5b-instruct"
QWEN_DIR = Path(os.environ.get("QWEN_TOKENIZER_DIR") or SHARED_QWEN_DIR)

CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def real_qwen_tokenizer_dir() -> Path | None:
    return QWEN_DIR if (QWEN_DIR / "vocab.json").exists() else None


requires_qwen_tokenizer = pytest.mark.skipif(
    real_qwen_tokenizer_dir() is None, reason="real Qwen2.5 tokenizer not available (set QWEN_TOKENIZER_DIR)"
)


def build_fallback_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [ex["dialogue"] + "\n" + ex["summary"] for ex in make_examples(300, seed=123)]
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )


def load_test_tokenizer():
    qwen_dir = real_qwen_tokenizer_dir()
    return AutoTokenizer.from_pretrained(qwen_dir) if qwen_dir else build_fallback_tokenizer()


def save_tiny_model(folder: Path, tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A small Qwen2 (2 layers unless told) with random weights, saved with its tokenizer as an ordinary HF model
    folder.

    Weights are drawn wider than Qwen's 0.02 so that a LoRA adapter on q/k/v/o can move the logits far
    enough for the loss to fall visibly within a few dozen steps.
    """
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        initializer_range=0.2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), tokenizer)


@pytest.fixture(scope="session")
def samsum_dir(tmp_path_factory) -> Path:
    """Synthetic SAMSum CSVs: 200 train, 120 validation, 60 test rows."""
    return write_samsum_csvs(tmp_path_factory.mktemp("samsum"))


def script_env() -> dict[str, str]:
    """The environment of a script run as a user would run it here: offline, the project importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def run_script(script: str, *args, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage script as a user would, offline, and capture its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd or ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


STAGE_CONFIGS = {
    "data_preparation.py": "DataConfig",
    "unit_test.py": "UnitTestConfig",
    "train.py": "TrainConfig",
    "evaluate.py": "EvalConfig",
}
# study.py runs the stages above; its --config file also holds train.py settings, so it is not one of them.
SCRIPT_CONFIGS = {**STAGE_CONFIGS, "study.py": "StudyConfig"}


def run_in_process(script: str, *args) -> subprocess.CompletedProcess:
    """A stage through its own `run_stage` entry point in this process, with stdout and stderr captured: what
    run_script does without the ~10 s of imports a new process costs here. What needs a process of its own
    (signals, kills, torchrun, warnings on a command's stderr) uses run_script."""
    module = load_script(script)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run_stage(module.main, getattr(module, SCRIPT_CONFIGS[script]), [str(arg) for arg in args])
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def write_data_dir(folder: Path, sizes: dict[str, int] | None = None) -> Path:
    """The four record files of data_preparation.py, written directly from synthetic examples."""
    from lora_summarization import data

    sizes = sizes or {data.TRAIN_FILE: 64, data.VALIDATION_FILE: 16, data.TEST_FILE: 12, data.UNIT_TEST_FILE: 40}
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for seed, (name, n) in enumerate(sizes.items()):
        examples = make_examples(n, seed=100 + seed, start=start)
        records = [data.make_record(ex["id"], ex["dialogue"], ex["summary"]) for ex in examples]
        (folder / name).write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
        start += n
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def study_data_dir(tmp_path_factory):
    """20 unseen test dialogues, the fewest --compare accepts."""
    from lora_summarization import data

    folder = tmp_path_factory.mktemp("study-data")
    records = [data.make_record(e["id"], e["dialogue"], e["summary"]) for e in make_examples(20, seed=321)]
    (folder / data.TEST_FILE).write_text(json.dumps(records), encoding="utf-8")
    return folder


def load_script(name: str):
    """Import a stage script (e.g. train.py) as a module, to call its main() in-process."""
    # A prefixed module name, so evaluate.py cannot shadow an installed package called `evaluate`.
    spec = importlib.util.spec_from_file_location("stage_" + name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# A learning rate far above the published 5e-5: the tiny random model must learn within seconds.
TINY_TRAINING_FLAGS = ("--learning-rate", "1e-2", "--warmup-steps", "0", "--batch-size", "4", "--grad-accum", "2")


@pytest.fixture(scope="session")
def trained_adapter_dir(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    """An adapter trained by train.py on the synthetic data, so that its loss and summaries improve."""
    output_dir = tmp_path_factory.mktemp("fine_tuned_model")
    result = run_in_process(
        "train.py",
        *("--model", tiny_model_dir, "--data-dir", data_dir, "--output-dir", output_dir),
        *("--max-steps", "80", "--eval-steps", "40", "--save-steps", "40", "--logging-steps", "5"),
        *TINY_TRAINING_FLAGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir
