"""SAMSum-format synthetic dialogues for tests and benchmarks (the project ships no SAMSum text).

Each summary is determined by the dialogue (who meets whom, where, when), so a model can learn it;
optional small-talk turns stretch dialogues to SAMSum's length distribution.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

NAMES = ["Anna", "Tom", "Maria", "John", "Kate", "Peter", "Lucy", "Mark", "Eve", "Adam", "Olga", "Sam"]
PLACES = ["park", "cinema", "library", "station", "cafe", "office", "gym", "museum"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SMALL_TALK = [
    "How was your weekend?",
    "Pretty good, I watched a movie <file_photo>",
    "Did you finish the report?",
    "Almost, I need one more hour.",
    "Haha ok 😂",
    "I'm stuck in traffic again",
    "Tell me about it & the weather is awful",
    "Can you send me the link?",
]


def make_example(rng: random.Random, index: int, small_talk_turns: int = 0) -> dict:
    first, second = rng.sample(NAMES, 2)
    place, day = rng.choice(PLACES), rng.choice(DAYS)
    turns = [f"{first}: Hi {second}, are you free on {day}?", f"{second}: Yes, why?"]
    speakers = [first, second]
    turns += [f"{speakers[i % 2]}: {rng.choice(SMALL_TALK)}" for i in range(small_talk_turns)]
    turns += [f"{first}: Let's meet at the {place}.", f"{second}: Great, see you at the {place} on {day}!"]
    return {
        "id": f"{13680000 + index}",
        "dialogue": "\n".join(turns),
        "summary": f"{first} and {second} will meet at the {place} on {day}.",
    }


def samsum_like_turns(rng: random.Random) -> int:
    """Small-talk turns drawn so that chat-templated lengths resemble SAMSum's (mean ~205, long tail).

    Fitted with the real Qwen2.5 tokenizer on 14,731 draws: mean 205, p50 177, p99 ~590, 1.8% over 512.
    """
    return min(int(rng.lognormvariate(2.25, 0.72)), 105)


def make_examples(n: int, seed: int = 0, start: int = 0, realistic_lengths: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [
        make_example(rng, start + i, samsum_like_turns(rng) if realistic_lengths else rng.randint(0, 2))
        for i in range(n)
    ]


def write_samsum_csvs(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """train/validation/test CSVs in the knkarthick/samsum layout (columns id, dialogue, summary)."""
    sizes = sizes or {"train": 200, "validation": 120, "test": 60}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for offset, (split, n) in enumerate(sizes.items()):
        pd.DataFrame(make_examples(n, seed=seed + offset, start=start)).to_csv(folder / f"{split}.csv", index=False)
        start += n
    return folder
