"""Texts of very different lengths for the embedding tests, and the cosine they are judged by."""
from __future__ import annotations

import random

import numpy as np

_WORDS = ("the a of serving engine batches texts into one forward pass while a radix cache keeps shared "
          "prefixes an encoder reads every token in both directions embeddings are unit vectors whose "
          "dot products say how close two sentences are Paris is the capital of France it rains often "
          "in autumn quantum chromodynamics describes quarks and gluons").split()


def make_texts(n: int, seed: int = 0, max_words: int = 150) -> list[str]:
    """n texts of very different lengths (1 word up to max_words), deterministic."""
    rng = random.Random(seed)
    lengths = [1, 2, 5] + [rng.randint(3, max_words) for _ in range(n - 4)] + [max_words]
    return [" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "." for k in lengths[:n]]


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
