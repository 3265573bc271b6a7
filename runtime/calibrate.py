"""INSTANT calibration in numpy: Gram matrices -> ranks and bases (DESIGN.md §1).

Given the batch-mean Gram matrix ``C`` of one tensor (L×L on the token axis, C×C on the channel
axis), with singular values ``S`` of ``C`` in decreasing order::

    r = #{cumsum(S²) <= ε·ΣS²} + p + 1, capped at the dimension
    basis = U[:, :r]ᵀ / sqrt(retained energy fraction)        (energy compensation)

The retained fraction is ``cumsum(S²)[r-1] / ΣS²``: the energy of the r directions kept. (The
official code reads ``cumsum[r]``, one past the kept directions; we use the kept ones.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Basis", "basis_from_gram", "rank_for_energy"]


@dataclass
class Basis:
    matrix: np.ndarray  # [r, D], float32, rows = retained directions (energy-compensated)
    rank: int
    retained: float  # energy fraction kept
    spectrum: np.ndarray  # S² normalised to sum 1 (for the planner)


def rank_for_energy(s: np.ndarray, energy: float, oversample: int) -> int:
    """Rank from the singular values ``s`` (decreasing) of a Gram matrix."""
    e = np.square(s.astype(np.float64))
    total = float(e.sum())
    if total <= 0.0 or not np.isfinite(total):
        return 1
    cum = np.cumsum(e)
    r = int(np.count_nonzero(cum <= energy * total)) + oversample + 1
    return max(1, min(r, len(s)))


def basis_from_gram(gram: np.ndarray, energy: float = 0.95, oversample: int = 0,
                    rank: int | None = None) -> Basis:
    """Decompose a symmetric PSD Gram matrix; ``rank`` overrides the energy rule (planner)."""
    g = 0.5 * (gram.astype(np.float64) + gram.astype(np.float64).T)
    w, u = np.linalg.eigh(g)  # symmetric PSD: eigenvalues = singular values
    order = np.argsort(w)[::-1]
    s = np.clip(w[order], 0.0, None)
    u = u[:, order]
    r = rank_for_energy(s, energy, oversample) if rank is None else max(1, min(rank, len(s)))
    e = np.square(s)
    total = float(e.sum())
    retained = float(np.cumsum(e)[r - 1] / total) if total > 0 else 1.0
    scale = 1.0 / np.sqrt(retained) if retained > 0 else 1.0
    return Basis((u[:, :r].T * scale).astype(np.float32), r, retained,
                 (e / total if total > 0 else e).astype(np.float32))
