"""INSTANT calibration in numpy: Gram matrices -> spectra -> bases (docs/method.md).

Given the batch-mean Gram matrix ``C`` of one tensor (L×L on the token axis, C×C on the channel
axis), with eigenvalues ``S`` of ``C`` in decreasing order (the Gram is symmetric PSD, so they
are its singular values, σ² of the data)::

    r = #{cumsum(S²) <= ε·ΣS²} + p + 1, capped at the dimension        (the energy rule)
    basis = U[:, :r]ᵀ / sqrt(retained energy fraction)                  (energy compensation)

The retained fraction is ``cumsum(S²)[r-1] / ΣS²``: the energy of the r directions kept. (The
official code reads ``cumsum[r]``, one past the kept directions; we use the kept ones.) How the
ranks are chosen (energy rule, or under a memory budget) is ``runtime/ranks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Basis", "DegenerateGram", "GramWindow", "Spectrum", "basis_from_gram",
           "calibration_samples", "decompose", "rank_for_energy"]

# The first calibration (dedicated exact passes) reads at least this many samples per batch, and
# enough that every Gram sums CALIB_VECTORS_PER_DIM times its dimension in vectors.
CALIB_MIN_SAMPLES = 64
CALIB_VECTORS_PER_DIM = 4


def calibration_samples(layers, batch: int, override: int | None = None,
                        padded: bool = False) -> int:
    """Samples per batch of the first calibration: the run's batch, or fewer where fewer fill
    every Gram. A sample contributes ``cx`` vectors of length L to a token-axis Gram of x (L×L)
    and L vectors of length ``cx`` to a channel-axis one (likewise ``cy`` for the output
    gradient), so a few samples of a long-sequence, wide layer estimate its L×L Gram well while
    a 2-D activation (L = 1) needs as many samples as its width. The count is the largest that
    any Gram needs for ``CALIB_VECTORS_PER_DIM`` vectors per dimension, at least
    ``CALIB_MIN_SAMPLES``, at most the batch. On the token MLP at batch 256 this is 64: the
    first calibration costs a quarter of its passes (docs/method.md); at batch 32 nothing
    changes. ``padded`` (text: positions may be padding): a channel-axis Gram counts one
    vector per sample, since its real length is unknown here. ``override``
    (``--calib-samples``) replaces the rule."""
    if override:
        return max(1, min(batch, override))
    need = CALIB_MIN_SAMPLES
    for ly in layers:
        for axis, dim, width in ((ly.x_axis, ly.x_dim, ly.cx), (ly.g_axis, ly.g_dim, ly.cy)):
            vectors = width if axis == "token" else (1 if padded else ly.tokens)
            need = max(need, -(-CALIB_VECTORS_PER_DIM * dim // max(1, vectors)))
    return max(1, min(batch, need))


class DegenerateGram(ValueError):
    """A Gram matrix with NaN or inf entries (a diverged pass): no basis can come from it."""


@dataclass
class Spectrum:
    """Eigen-decomposition of one Gram matrix: eigenvalues (decreasing, >= 0) and vectors."""

    values: np.ndarray  # [D] float64
    vectors: np.ndarray  # [D, D] float64, columns

    @property
    def energy(self) -> np.ndarray:
        """S² normalised to sum 1 (the energy rule's measure)."""
        e = np.square(self.values)
        t = float(e.sum())
        return e / t if t > 0 else np.full_like(e, 1.0 / max(1, e.size))

    @property
    def variance(self) -> np.ndarray:
        """S normalised to sum 1: the fraction of the tensor's squared norm along each
        direction (1 - its prefix sum is the relative error of a rank-r projection)."""
        t = float(self.values.sum())
        return self.values / t if t > 0 else np.full_like(self.values, 1.0 / max(1, self.values.size))


@dataclass
class Basis:
    matrix: np.ndarray  # [r, D], float32, rows = retained directions (energy-compensated)
    rank: int
    retained: float  # energy fraction kept
    spectrum: np.ndarray  # S² normalised to sum 1


def decompose(gram: np.ndarray) -> Spectrum:
    """Eigen-decomposition of a symmetric PSD Gram matrix.

    Raises:
        DegenerateGram: the matrix has NaN or inf entries.
    """
    g = np.asarray(gram, dtype=np.float64)
    if not np.isfinite(g).all():
        raise DegenerateGram("the Gram matrix has NaN or inf entries")
    g = 0.5 * (g + g.T)
    try:
        w, u = np.linalg.eigh(g)
    except np.linalg.LinAlgError as exc:  # pragma: no cover - finite symmetric input converges
        raise DegenerateGram(str(exc)) from None
    order = np.argsort(w)[::-1]
    return Spectrum(np.clip(w[order], 0.0, None), u[:, order])


def rank_for_energy(s: np.ndarray, energy: float, oversample: int) -> int:
    """Rank from the singular values ``s`` (decreasing) of a Gram matrix."""
    e = np.square(s.astype(np.float64))
    total = float(e.sum())
    if total <= 0.0 or not np.isfinite(total):
        return 1
    cum = np.cumsum(e)
    r = int(np.count_nonzero(cum <= energy * total)) + oversample + 1
    return max(1, min(r, len(s)))


def basis(spec: Spectrum, rank: int) -> Basis:
    """The first ``rank`` directions, energy-compensated."""
    r = max(1, min(int(rank), spec.values.size))
    e = spec.energy
    retained = float(np.cumsum(e)[r - 1]) if e.size else 1.0
    scale = 1.0 / np.sqrt(retained) if retained > 0 else 1.0
    return Basis((spec.vectors[:, :r].T * scale).astype(np.float32), r, retained,
                 e.astype(np.float32))


def basis_from_gram(gram: np.ndarray, energy: float = 0.95, oversample: int = 0,
                    rank: int | None = None) -> Basis:
    """Decompose a Gram matrix; rank from the energy rule unless ``rank`` is given."""
    spec = decompose(gram)
    r = rank_for_energy(spec.values, energy, oversample) if rank is None else rank
    return basis(spec, r)


class GramWindow:
    """The Gram matrices of one calibration, summed over its ``steps`` training steps.

    A calibration is a run of ordinary training steps in the ``calib`` graphs (the exact backward
    with its parameter gradients, plus each compressed layer's Σ X Xᵀ and Σ G Gᵀ): the
    calibration batches train the model too, so a calibration costs the difference between an
    exact and an INSTANT step per step of the window, not extra passes.
    """

    def __init__(self, layers, steps: int) -> None:
        self.steps = max(1, int(steps))
        self.dims = {ly.name: (ly.x_dim, ly.g_dim) for ly in layers}
        self.gx = {k: np.zeros((d, d), np.float64) for k, (d, _) in self.dims.items()}
        self.gg = {k: np.zeros((d, d), np.float64) for k, (_, d) in self.dims.items()}
        self.samples = 0
        self.done = 0
        self.seconds = 0.0  # time of dedicated calibration passes (not of training steps)

    def reset(self) -> None:
        """Start the window again (a step failed halfway: its Grams are partial)."""
        for g in (*self.gx.values(), *self.gg.values()):
            g.fill(0.0)
        self.samples = 0
        self.done = 0

    @property
    def complete(self) -> bool:
        return self.done >= self.steps

    def spectra(self, same_x: dict[str, str] | None = None) -> dict[str, tuple[Spectrum, Spectrum]]:
        """Each layer's activation and gradient spectra; a layer that ``same_x`` maps to another
        (they share one basis: the same activation, the same Gram) reuses that one's.

        Raises: DegenerateGram (non-finite Grams, e.g. after a divergence)."""
        n = max(1, self.samples)
        same_x = same_x or {}
        xs: dict[str, Spectrum] = {}
        for k in self.dims:
            if same_x.get(k, k) == k:
                xs[k] = decompose(self.gx[k] / n)
        return {k: (xs[same_x.get(k, k)], decompose(self.gg[k] / n)) for k in self.dims}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {f"gram/{k}/x": self.gx[k] for k in self.dims}
        arrays.update({f"gram/{k}/g": self.gg[k] for k in self.dims})
        return arrays, {"steps": self.steps, "samples": self.samples, "done": self.done,
                        "seconds": self.seconds}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for k in self.dims:
            np.copyto(self.gx[k], arrays[f"gram/{k}/x"])
            np.copyto(self.gg[k], arrays[f"gram/{k}/g"])
        self.steps, self.samples = int(meta["steps"]), int(meta["samples"])
        self.done, self.seconds = int(meta["done"]), float(meta["seconds"])
