"""Scoring models on the test set: losses, greedy summaries, ROUGE, and paired bootstraps between models."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME

from .cli import UsageError, read_json_object
from .prompts import EncodedExample, encode_example, end_of_turn_id, extract_summary, prompt_ids
from .resume_guard import field_values, read_record
from .training import example_loss_sums, length_sorted_batches, model_hidden_states

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_NAMES = {
    "loss": "loss",
    "content_loss": "content loss",
    "perplexity": "perplexity",
    "published_recipe_loss": "published-recipe loss*",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "summary_words": "words",  # ROUGE F1 moves with length: the mean length of the summaries, and the empty ones
    "empty_predictions": "empty",
}
TABLE_COLUMNS = tuple(METRIC_NAMES)
COMPARED = ("loss", "content_loss", *ROUGE_TYPES)  # the metrics a paired bootstrap compares
LOWER_IS_BETTER = {"loss", "content_loss"}
PUBLISHED_RECIPE_NOTE = (
    "published-recipe loss: reconstructed the way the published recipe's README implies (every example padded to "
    "512 tokens, prompt and padding in the mean), to compare with its numbers; not a metric to optimise"
)
DEFAULT_MAX_NEW_TOKENS = 128
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


TRAINING_SUMMARY_FILE = "training_summary.json"
# How an adapter was trained decides how it is scored; these are the values when nothing says otherwise.
DEFAULTS = {"system_prompt": None, "max_length": 512}
FOLLOWED_SETTINGS = tuple(DEFAULTS)


def read_training_summary(adapter_dir: str | Path) -> dict | None:
    """The adapter's training_summary.json written by train.py; None when it has none."""
    return read_json_object(Path(adapter_dir) / TRAINING_SUMMARY_FILE, "a training summary written by train.py")


def trained_settings(adapter_dir: str | Path) -> dict:
    """The FOLLOWED_SETTINGS recorded in the adapter's training_summary.json, or for a checkpoint in its
    resume_settings.json (none when it has neither)."""
    summary = read_training_summary(adapter_dir)
    if summary is not None:
        settings = summary.get("settings", {})
    else:
        settings = field_values(read_record(adapter_dir) or {})
    return {key: settings[key] for key in FOLLOWED_SETTINGS if key in settings}


def follow_training(adapter_dirs: list[str], given: dict) -> dict:
    """The settings (keys of `given`, from FOLLOWED_SETTINGS) to run adapters with: what they were trained with.

    A value given explicitly (not None) wins, with a warning where an adapter was trained otherwise; adapters
    trained with different values are refused unless the flag settles it.
    """
    trained = {folder: trained_settings(folder) for folder in adapter_dirs}
    resolved = {}
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        values = {folder: settings[key] for folder, settings in trained.items() if key in settings}
        if value is not None:
            for folder, trained_value in values.items():
                if trained_value != value:
                    message = f"{flag} {value!r} differs from {trained_value!r}, which {folder} was trained with"
                    warnings.warn(message, stacklevel=3)
            resolved[key] = value
        elif len({json.dumps(trained_value) for trained_value in values.values()}) > 1:
            listed = ", ".join(f"{folder}: {trained_value!r}" for folder, trained_value in values.items())
            raise UsageError(f"the adapters were trained with different {flag} ({listed}); pass {flag} to choose one")
        else:
            resolved[key] = next(iter(values.values()), DEFAULTS[key])
    return resolved


@dataclass
class TestSet:
    """The test records encoded once, so every model sees exactly the same token ids."""

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
    """One model's per-example results on a test set; a part not computed (or not known, for outside predictions)
    is None."""

    losses: np.ndarray | None = None  # mean cross-entropy over each response: `Summary:`, summary, `<|im_end|>`
    label_tokens: np.ndarray | None = None  # response tokens per example: the weights of the corpus loss
    content_losses: np.ndarray | None = None  # the same over the summary text and `<|im_end|>` only
    content_tokens: np.ndarray | None = None
    published_recipe_losses: np.ndarray | None = None  # see published_recipe_losses()
    predictions: list[str] | None = None
    rouge: dict[str, np.ndarray] | None = None  # per-example F1 by ROUGE type

    def compared_metrics(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Per-example values and weights (None: each example counts once) of the metrics a bootstrap compares."""
        metrics = {}
        if self.losses is not None:
            metrics["loss"] = (self.losses, self.label_tokens)
            metrics["content_loss"] = (self.content_losses, self.content_tokens)
        metrics.update({name: (scores, None) for name, scores in (self.rouge or {}).items()})
        return metrics

    def summary(self) -> dict:
        """Corpus values: losses weighted by their tokens, ROUGE averaged over examples."""
        result = {
            name: float(np.average(values, weights=weights))
            for name, (values, weights) in self.compared_metrics().items()
        }
        if "loss" in result:
            result["perplexity"] = math.exp(result["loss"])
        if self.published_recipe_losses is not None:
            result["published_recipe_loss"] = float(self.published_recipe_losses.mean())
        if self.predictions is not None:
            result["summary_words"] = mean_words(self.predictions)
            result["empty_predictions"] = sum(not prediction.strip() for prediction in self.predictions)
        return result

    def example(self, index: int) -> dict:
        result = {name: float(values[index]) for name, (values, _) in self.compared_metrics().items()}
        if self.published_recipe_losses is not None:
            result["published_recipe_loss"] = float(self.published_recipe_losses[index])
        if self.predictions is not None:
            result["prediction"] = self.predictions[index]
        return result


def mean_words(texts: Sequence[str]) -> float:
    return float(np.mean([len(text.split()) for text in texts]))


class OutOfMemoryInPass(RuntimeError):
    """The accelerator ran out of memory on one batch; the message names the pass, the model and the batch shape."""


@contextmanager
def out_of_memory_named(what: str, examples: int, tokens: int):
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise OutOfMemoryInPass(
            f"ran out of memory in {what} on a batch of {examples} examples x {tokens} tokens"
        ) from error


def score_model(
    model,
    tokenizer,
    test_set: TestSet,
    batch_size: int,
    max_new_tokens: int,
    generate: bool,
    name: str,
    published_loss: bool = False,
) -> ModelScores:
    scores = loss_scores(model, tokenizer, test_set.examples, batch_size, name)
    if published_loss:
        scores.published_recipe_losses = published_recipe_losses(model, tokenizer, test_set.examples, batch_size, name)
    if generate:
        scores.predictions = generate_summaries(model, tokenizer, test_set.prompts, max_new_tokens, batch_size, name)
        scores.rouge = rouge_scores(scores.predictions, test_set.references)
    return scores


def _padded(tokenizer, sequences: list[list[int]], side: str, device) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": sequences}, padding_side=side, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


def loss_scores(model, tokenizer, examples: list[EncodedExample], batch_size: int, name: str = "model") -> ModelScores:
    """Per-example response and content losses with their token counts.

    Batch by batch (the same length-sorted batches the training core would make), so that running out of
    memory names the batch's shape.
    """
    sums = np.zeros((2, len(examples)))
    for indices in tqdm(length_sorted_batches([len(e.input_ids) for e in examples], batch_size), desc=f"loss ({name})"):
        batch = [examples[index] for index in indices]
        with out_of_memory_named(f"the loss pass of {name}", len(batch), len(batch[0].input_ids)):
            sums[:, indices] = example_loss_sums(model, batch, tokenizer.pad_token_id, batch_size).numpy()
    label_tokens = np.array([example.num_label_tokens for example in examples])
    content_tokens = np.array([example.num_content_tokens for example in examples])
    return ModelScores(sums[0] / label_tokens, label_tokens, sums[1] / content_tokens, content_tokens)


PUBLISHED_RECIPE_LENGTH = 512


def published_recipe_batch(examples: list[EncodedExample], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Every example cut and right-padded to 512 tokens with the pad token, attention mask 0 on the padding."""
    input_ids = torch.full((len(examples), PUBLISHED_RECIPE_LENGTH), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        ids = example.input_ids[:PUBLISHED_RECIPE_LENGTH]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@torch.inference_mode()
def published_recipe_losses(
    model, tokenizer, examples: list[EncodedExample], batch_size: int, name: str = "model"
) -> np.ndarray:
    """Per-example loss computed the way the published recipe's README implies, for comparison with its numbers.

    Labels equal the padded input ids and the mean runs over all 511 predicted positions: prompt and padding
    included (we assume the recipe left pad labels unmasked, as its 8.3 nats per token suggest). Not a metric to
    optimise. One forward pass per batch; the LM head runs one example at a time to bound the logits' memory.
    """
    head = model.get_output_embeddings()
    losses = np.zeros(len(examples))
    for start in tqdm(range(0, len(examples), batch_size), desc=f"published-recipe loss ({name})"):
        rows = examples[start : start + batch_size]
        batch = published_recipe_batch(rows, tokenizer.pad_token_id, model.device)
        with out_of_memory_named(f"the published-recipe loss pass of {name}", len(rows), PUBLISHED_RECIPE_LENGTH):
            hidden_states = model_hidden_states(model, batch)
            for row in range(len(rows)):
                logits = head(hidden_states[row, :-1].to(head.weight.dtype)).float()
                losses[start + row] = F.cross_entropy(logits, batch["input_ids"][row, 1:]).item()
    return losses


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


def save_generation_config(folder: str | Path, tokenizer, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Path:
    """Write the decoding evaluate.py scores (greedy, no repetition penalty) as `folder/generation_config.json`.

    `GenerationConfig.from_pretrained(folder)` and `from_pretrained` of a merged model then decode as evaluated,
    instead of with the base model's sampling settings.
    """
    greedy_generation_config(tokenizer, max_new_tokens).save_pretrained(folder)
    return Path(folder) / GENERATION_CONFIG_NAME


@torch.inference_mode()
def generate_summaries(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, name: str = "model"
) -> list[str]:
    """Greedy summaries (the `Summary:` prefix removed), in the order of `prompts`."""
    config = greedy_generation_config(tokenizer, max_new_tokens)
    summaries = [""] * len(prompts)
    for indices in tqdm(length_sorted_batches([len(p) for p in prompts], batch_size), desc=f"generate ({name})"):
        batch = _padded(tokenizer, [prompts[i] for i in indices], "left", model.device)
        with out_of_memory_named(f"the generation pass of {name}", *batch["input_ids"].shape):
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
    candidate: np.ndarray,
    reference: np.ndarray,
    lower_is_better: bool,
    samples: int,
    seed: int,
    weights: np.ndarray | None = None,
) -> dict:
    """Candidate minus reference: weighted mean, 95% percentile interval over resampled examples, and win rates.

    `share_not_better` is the share of resamples in which the candidate does not improve on the reference.
    The resampled indices depend only on the seed and the number of examples, so every pair of models compared
    on the same examples is resampled alike.
    """
    difference = candidate - reference
    weights = np.ones_like(difference) if weights is None else np.asarray(weights, dtype=float)
    resampled = np.random.default_rng(seed).integers(0, len(difference), size=(samples, len(difference)))
    means = (difference * weights)[resampled].sum(axis=1) / weights[resampled].sum(axis=1)
    return bootstrap_summary(means, difference, weights, lower_is_better)


def bootstrap_summary(means: np.ndarray, difference: np.ndarray, weights: np.ndarray, lower_is_better: bool) -> dict:
    """The reported figures of resampled mean differences `means` and the per-example `difference`."""
    low, high = np.percentile(means, [2.5, 97.5])
    not_better = means >= 0 if lower_is_better else means <= 0
    return {
        "mean": float(np.average(difference, weights=weights)),
        "ci95": [float(low), float(high)],
        "share_not_better": float(not_better.mean()),
        **win_and_tie_rates(difference, lower_is_better),
    }


def win_and_tie_rates(difference: np.ndarray, lower_is_better: bool) -> dict:
    """The shares of examples whose per-example `difference` is an improvement, and a tie."""
    wins = difference < 0 if lower_is_better else difference > 0
    return {"win_rate": float(wins.mean()), "tie_rate": float((difference == 0).mean())}


def compare_models(reference: ModelScores, candidate: ModelScores, samples: int, seed: int) -> dict:
    """Paired bootstrap of candidate minus reference for each metric both have (losses token-weighted)."""
    references = reference.compared_metrics()
    return {
        name: paired_bootstrap(
            values, references[name][0], name in LOWER_IS_BETTER, samples=samples, seed=seed, weights=weights
        )
        for name, (values, weights) in candidate.compared_metrics().items()
        if name in references
    }


def comparison_plan(names: list[str], base: str | None) -> list[tuple[str, str]]:
    """(candidate, reference) pairs: every model against the base, and every later model against the first
    non-base one (the reference run)."""
    others = [name for name in names if name != base]
    pairs = [(name, base) for name in others] if base in names else []
    return pairs + [(name, others[0]) for name in others[1:]]


def scale_and_digits(metric: str) -> tuple[int, int]:
    """Losses in nats per token with 4 decimals; ROUGE as F1 x 100 with 2."""
    return (1, 4) if "loss" in metric else (100, 2)


def aligned(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        ).rstrip()
        for row in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


PLAIN_FORMATS = {"perplexity": "{:.4g}", "summary_words": "{:.1f}", "empty_predictions": "{:,}"}


def table_cell(metric: str, value) -> str:
    if value is None:
        return ""
    if metric in PLAIN_FORMATS:
        return PLAIN_FORMATS[metric].format(value)
    scale, digits = scale_and_digits(metric)
    return f"{scale * value:.{digits}f}"


def format_models(summaries: dict[str, dict]) -> str:
    """One row per model; losses in nats per token, ROUGE as F1 x 100."""
    columns = [name for name in TABLE_COLUMNS if any(name in summary for summary in summaries.values())]
    rows = [("model", *(METRIC_NAMES[name] for name in columns))]
    for model, summary in summaries.items():
        cells = [table_cell(name, summary.get(name)) for name in columns]
        rows.append((model, *cells))
    table = aligned(rows)
    if "published_recipe_loss" in columns:
        table += f"\n* {PUBLISHED_RECIPE_NOTE}"
    return table


def format_comparison(comparison: dict) -> str:
    """One comparison's differences with their 95% interval, share not better, and win rate; between arms of several
    seeds also the interval's degrees of freedom and the share of seed pairs (one seed of each arm) in which the
    candidate is better: a count over pairs, not a probability."""
    seeds = any("seed_pairs_better" in difference for difference in comparison["difference"].values())
    seed_columns = ["df", "seed pairs better"] * seeds
    rows = [("metric", "difference", "95% interval", "not better", "win rate", *seed_columns)]
    for name, difference in comparison["difference"].items():
        scale, digits = scale_and_digits(name)
        low, high = (scale * bound for bound in difference["ci95"])
        rows.append(
            (
                METRIC_NAMES[name],
                f"{scale * difference['mean']:+.{digits}f}",
                f"[{low:+.{digits}f}, {high:+.{digits}f}]",
                f"{difference['share_not_better']:.1%}",
                f"{difference['win_rate']:.1%}",
                *([f"{difference['df']:.1f}", f"{difference['seed_pairs_better']:.1%}"] if seeds else []),
            )
        )
    return f"{comparison['model']} minus {comparison['against']}:\n{aligned(rows)}"


def format_arms(arms: dict[str, dict]) -> str:
    """One row per arm of several seeds: the mean over seeds +- their standard deviation."""
    columns = list(next(iter(arms.values()))["mean"])
    rows = [("arm (mean +- sd over seeds)", "seeds", *(METRIC_NAMES[name] for name in columns))]
    for name, arm in arms.items():
        cells = []
        for metric in columns:
            scale, digits = scale_and_digits(metric)
            cells.append(f"{scale * arm['mean'][metric]:.{digits}f} +- {scale * arm['std'][metric]:.{digits}f}")
        rows.append((name, ",".join(map(str, arm["seeds"])), *cells))
    return aligned(rows)


def format_report(
    summaries: dict[str, dict],
    comparisons: list[dict],
    arms: dict[str, dict] | None = None,
    reference_words: float | None = None,
    seed_note: str = "",
) -> str:
    """The models' table (with the references' mean length), the arms' table, the comparisons, the seed note."""
    models = format_models(summaries)
    if reference_words is not None:
        models += f"\nreferences: {reference_words:.1f} words on average"
    parts = [models, *([format_arms(arms)] if arms else []), *map(format_comparison, comparisons)]
    return "\n\n".join(parts + ([f"note: {seed_note}"] if seed_note else []))


def chart_png(summaries: dict[str, dict], comparisons: list[dict], arms: dict[str, dict] | None = None) -> bytes:
    """chart_figure as PNG bytes, so the caller can write them atomically."""
    buffer = io.BytesIO()
    chart_figure(summaries, comparisons, arms).savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def chart_figure(summaries: dict[str, dict], comparisons: list[dict], arms: dict[str, dict] | None = None) -> Figure:
    """One panel per compared metric. Each arm (each model where there are no arms) is a column: a dot per seed
    (row), a line at the arm's mean and, for arms compared with the reference, the 95% interval of that difference
    drawn around the arm's mean. The reference is comparison_plan's: the first arm after the base where there are
    several, else the base."""
    names = list(dict.fromkeys(name for c in comparisons for name in (c["against"], c["model"]))) or list(summaries)
    seeds = seed_summaries(names, summaries, comparisons, arms or {})
    reference = comparisons[-1]["against"] if comparisons else names[0]  # see comparison_plan
    against = {c["model"]: c["difference"] for c in comparisons if c["against"] == reference}
    metrics = [name for name in METRIC_NAMES if name in COMPARED and name in seeds[names[0]][0]]
    figure = Figure(figsize=(max(4.5, (1.2 + 0.6 * len(names)) * len(metrics)), 3.8), layout="constrained")
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axes, metric in zip(panels, metrics, strict=True):
        scale, _ = scale_and_digits(metric)
        for position, name in enumerate(names):
            colour = CHART_COLOURS[position % len(CHART_COLOURS)]
            values = [scale * seed[metric] for seed in seeds[name]]
            axes.scatter([position - 0.1] * len(values), values, s=14, color=colour, alpha=0.7, zorder=2)
            mean = float(np.mean(values))
            axes.plot([position - 0.25, position + 0.25], [mean, mean], color=colour, linewidth=2.5, zorder=3)
            if metric in against.get(name, {}):
                difference = against[name][metric]
                low, high = (scale * bound - scale * difference["mean"] for bound in difference["ci95"])
                whisker = np.maximum(0, [[-low], [high]])
                axes.errorbar([position + 0.12], [mean], yerr=whisker, fmt="none", capsize=5, color="black", zorder=4)
        labels = [f"{name}\n(reference)" if name == reference else name for name in names]
        axes.set_xticks(range(len(names)), labels, rotation=20 if len(names) > 2 else 0, fontsize=8)
        axes.set_xlim(-0.6, len(names) - 0.4)
        unit = " (lower is better)" if "loss" in metric else " F1 x100"
        axes.set_title(f"{METRIC_NAMES[metric]}{unit}", fontsize=9)
    figure.suptitle(
        f"Dots: seeds; lines: means; whiskers: 95% interval of the difference from {reference}", fontsize=10
    )
    return figure


def seed_summaries(names: list[str], summaries: dict, comparisons: list[dict], arms: dict) -> dict[str, list[dict]]:
    """Each arm's seeds' summaries: the rows `arms` lists for an arm of several (the study's `arms`), or the row of
    the arm's name. An arm of one row named by its settings is in neither: its value is the mean of the arm it was
    compared with (the base) plus the difference."""
    seeds = {}
    for name in names:
        if name in arms:
            seeds[name] = [summaries[row] for row in arms[name]["models"]]
        elif name in summaries:
            seeds[name] = [summaries[name]]
        else:
            compared = next(c for c in comparisons if c["model"] == name and c["against"] in seeds)
            other = seeds[compared["against"]]
            means = {metric: np.mean([seed[metric] for seed in other]) for metric in compared["difference"]}
            seeds[name] = [{metric: means[metric] + value["mean"] for metric, value in compared["difference"].items()}]
    return seeds


CHART_COLOURS = ["#9e9e9e", "#3b75af", "#e1812c", "#3a923a", "#c03d3e", "#9372b2", "#845b53"]
