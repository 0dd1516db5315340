"""Scoring a model on the test set: response loss, greedy summaries, ROUGE, and a paired bootstrap of two models."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .prompts import EncodedExample, encode_example, end_of_turn_id, extract_summary, prompt_ids
from .training import example_loss_sums, length_sorted_batches

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_NAMES = {
    "loss": "loss",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
}
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class TestSet:
    """The test records encoded once, so both models see exactly the same token ids."""

    examples: list[EncodedExample]
    prompts: list[list[int]]
    references: list[str]


def encode_test_set(tokenizer, records: list[dict], max_length: int, system_prompt: str | None) -> TestSet:
    return TestSet(
        examples=[encode_example(tokenizer, r["dialogue"], r["summary"], max_length, system_prompt) for r in records],
        prompts=[prompt_ids(tokenizer, r["dialogue"], system_prompt) for r in records],
        references=[r["summary"] for r in records],
    )


@dataclass
class ModelScores:
    """One model's per-example results on a test set."""

    losses: np.ndarray  # mean cross-entropy over each example's response tokens
    label_tokens: np.ndarray  # response tokens per example: the weights of the corpus loss
    predictions: list[str] | None = None
    rouge: dict[str, np.ndarray] | None = None  # per-example F1 by ROUGE type

    @property
    def corpus_loss(self) -> float:
        return float(np.average(self.losses, weights=self.label_tokens))

    def summary(self) -> dict:
        means = {name: float(scores.mean()) for name, scores in (self.rouge or {}).items()}
        return {"loss": self.corpus_loss, "perplexity": math.exp(self.corpus_loss), **means}

    def example(self, index: int) -> dict:
        result = {"loss": float(self.losses[index])}
        if self.predictions is not None:
            result["prediction"] = self.predictions[index]
            result.update({name: float(scores[index]) for name, scores in self.rouge.items()})
        return result


def score_model(
    model, tokenizer, test_set: TestSet, batch_size: int, max_new_tokens: int, generate: bool, name: str
) -> ModelScores:
    losses, label_tokens = response_losses(model, tokenizer, test_set.examples, batch_size, desc=f"loss ({name})")
    if not generate:
        return ModelScores(losses, label_tokens)
    predictions = generate_summaries(
        model, tokenizer, test_set.prompts, max_new_tokens, batch_size, desc=f"generate ({name})"
    )
    return ModelScores(losses, label_tokens, predictions, rouge_scores(predictions, test_set.references))


def _padded(tokenizer, sequences: list[list[int]], side: str, device) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": sequences}, padding_side=side, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


def response_losses(
    model, tokenizer, examples: list[EncodedExample], batch_size: int, desc: str = "loss"
) -> tuple[np.ndarray, np.ndarray]:
    """(mean cross-entropy over the response tokens, number of response tokens) per example."""
    sums = example_loss_sums(model, examples, tokenizer.pad_token_id, batch_size, desc).numpy()
    counts = np.array([example.num_label_tokens for example in examples])
    return sums[0] / counts, counts


def greedy_generation_config(tokenizer, max_new_tokens: int) -> GenerationConfig:
    # generate() fills every field left unset from the model's own generation config. Qwen's samples
    # (temperature 0.7, top_p 0.8, top_k 20) and penalises repeats (1.1, applied even when greedy, and
    # summaries repeat the dialogue's names): set the neutral values explicitly.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=end_of_turn_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


@torch.inference_mode()
def generate_summaries(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str = "generate"
) -> list[str]:
    """Greedy summaries (the `Summary:` prefix removed), in the order of `prompts`."""
    config = greedy_generation_config(tokenizer, max_new_tokens)
    summaries = [""] * len(prompts)
    for indices in tqdm(length_sorted_batches([len(p) for p in prompts], batch_size), desc=desc):
        batch = _padded(tokenizer, [prompts[i] for i in indices], "left", model.device)
        generated = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :]
        for index, text in zip(indices, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
            summaries[index] = extract_summary(text)
    return summaries


def split_sentences(text: str) -> str:
    """One sentence per line, as ROUGE-Lsum expects, without nltk's downloadable sentence model."""
    return "\n".join(sentence for sentence in SENTENCE_BREAK.split(text.strip()) if sentence)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE F1 (rouge_score with stemming) for each of ROUGE_TYPES."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [
        scorer.score(split_sentences(reference), split_sentences(prediction))
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    return {name: np.array([score[name].fmeasure for score in scores]) for name in ROUGE_TYPES}


def paired_bootstrap(
    fine_tuned: np.ndarray,
    base: np.ndarray,
    lower_is_better: bool,
    samples: int,
    seed: int,
    weights: np.ndarray | None = None,
) -> dict:
    """Fine-tuned minus base: weighted mean, 95% percentile interval over resampled examples, and win rates.

    `share_not_better` is the share of resamples in which the fine-tuned model does not improve on the base.
    """
    difference = fine_tuned - base
    weights = np.ones_like(difference) if weights is None else np.asarray(weights, dtype=float)
    resampled = np.random.default_rng(seed).integers(0, len(difference), size=(samples, len(difference)))
    means = (difference * weights)[resampled].sum(axis=1) / weights[resampled].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    not_better = means >= 0 if lower_is_better else means <= 0
    wins = difference < 0 if lower_is_better else difference > 0
    return {
        "mean": float(np.average(difference, weights=weights)),
        "ci95": [float(low), float(high)],
        "share_not_better": float(not_better.mean()),
        "win_rate": float(wins.mean()),
        "tie_rate": float((difference == 0).mean()),
    }


def compare_models(base: ModelScores, fine_tuned: ModelScores, samples: int, seed: int) -> dict:
    """Paired bootstrap of fine-tuned minus base for the token-weighted loss and each ROUGE type."""
    differences = {
        "loss": paired_bootstrap(
            fine_tuned.losses, base.losses, lower_is_better=True, samples=samples, seed=seed, weights=base.label_tokens
        )
    }
    for name in fine_tuned.rouge or {}:
        differences[name] = paired_bootstrap(
            fine_tuned.rouge[name], base.rouge[name], lower_is_better=False, samples=samples, seed=seed
        )
    return differences


def format_table(base: dict, fine_tuned: dict, differences: dict) -> str:
    """Base, fine-tuned and their difference per metric; ROUGE as F1 x 100."""
    rows = [("metric", "base", "fine-tuned", "difference", "95% interval", "not better", "win rate")]
    for name, difference in differences.items():
        scale, digits = (1, 4) if name == "loss" else (100, 2)
        low, high = (scale * bound for bound in difference["ci95"])
        rows.append(
            (
                METRIC_NAMES[name],
                f"{scale * base[name]:.{digits}f}",
                f"{scale * fine_tuned[name]:.{digits}f}",
                f"{scale * difference['mean']:+.{digits}f}",
                f"[{low:+.{digits}f}, {high:+.{digits}f}]",
                f"{difference['share_not_better']:.1%}",
                f"{difference['win_rate']:.1%}",
            )
        )
    rows.append(("perplexity", f"{base['perplexity']:.4g}", f"{fine_tuned['perplexity']:.4g}", "", "", "", ""))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        ).rstrip()
        for row in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def save_chart(base: dict, fine_tuned: dict, differences: dict, path: Path) -> None:
    """One panel per metric with both models' bars; the fine-tuned whisker is the base plus the 95% interval."""
    figure = Figure(figsize=(max(4.5, 2.8 * len(differences)), 3.8), layout="constrained")
    panels = figure.subplots(1, len(differences), squeeze=False)[0]
    for axes, (name, difference) in zip(panels, differences.items(), strict=True):
        scale = 1 if name == "loss" else 100
        low, high = (scale * bound for bound in difference["ci95"])
        axes.bar(["base", "fine-tuned"], [scale * base[name], scale * fine_tuned[name]], color=["#9e9e9e", "#3b75af"])
        mean = scale * difference["mean"]
        whisker = np.maximum(0, [[mean - low], [high - mean]])
        axes.errorbar([1], [scale * fine_tuned[name]], yerr=whisker, fmt="none", capsize=6, color="black")
        unit = " (lower is better)" if name == "loss" else " F1 x100"
        axes.set_title(f"{METRIC_NAMES[name]}{unit}\n{mean:+.3g} [{low:+.3g}, {high:+.3g}]", fontsize=9)
    figure.suptitle("Fine-tuned minus base (95% paired-bootstrap interval)", fontsize=10)
    figure.savefig(path, dpi=120)
