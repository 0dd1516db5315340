"""Arms of seeds: grouping adapters by their training settings, and the two-level bootstrap proven by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_summarization.comparison import group_arms, seed_note, arm_difference
from lora_summarization.evaluation import paired_bootstrap


@pytest.mark.parametrize("lower_is_better", [False, True])
def test_one_seed_per_arm_is_exactly_the_paired_bootstrap(lower_is_better):
    rng = np.random.default_rng(3)
    candidate, reference, tokens = rng.normal(0.1, 1, 50), rng.normal(0, 1, 50), rng.integers(5, 40, 50)
    expected = paired_bootstrap(candidate, reference, lower_is_better, samples=300, seed=11, weights=tokens)
    assert arm_difference(candidate[None], reference[None], lower_is_better, 300, 11, tokens) == expected


def simulated_arms(rng, seeds: int, examples: int) -> list[np.ndarray]:
    """Two arms with no true difference: a shared example effect (sd 2), a seed effect (sd 1) per arm and seed,
    and noise (sd 1) per seed and example."""
    example_effect = rng.normal(0, 2, examples)
    return [rng.normal(0, 1, (seeds, 1)) + example_effect + rng.normal(0, 1, (seeds, examples)) for _ in range(2)]


def t_coverage(degrees: int, z: float = 1.959964) -> float:
    """P(|T| < z) for Student's t, by Simpson's rule on its density."""
    x = np.linspace(0, z, 2001)
    scale = math.exp(math.lgamma((degrees + 1) / 2) - math.lgamma(degrees / 2)) / math.sqrt(degrees * math.pi)
    density = scale * (1 + x**2 / degrees) ** (-(degrees + 1) / 2)
    step = x[1] - x[0]
    return 2 * step / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())


def test_two_level_interval_of_a_zero_difference_covers_zero_as_its_theory_says_and_example_only_does_not():
    seeds, replications = 5, 2000
    rng = np.random.default_rng(0)
    two_level = example_only = 0
    for replication in range(replications):
        candidate, reference = simulated_arms(rng, seeds, examples=20)
        low, high = arm_difference(candidate, reference, False, samples=200, seed=replication)["ci95"]
        two_level += low <= 0 <= high
        low, high = paired_bootstrap(candidate.mean(0), reference.mean(0), False, 200, replication)["ci95"]
        example_only += low <= 0 <= high
    # The seed spread is known from 2 x (5 - 1) = 8 degrees of freedom, so a 1.96-wide interval covers like a t(8)
    # one: 91.4%, not 95%. Tolerance 0.02, three Monte Carlo standard errors at 2,000 replications; without the
    # sqrt(k/(k-1)) widening the coverage is ~88.9% and fails.
    assert two_level / replications == pytest.approx(t_coverage(2 * (seeds - 1)), abs=0.02)
    assert example_only / replications < 0.5  # ~31%: test dialogues alone say nothing of seed noise


def test_adapters_equal_but_for_the_seed_form_an_arm_named_by_what_tells_arms_apart():
    def settings(learning_rate, seed, **more):
        return {"learning_rate": learning_rate, "lora_r": 8, "seed": seed, "output_dir": f"run_{seed}", **more}

    arms = group_arms(
        {
            "a42": settings(5e-5, 42),
            "a43": settings(5e-5, 43, resume=True),
            "b42": settings(1e-4, 42),
            "b43": settings(1e-4, 43),
            "b44": settings(1e-4, 44),
            "c42": settings(1e-4, 42, use_dora=True),
            "outside": None,
        }
    )
    assert arms == {
        "learning_rate=5e-05, use_dora=None": ["a42", "a43"],
        "learning_rate=0.0001, use_dora=None": ["b42", "b43", "b44"],
        "learning_rate=0.0001, use_dora=True": ["c42"],
        "outside": ["outside"],
    }
    assert group_arms({"a": settings(5e-5, 42), "b": settings(1e-4, 42)}) == {"a": ["a"], "b": ["b"]}
    assert group_arms({"a": settings(5e-5, 42), "b": settings(5e-5, 43)}) == {"fine_tuned": ["a", "b"]}


def test_seed_note_names_arms_without_seed_variance_and_those_with_optimistic_intervals():
    note = seed_note({"base": ["base"], "one": ["x"], "three": ["a", "b", "c"], "five": list("abcde")})
    assert "cannot include seed variance for arms with under 3 seeds: one (1)" in note
    assert "optimistic for arms with 3-4 seeds" in note and "three (3)" in note and "five" not in note
    assert seed_note({"base": ["base"], "five": list("abcde")}) == ""
