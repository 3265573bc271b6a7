"""Ranks for every compressed layer after a calibration: the energy rule, or chosen under the
plan's memory for compressed activations.

Two policies (``--rank-policy``):

* ``energy`` (the paper's): each tensor's rank from the ε rule with oversampling p, capped by
  ``--max-rank``; when the plan's budget for compressed activations cannot hold them, activation
  ranks fall first where a byte of memory costs the least retained variance.
* ``budget``: minimise the total relative approximation error of the weight gradients
  (activation-basis ranks Rx) and input gradients (gradient-basis ranks Ry), Σ (1 - kept
  variance), subject to the memory for compressed activations at the planned micro-batch and a
  backward-FLOP target (``--flop-ratio`` × the exact backward of those layers). Greedy on the
  error removed per unit of the scarcer resource: with memory to spare ranks rise toward exact;
  under a tight budget they fall where the error grows least.

Cost per sample (docs/method.md): saved bytes 4·Rx·Cx (token axis) or 4·L·Rx (channel axis);
backward FLOPs 2(Rx + Ry)(Cx·Cy + L·Cx + L·Cy) against 4·L·Cx·Cy exact.
"""

from __future__ import annotations

import heapq

import numpy as np

from contract.manifest import LayerInfo

from .calibrate import Spectrum, rank_for_energy
from .config import InstantConfig

__all__ = ["choose_ranks", "saved_bytes", "x_bytes_per_rank"]


def x_bytes_per_rank(ly: LayerInfo) -> int:
    """Bytes per sample the forward saves for one unit of activation rank."""
    return 4 * (ly.cx if ly.x_axis == "token" else ly.tokens)


def saved_bytes(layers: list[LayerInfo], ranks: dict[str, tuple[int, int]]) -> int:
    return sum(x_bytes_per_rank(ly) * ranks[ly.name][0] for ly in layers if ly.name in ranks)


def _flops_per_rank(ly: LayerInfo) -> int:
    return 2 * (ly.cx * ly.cy + ly.tokens * ly.cx + ly.tokens * ly.cy)


def choose_ranks(layers: list[LayerInfo], spectra: dict[str, tuple[Spectrum, Spectrum]],
                 cfg: InstantConfig, saved_budget: int | None) -> dict[str, tuple[int, int]]:
    """(Rx, Ry) per layer under ``cfg``'s policy and the per-sample ``saved_budget`` (bytes)."""
    cap = cfg.max_rank
    if cfg.rank_policy == "budget":
        return _budget(layers, spectra, cfg, saved_budget)
    ranks = {}
    for ly in layers:
        sx, sg = spectra[ly.name]
        rx = rank_for_energy(sx.values, cfg.energy, cfg.oversample)
        ry = rank_for_energy(sg.values, cfg.energy, cfg.oversample)
        if cap is not None:
            rx, ry = min(rx, cap), min(ry, cap)
        ranks[ly.name] = (rx, ry)
    if saved_budget is not None:
        ranks = _shrink_to(layers, spectra, ranks, saved_budget)
    return ranks


def _shrink_to(layers, spectra, ranks, budget: int) -> dict[str, tuple[int, int]]:
    """Lower activation ranks, cheapest retained variance per byte first, until they fit."""
    ranks = dict(ranks)
    over = saved_bytes(layers, ranks) - budget
    heap = []
    for ly in layers:
        rx = ranks[ly.name][0]
        if rx > 1:
            var = spectra[ly.name][0].variance
            heapq.heappush(heap, (float(var[rx - 1]) / x_bytes_per_rank(ly), ly.name))
    by_name = {ly.name: ly for ly in layers}
    while over > 0 and heap:
        _, name = heapq.heappop(heap)
        ly = by_name[name]
        rx, ry = ranks[name]
        ranks[name] = (rx - 1, ry)
        over -= x_bytes_per_rank(ly)
        if rx - 1 > 1:
            var = spectra[name][0].variance
            heapq.heappush(heap, (float(var[rx - 2]) / x_bytes_per_rank(ly), name))
    return ranks


def _budget(layers, spectra, cfg: InstantConfig, saved_budget: int | None
            ) -> dict[str, tuple[int, int]]:
    ranks = {ly.name: [1, 1] for ly in layers}
    flop_budget = cfg.flop_ratio * sum(4 * ly.tokens * ly.cx * ly.cy for ly in layers)
    flops = sum(2 * _flops_per_rank(ly) for ly in layers)  # rank 1 + 1 everywhere
    mem = sum(x_bytes_per_rank(ly) for ly in layers)
    mem_budget = float(saved_budget) if saved_budget is not None else float("inf")
    cap = cfg.max_rank
    heap: list[tuple[float, int, str, int]] = []
    order = {ly.name: i for i, ly in enumerate(layers)}
    by_name = {ly.name: ly for ly in layers}

    def push(name: str, which: int) -> None:
        ly = by_name[name]
        spec = spectra[name][which]
        r = ranks[name][which]
        if r >= spec.values.size or (cap is not None and r >= cap):
            return
        gain = float(spec.variance[r])
        if gain <= 0.0:
            return
        cost_f = _flops_per_rank(ly) / flop_budget if flop_budget > 0 else float("inf")
        cost_m = (x_bytes_per_rank(ly) / mem_budget) if which == 0 else 0.0
        cost = max(cost_f, cost_m, 1e-30)
        heapq.heappush(heap, (-gain / cost, order[name], name, which))

    for ly in layers:
        push(ly.name, 0)
        push(ly.name, 1)
    while heap:
        _, _, name, which = heapq.heappop(heap)
        ly = by_name[name]
        df = _flops_per_rank(ly)
        dm = x_bytes_per_rank(ly) if which == 0 else 0
        if flops + df > flop_budget or mem + dm > mem_budget:
            continue  # this increment no longer fits; others (cheaper) may
        ranks[name][which] += 1
        flops += df
        mem += dm
        push(name, which)
    return {k: (int(v[0]), int(v[1])) for k, v in ranks.items()}


def retained_variance(spec: Spectrum, r: int) -> float:
    return float(np.sum(spec.variance[:r]))
