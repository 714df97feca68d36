"""Deterministic pseudo-text for partners' data folders in tests, the churn soak and benchmarks."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "river",
    "bread",
    "city",
    "map",
    "language",
    "model",
    "partner",
    "data",
    "mountain",
    "garden",
    "train",
    "harbour",
    "book",
)


def write_text(path: Path, seed: int, n_bytes: int = 6000) -> Path:
    """Words from a small vocabulary, `n_bytes` or a little more, the same for the same seed."""
    rng = random.Random(seed)
    text: list[str] = []
    while sum(len(w) + 1 for w in text) < n_bytes:
        text.append(rng.choice(WORDS))
    path.write_text(" ".join(text))
    return path
