"""Calibration of the interval between arms of seeds: coverage and width, by simulation, in every regime.

    python benchmarks/interval_calibration.py                      # ~10 s on 2 CPU cores
    python benchmarks/interval_calibration.py --replications 20000 --bootstrap-replications 1000

Each regime simulates two arms on the same test examples, Y[s, i] = m + u(i) + v(s) + e(s, i) (example effect,
seed effect, seed x example interaction; see comparison.difference_variance), with a known difference of the arms'
means, and scores two intervals of it: the project's (comparison.difference_variance and its t quantile) and the
two-level bootstrap it replaced (a reference copy below). Coverage is the share of replications whose interval
holds the true difference; its target is 0.95. The width ratio is the mean width over the mean width the
interval's own quantile gives with the true standard error (for the t interval 2 t(0.975, its df) x true SE, for
the bootstrap's percentiles 2 x 1.96 x true SE); its target is 1. Prints one JSON object.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable
from lora_summarization.cli import UsageError, json_text, run_stage  # noqa: E402
from lora_summarization.comparison import difference_variance  # noqa: E402

EXAMPLE_SD = 2.0  # the test dialogues' own spread, shared by both arms


@dataclass(frozen=True)
class Regime:
    seeds: tuple[int, int]  # candidate, reference
    seed_sd: float  # v: each training seed's shift of the arm's mean
    interaction_sd: float  # e: each seed's own per-example deviation
    effect_sd: float = 0.0  # the candidate's true per-dialogue effect: mean `difference`, this spread
    difference: float = 0.0
    heavy_tailed: bool = False  # example effects and interaction drawn from t with 3 degrees of freedom
    base: bool = False  # the reference is the base model: one deterministic row, u(i) alone
    token_weighted: bool = False  # examples weighted by token counts (5 to 60), as the losses are


REGIMES = {
    "seed-dominated, 3 v 3": Regime((3, 3), 1.0, 1.0),
    "seed-dominated, 5 v 5": Regime((5, 5), 1.0, 1.0),
    "seed-dominated, 10 v 10": Regime((10, 10), 1.0, 1.0),
    "interaction-dominated, 3 v 3": Regime((3, 3), 0.5, 10.0),
    "interaction-dominated, 5 v 5": Regime((5, 5), 0.3, 10.0),
    "interaction-dominated, 10 v 10": Regime((10, 10), 0.3, 5.0),
    "per-dialogue effects of either sign, 5 v 5": Regime((5, 5), 0.5, 2.0, effect_sd=5.0, difference=0.5),
    "heavy-tailed examples, 5 v 5": Regime((5, 5), 0.5, 5.0, heavy_tailed=True),
    "unequal seeds, 3 v 8": Regime((3, 8), 0.5, 5.0),
    "unequal seeds, seed-dominated, 3 v 8": Regime((3, 8), 1.0, 1.0),
    "arm against the base, 5 v 1": Regime((5, 1), 0.5, 5.0, difference=1.0, base=True),
    "token-weighted, 5 v 5": Regime((5, 5), 0.5, 5.0, token_weighted=True),
}


@dataclass
class CalibrationConfig:
    replications: int = field(default=2000, metadata={"help": "simulated studies per regime for the t interval"})
    bootstrap_replications: int = field(default=300, metadata={"help": "studies per regime for the bootstrap"})
    samples: int = field(default=200, metadata={"help": "resamples of each two-level bootstrap"})
    examples: int = field(default=150, metadata={"help": "test examples per simulated study"})
    seed: int = field(default=0, metadata={"help": "seed of the simulation"})


@dataclass
class Simulated:
    candidate: np.ndarray  # (replications, seeds, examples)
    reference: np.ndarray
    weights: np.ndarray  # (examples,)
    true_se: float  # of the difference of the arms' means, from the simulated components


def simulate(regime: Regime, replications: int, examples: int, rng: np.random.Generator) -> Simulated:
    def draw(shape, sd):
        if regime.heavy_tailed:
            return rng.standard_t(3, shape) * sd / math.sqrt(3)  # t(3) has variance 3
        return rng.normal(0, sd, shape)

    seeds, reference_seeds = regime.seeds
    shared = draw((replications, 1, examples), EXAMPLE_SD)
    effect = regime.difference + rng.normal(0, regime.effect_sd, (replications, 1, examples))

    def arm(seeds):
        return rng.normal(0, regime.seed_sd, (replications, seeds, 1)) + draw(
            (replications, seeds, examples), regime.interaction_sd
        )

    candidate = shared + effect + arm(seeds)
    reference = shared if regime.base else shared + arm(reference_seeds)
    weights = rng.integers(5, 61, examples).astype(float) if regime.token_weighted else np.ones(examples)
    seeded = [seeds] if regime.base else [seeds, reference_seeds]
    example_factor = (weights**2).sum() / weights.sum() ** 2  # 1/n unweighted
    variance = example_factor * (regime.effect_sd**2 + sum(regime.interaction_sd**2 / k for k in seeded))
    variance += sum(regime.seed_sd**2 / k for k in seeded)
    return Simulated(candidate, reference, weights, math.sqrt(variance))


def calibration(covered: np.ndarray, widths: np.ndarray, reference_widths: np.ndarray) -> dict:
    coverage = float(covered.mean())
    return {
        "coverage": coverage,
        "coverage_mc_se": math.sqrt(0.95 * 0.05 / len(covered)),
        "width_ratio": float(widths.mean() / reference_widths.mean()),
        "replications": len(covered),
    }


def regime_rng(regime: Regime, seed: int) -> np.random.Generator:
    """A stream of its own for each regime, so that a regime's numbers do not depend on which others run."""
    return np.random.default_rng([seed, list(REGIMES.values()).index(regime)])


def variance_components_calibration(regime: Regime, replications: int, examples: int, seed: int) -> dict:
    """The project's interval: D +- t(0.975, df) sqrt(V), all replications at once."""
    simulated = simulate(regime, replications, examples, regime_rng(regime, seed))
    difference, variance, degrees = difference_variance(simulated.candidate, simulated.reference, simulated.weights)
    quantile = student_t.ppf(0.975, degrees)
    half_widths = quantile * np.sqrt(variance)
    covered = np.abs(difference - regime.difference) <= half_widths
    result = calibration(covered, 2 * half_widths, 2 * quantile * simulated.true_se)
    return {**result, "median_df": float(np.median(degrees))}


def two_level_bootstrap_calibration(regime: Regime, replications: int, examples: int, samples: int, seed: int) -> dict:
    rng = regime_rng(regime, seed)
    simulated = simulate(regime, replications, examples, rng)
    intervals = np.array(
        [
            two_level_bootstrap_interval(candidate, reference, samples, rng, simulated.weights)
            for candidate, reference in zip(simulated.candidate, simulated.reference, strict=True)
        ]
    )
    covered = (intervals[:, 0] <= regime.difference) & (regime.difference <= intervals[:, 1])
    widths = intervals[:, 1] - intervals[:, 0]
    return calibration(covered, widths, np.full(replications, 2 * norm.ppf(0.975) * simulated.true_se))


def two_level_bootstrap_interval(candidate, reference, samples: int, rng, weights) -> np.ndarray:
    """The 95% interval evaluate.py gave before the variance components, kept only to measure it: test examples
    resampled (one draw for both arms) and, inside them, each arm's seeds resampled, widened by sqrt(k/(k-1))."""
    count = candidate.shape[1]
    resampled = rng.integers(0, count, size=(samples, count))
    differences = resampled_seed_means(candidate, rng, samples) - resampled_seed_means(reference, rng, samples)
    means = np.take_along_axis(differences * weights, resampled, axis=1).sum(axis=1) / weights[resampled].sum(axis=1)
    return np.percentile(means, [2.5, 97.5])


def resampled_seed_means(scores: np.ndarray, rng, samples: int) -> np.ndarray:
    seeds = len(scores)
    if seeds == 1:
        return scores
    centre = scores.mean(axis=0)
    widened = centre + math.sqrt(seeds / (seeds - 1)) * (scores - centre)
    drawn = rng.integers(0, seeds, size=(samples, seeds))
    counts = (drawn[:, :, None] == np.arange(seeds)).sum(axis=1)
    return counts @ widened / seeds


def main(config: CalibrationConfig) -> int:
    if min(config.replications, config.bootstrap_replications, config.samples) < 1 or config.examples < 2:
        raise UsageError("--replications, --bootstrap-replications and --samples must be at least 1, --examples 2")
    report = {
        "examples": config.examples,
        "variance_components": {
            name: variance_components_calibration(regime, config.replications, config.examples, config.seed)
            for name, regime in REGIMES.items()
        },
        "two_level_bootstrap": {
            name: two_level_bootstrap_calibration(
                regime, config.bootstrap_replications, config.examples, config.samples, config.seed
            )
            for name, regime in REGIMES.items()
        },
    }
    print(json_text(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, CalibrationConfig))
