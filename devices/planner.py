"""Memory model and budget planner: a pure pass, no onnxruntime, no I/O.

The model of the whole-process peak RSS for a training step at micro-batch ``m``::

    peak(m, ranks) = idle                      measured RSS after loading sessions and data
                   + static                    trainable weights' gradients + optimizer state
                   + fixed                     per-step overhead independent of m (measured)
                   + m * (per_sample_other     activations, masks, gradient buffers (measured)
                          + Σ saved(ranks))    compressed activations x̂ at the chosen ranks

``fixed`` and ``per_sample_other`` come from two probe steps at different micro-batches (the
runtime measures them, see ``runtime/budget.py``); the saved-activation term is analytic
(DESIGN.md §1), so the planner can trade ranks for micro-batch without re-measuring. Calibration
runs an exact pass and has its own line ``calib_fixed + m_c * calib_per_sample``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BudgetError", "LayerSpec", "MemoryModel", "Plan", "make_plan"]

SAFETY = 0.88  # plan to this fraction of the budget: probe error, allocator slack


class BudgetError(ValueError):
    """The budget cannot hold even the smallest setting; the message states the minimum."""


@dataclass(frozen=True)
class LayerSpec:
    """One compressed layer: bytes saved per sample per unit of rank, and its energy spectra."""

    name: str
    x_bytes_per_rank: int  # 4·Cx (token axis) or 4·L (channel axis)
    x_spectrum: tuple[float, ...]  # normalised S² of the activation Gram, decreasing
    default_rank: int  # rank from the ε rule


@dataclass(frozen=True)
class MemoryModel:
    idle: int
    static: int
    fixed: int
    per_sample_other: float
    calib_fixed: int = 0
    calib_per_sample: float = 0.0

    def step_peak(self, m: int, saved_per_sample: float) -> int:
        return int(self.idle + self.static + self.fixed
                   + m * (self.per_sample_other + saved_per_sample))

    def calib_peak(self, m: int) -> int:
        return int(self.idle + self.static + self.calib_fixed + m * self.calib_per_sample)


@dataclass
class Plan:
    micro_batch: int
    calib_micro_batch: int
    ranks: dict[str, int]
    predicted_peak: int
    predicted_calib_peak: int
    budget: int
    breakdown: dict[str, int] = field(default_factory=dict)
    retained: dict[str, float] = field(default_factory=dict)


def _saved(layers: list[LayerSpec], ranks: dict[str, int]) -> int:
    return sum(ly.x_bytes_per_rank * ranks[ly.name] for ly in layers)


def _retained(ly: LayerSpec, r: int) -> float:
    return float(sum(ly.x_spectrum[:r])) if ly.x_spectrum else 1.0


def _shrink_ranks(layers: list[LayerSpec], ranks: dict[str, int], bytes_needed: float
                  ) -> dict[str, int]:
    """Lower ranks where a byte costs the least retained energy, until ``bytes_needed`` is saved."""
    ranks = dict(ranks)
    while bytes_needed > 0:
        best, best_cost = None, None
        for ly in layers:
            r = ranks[ly.name]
            if r <= 1:
                continue
            loss = _retained(ly, r) - _retained(ly, r - 1)
            cost = loss / ly.x_bytes_per_rank
            if best_cost is None or cost < best_cost:
                best, best_cost = ly, cost
        if best is None:
            break
        ranks[best.name] -= 1
        bytes_needed -= best.x_bytes_per_rank
    return ranks


def _largest(base: float, per_sample: float, target: int, batch: int) -> int:
    """Largest m in [1, batch] with base + m·per_sample <= target (1 if none fits)."""
    if per_sample <= 0:
        return batch
    return int(max(1, min(batch, (target - base) // per_sample)))


def make_plan(model: MemoryModel, budget: int, batch: int, layers: list[LayerSpec]) -> Plan:
    """Largest micro-batch (≤ batch) that fits at the ε-rule ranks; ranks shrink only when even
    micro-batch 1 does not fit. Calibration gets the largest micro-batch whose exact pass fits.

    Raises:
        BudgetError: micro-batch 1 at rank 1 everywhere, or calibration at 1, exceeds the budget.
    """
    target = int(budget * SAFETY)
    ranks = {ly.name: ly.default_rank for ly in layers}
    saved = _saved(layers, ranks)
    m = _largest(model.idle + model.static + model.fixed, model.per_sample_other + saved,
                 target, batch)
    if model.step_peak(m, saved) > target:
        over = model.step_peak(1, saved) - target
        ranks = _shrink_ranks(layers, ranks, over)
        saved = _saved(layers, ranks)
    mc = min(m, _largest(model.idle + model.static + model.calib_fixed, model.calib_per_sample,
                         target, batch))
    minimum = max(model.step_peak(1, _saved(layers, {ly.name: 1 for ly in layers})),
                  model.calib_peak(1))
    if model.step_peak(m, saved) > target or model.calib_peak(mc) > target:
        need = int(minimum / SAFETY) + 1
        raise BudgetError(
            f"budget {budget / 1e6:.0f} MB is below the minimum {need / 1e6:.0f} MB for this "
            f"bundle at micro-batch 1 (idle {model.idle / 1e6:.0f} MB, gradients + optimizer "
            f"{model.static / 1e6:.0f} MB, step overhead {model.fixed / 1e6:.0f} MB, per sample "
            f"{model.per_sample_other / 1e6:.1f} MB); raise --budget to at least {need / 1e6:.0f}MB")
    breakdown = {
        "idle (runtime, sessions, frozen weights, data)": model.idle,
        "gradients + optimizer state": model.static,
        "per-step overhead (frozen weights read, transients)": model.fixed,
        f"activations, masks, gradient buffers (x{m})": int(m * model.per_sample_other),
        f"compressed activations at chosen ranks (x{m})": int(m * saved),
    }
    return Plan(m, mc, ranks, model.step_peak(m, saved), model.calib_peak(mc), budget, breakdown,
                {ly.name: _retained(ly, ranks[ly.name]) for ly in layers})
