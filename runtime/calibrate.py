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

import functools
from dataclasses import dataclass

import numpy as np

from .memory import reserve

__all__ = ["Basis", "DegenerateGram", "GramWindow", "Spectrum", "basis_from_gram",
           "calibration_rng", "calibration_samples", "decompose", "decompose_bytes", "gram_vectors",
           "rank_for_energy", "spectrum_width"]

# The first calibration (dedicated exact passes) reads at least this many samples per batch, and
# enough that every Gram sums CALIB_VECTORS_PER_DIM times its dimension in vectors.
CALIB_MIN_SAMPLES = 64
CALIB_VECTORS_PER_DIM = 4
# Extra directions a range finder draws beyond a Gram's rank bound (decompose).
RANGE_OVERSAMPLE = 8


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


@functools.cache
def _blas():
    """numpy's BLAS thread pools (threadpoolctl), or None where that is not installed."""
    try:
        from threadpoolctl import ThreadpoolController

        return ThreadpoolController()
    except Exception:  # noqa: BLE001 - not installed or cannot read the loaded libraries: the
        return None  # decompositions then run as numpy is set up


def one_blas_thread(fn):
    """Run ``fn`` with numpy's BLAS on one thread. The decompositions (``eigh``, ``qr``) are
    the only BLAS work of a run, between onnxruntime's passes: OpenBLAS's default (a thread a
    core, whatever ``--threads`` says) spends its time in its threads' barriers as soon as
    anything else wants a core. ``python -m benchmarks.blas_threads`` (2 cores, README
    "Speed"): beside one busy process the default pool took 1.1-50x as long (a 64-wide Gram
    31 ms against 0.6, 1024-wide 446 against 237; under a load of 3, 256-wide 1.0 s against
    9 ms); on a quiet machine the same up to 1024, 0.7x at 1536 (553 against 770 ms)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctl = _blas()
        if ctl is None:
            return fn(*args, **kwargs)
        with ctl.limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return wrapper


class DegenerateGram(ValueError):
    """A Gram matrix with NaN or inf entries (a diverged pass): no basis can come from it."""


@dataclass
class Spectrum:
    """Eigen-decomposition of one Gram matrix: eigenvalues (decreasing, >= 0) and vectors."""

    values: np.ndarray  # [D] float64
    vectors: np.ndarray  # [D, m] float64, columns: m = D, or fewer when values[m:] are 0

    @one_blas_thread
    def columns(self, r: int) -> np.ndarray:
        """The first ``r`` eigenvectors [D, r]. Past the computed ones (eigenvalue 0, a
        low-rank Gram) any orthonormal completion is right: drawn with a fixed seed."""
        u = self.vectors
        if r <= u.shape[1]:
            return u[:, :r]
        extra = np.random.default_rng(1).standard_normal((u.shape[0], r - u.shape[1]))
        for _ in range(2):  # twice: orthogonal to u to working precision
            extra -= u @ (u.T @ extra)
        q, _ = np.linalg.qr(extra)
        return np.hstack([u, q])

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

    @property
    def kept_variance(self) -> float:
        """The fraction of the variance (S, the Gram's eigenvalues: ``--variance``'s measure;
        1 - it is the projection's relative squared error) its ``rank`` directions keep."""
        s = np.sqrt(np.maximum(np.asarray(self.spectrum, np.float64), 0.0))
        t = float(s.sum())
        return float(s[:self.rank].sum()) / t if t > 0 else 1.0


@one_blas_thread
def decompose(gram: np.ndarray, scale: float = 1.0, rank_bound: int | None = None) -> Spectrum:
    """Eigen-decomposition of the symmetric PSD Gram matrix ``scale`` × ``gram``.

    ``rank_bound``: how many vectors the Gram sums (it has at most that rank). Where that is
    well below its dimension D (a wide 2-D activation seen by a batch of a few dozen rows) a
    range finder gives the same nonzero eigenpairs in O(D²·m) time and O(D·m) memory, m the
    bound plus ``RANGE_OVERSAMPLE``, where ``eigh`` takes O(D³) and copies of the D×D matrix
    (a 4096-wide layer: 46 s and ~1 GB for its two Grams, now under a second). The remaining
    eigenvalues are zero; their directions are drawn only if a rank above m is asked for
    (:func:`basis`).

    Raises:
        DegenerateGram: the matrix has NaN or inf entries.
    """
    m = _range_size(int(gram.shape[0]), rank_bound)
    if m:
        spec = _decompose_low_rank(gram, scale, m)
        if spec is not None:
            return spec
    g = np.asarray(gram, dtype=np.float64) * scale
    if not np.isfinite(g).all():
        raise DegenerateGram("the Gram matrix has NaN or inf entries")
    g = 0.5 * (g + g.T)
    try:
        w, u = np.linalg.eigh(g)
    except np.linalg.LinAlgError as exc:  # pragma: no cover - finite symmetric input converges
        raise DegenerateGram(str(exc)) from None
    order = np.argsort(w)[::-1]
    return Spectrum(np.clip(w[order], 0.0, None), u[:, order])


def _range_size(dim: int, rank_bound: int | None) -> int:
    """Vectors a range finder draws for a ``dim``-wide Gram of rank <= ``rank_bound``; 0 where
    the bound is not well below ``dim`` (a full ``eigh`` is then as cheap)."""
    if rank_bound is None:
        return 0
    m = int(rank_bound) + RANGE_OVERSAMPLE
    return m if 2 * m <= dim else 0


def spectrum_width(dim: int, rank_bound: int) -> int:
    """How many directions :func:`decompose` computes for a ``dim``-wide Gram summing
    ``rank_bound`` vectors: the ranks a calibration can give it (the rest carry no energy)."""
    return _range_size(dim, rank_bound) or dim


def decompose_bytes(dim: int, rank_bound: int) -> tuple[int, int]:
    """(bytes of the :class:`Spectrum` kept, bytes of the temporaries while it is made) for
    :func:`decompose` of a ``dim``×``dim`` Gram summing ``rank_bound`` vectors."""
    m = _range_size(dim, rank_bound)
    if m:
        return 8 * (dim * m + dim), 8 * 4 * dim * m  # vectors, values; Ω, Y, Q, gram·Q
    return 8 * (dim * dim + dim), 8 * 3 * dim * dim  # eigh: the scaled copy, its sum, workspace


def _decompose_low_rank(gram: np.ndarray, scale: float, m: int) -> Spectrum | None:
    """:func:`decompose` of a Gram of rank < m: an orthonormal basis Q of its range (from
    ``gram`` times m random vectors; fixed seed, so the same Grams give the same bases), then
    the eigenpairs of the m×m matrix Qᵀ·gram·Q, lifted back by Q. No D×D temporary. None
    where the range misses more than 1e-6 of the Gram's trace (its rank was above m)."""
    d = int(gram.shape[0])
    omega = np.random.default_rng(0).standard_normal((d, m))
    y = gram @ omega
    if not np.isfinite(y).all():
        raise DegenerateGram("the Gram matrix has NaN or inf entries")
    q, _ = np.linalg.qr(y)
    b = q.T @ (gram @ q)
    if not np.isfinite(b).all():
        raise DegenerateGram("the Gram matrix has NaN or inf entries")
    # the bound comes from the layer's shapes (rows per sample); a layer whose rows are not
    # what they say (an [N·L, C] input counted as N rows) has more directions than were drawn:
    # the variance the range misses shows it, and the full eigh then runs
    total = float(np.trace(gram))
    if total > 0 and total - float(np.trace(b)) > 1e-6 * total:
        return None
    b = 0.5 * (b + b.T) * scale
    try:
        w, v = np.linalg.eigh(b)
    except np.linalg.LinAlgError as exc:  # pragma: no cover - finite symmetric input converges
        raise DegenerateGram(str(exc)) from None
    order = np.argsort(w)[::-1]
    values = np.zeros(d, np.float64)
    values[:m] = np.clip(w[order], 0.0, None)
    return Spectrum(values, q @ v[:, order])


def rank_for_energy(s: np.ndarray, energy: float, oversample: int) -> int:
    """Rank from the singular values ``s`` (decreasing) of a Gram matrix; ε = 1 keeps every
    direction (full rank, exact), not only those the calibration's data reached."""
    if energy >= 1.0:
        return max(1, len(s))
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
    if r == spec.values.size and r > spec.vectors.shape[1]:
        # full rank past the computed directions (an exact input gradient, ranks.py): every
        # orthonormal basis projects exactly, the identity the cheapest to make
        return Basis(np.eye(r, dtype=np.float32), r, 1.0, spec.energy.astype(np.float32))
    e = spec.energy
    retained = float(np.cumsum(e)[r - 1]) if e.size else 1.0
    scale = 1.0 / np.sqrt(retained) if retained > 0 else 1.0
    return Basis((spec.columns(r).T * scale).astype(np.float32), r, retained,
                 e.astype(np.float32))


def basis_from_gram(gram: np.ndarray, energy: float = 0.95, oversample: int = 0,
                    rank: int | None = None) -> Basis:
    """Decompose a Gram matrix; rank from the energy rule unless ``rank`` is given."""
    spec = decompose(gram)
    r = rank_for_energy(spec.values, energy, oversample) if rank is None else rank
    return basis(spec, r)


def gram_vectors(ly) -> tuple[int, int]:
    """Vectors one sample adds to each of a layer's Grams (x's, g's): its positions on the
    channel axis, its channels on the token axis. Times the samples a calibration sums, they
    bound the Grams' ranks (:func:`decompose`)."""
    return (int(ly.cx if ly.x_axis == "token" else ly.tokens),
            int(ly.cy if ly.g_axis == "token" else ly.tokens))


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
        reserve(self.accumulator_bytes(layers), "the Gram accumulators")
        self.vectors = {ly.name: gram_vectors(ly) for ly in layers}
        self.gx = {k: np.zeros((d, d), np.float64) for k, (d, _) in self.dims.items()}
        self.gg = {k: np.zeros((d, d), np.float64) for k, (_, d) in self.dims.items()}
        self.samples = 0
        self.done = 0
        self.seconds = 0.0  # time of dedicated calibration passes (not of training steps)

    @staticmethod
    def accumulator_bytes(layers) -> int:
        """Bytes of a window's float64 Grams, held through a calibration."""
        return sum(8 * (ly.x_dim ** 2 + ly.g_dim ** 2) for ly in layers)

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
        (they share one basis: the same activation, the same Gram) reuses that one's. A Gram
        sums ``samples`` × (vectors per sample) vectors, which bounds its rank (decompose).

        Raises: DegenerateGram (non-finite Grams, e.g. after a divergence)."""
        scale = 1.0 / max(1, self.samples)
        same_x = same_x or {}
        need = [decompose_bytes(d, self.samples * v) for k in self.dims
                for d, v in zip(self.dims[k], self.vectors[k], strict=True)]
        reserve(sum(h for h, _ in need) + max(t for _, t in need), "the Grams' decomposition")
        xs: dict[str, Spectrum] = {}
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite: DegenerateGram says
            for k in self.dims:
                if same_x.get(k, k) == k:
                    xs[k] = decompose(self.gx[k], scale, self.samples * self.vectors[k][0])
            return {k: (xs[same_x.get(k, k)],
                        decompose(self.gg[k], scale, self.samples * self.vectors[k][1]))
                    for k in self.dims}

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


def calibration_rng(seed: int) -> np.random.Generator:
    """The generator a run's dedicated calibrations draw their batches from (``run.train``;
    ``plan`` draws the same, so the ranks it prints are the run's first calibration's)."""
    return np.random.default_rng(seed + 1)
