"""Synthetic sequence-classification data for the activation-heavy token-MLP workload.

Each example is a length-L sequence of D-dim tokens: a class-specific mixture of a few smooth
temporal patterns projected to D features, plus noise. Token activations of such data (like those
of real text/vision backbones) have a fast-decaying spectrum along the token axis, which is the
structure INSTANT exploits; i.i.d. noise would have none.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_sequences"]


def make_sequences(n: int, length: int = 128, dim: int = 64, classes: int = 10, seed: int = 0,
                   patterns: int = 8, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, length)
    freqs = rng.uniform(0.5, 4.0, patterns)
    phases = rng.uniform(0, 2 * np.pi, patterns)
    temporal = np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])  # [K, L]
    proj = rng.standard_normal((patterns, dim)) / np.sqrt(patterns)  # [K, D]
    templates = rng.standard_normal((classes, patterns))  # class -> pattern weights
    y = rng.integers(0, classes, n)
    w = templates[y] + 0.8 * rng.standard_normal((n, patterns))  # [N, K]
    x = np.einsum("nk,kl,kd->nld", w, temporal, proj)
    x += noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int64)
