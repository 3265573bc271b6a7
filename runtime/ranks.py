"""Ranks for every compressed layer after a calibration: the energy rule, or chosen under the
plan's memory for compressed activations.

Two policies (``--rank-policy``):

* ``energy`` (the paper's): each tensor's rank from the ε rule with oversampling p, capped by
  ``--max-rank``; when the plan's budget for compressed activations cannot hold them, activation
  ranks fall first where a byte of memory costs the least retained variance.
* ``budget`` (default): every tensor's rank keeps ``--variance`` (0.99) of its variance, i.e. the
  relative squared error of the projected activations (weight gradients, Rx) and output
  gradients (input gradients, Ry) is at most 1 %; then, while the backward FLOPs pass
  ``--flop-ratio`` × the exact backward of those layers (default 1.0, where that backward takes
  ``flop_cap_min`` FLOPs a batch or more: config.py) or the compressed
  activations pass the plan's memory for them at the planned micro-batch, the rank whose last
  direction keeps the least variance per FLOP (per byte) falls. With memory to spare ranks stay where the error is
  small; under a tight budget they fall where the error grows least. Layers below that size
  (the default cap in force and not binding) start every rank at exact instead, lowered only by
  the plan's memory (:func:`starts_exact`; config.py ``exact_when_small``).

Both policies give a gradient rank its full value g_dim wherever the compressed input gradient
would cost at least the exact one (Ry ≥ :func:`gx_break_even`): the output gradient is never
saved, so its projection only buys compute, and past that point the bundle's graphs run the exact
g·W instead (``export/rules/linear.py: full_rank``): cheaper and without error. Bundles
exported before that (``gx_exact_at_full`` false) keep the compressed product at every rank.

Cost per sample (docs/method.md): saved bytes 4·Rx·Cx (token axis) or 4·L·Rx (channel axis);
backward FLOPs 2(Rx + Ry)(Cx·Cy + L·Cx + L·Cy) against 4·L·Cx·Cy exact over the token axis, the
Ry term replaced by the exact input gradient's 2·L·Cx·Cy where Ry is full; over the channel axis
the Cx·Cy product runs once per micro-batch, not per sample (:func:`_flops_per_rank`).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from contract.manifest import LayerInfo

from .calibrate import Spectrum, rank_for_energy
from .config import InstantConfig

__all__ = ["basis_groups", "choose_ranks", "gx_break_even", "gx_exact", "layer_flops",
           "saved_bytes", "starts_exact", "unreached_flop_ratio", "x_bytes_per_rank"]


def x_bytes_per_rank(ly: LayerInfo) -> int:
    """Bytes per sample the forward saves for one unit of activation rank: a row of x̂ in
    float32, or in int8 plus its float32 scale (``export --saved-int8``)."""
    n = ly.cx if ly.x_axis == "token" else ly.tokens
    return 4 * n if ly.x_itemsize == 4 else n + 4


def basis_groups(layers: list[LayerInfo]) -> dict[str, list[LayerInfo]]:
    """Layers by activation basis: the layers that read the same x share one basis P, one saved
    x̂ and one activation rank (export/layers.py: share_activation_bases); most have their own."""
    groups: dict[str, list[LayerInfo]] = {}
    for ly in layers:
        groups.setdefault(ly.p_input, []).append(ly)
    return groups


def saved_bytes(layers: list[LayerInfo], ranks: dict[str, tuple[int, int]]) -> int:
    """Bytes per sample of the compressed activations: one x̂ per basis."""
    return sum(x_bytes_per_rank(g[0]) * ranks[g[0].name][0]
               for g in basis_groups(layers).values() if g[0].name in ranks)


def exact_saved_bytes(layers: list[LayerInfo]) -> int:
    """Bytes per sample that exact training saves of the layers' inputs: each input once (q, k
    and v read one x); ``--saved-ratio`` is a fraction of it."""
    return sum({ly.x: 4 * ly.tokens * ly.cx for ly in layers}.values())


def unreached_saved_ratio(layers: list[LayerInfo], ranks: dict, ratio: float | None) -> str | None:
    """A warning when ranks of 1 (the least a basis keeps) still save more than ``ratio`` of
    the exact bytes: ``--saved-ratio`` asked for less than INSTANT can store."""
    if ratio is None:
        return None
    exact = exact_saved_bytes(layers)
    got = saved_bytes(layers, ranks)
    if got <= ratio * exact or any(r[0] > 1 for r in ranks.values()):
        return None
    return (f"--saved-ratio {ratio:g} is below what ranks of 1 store ({got / exact:.3g} of the "
            "exact saved bytes), the least INSTANT keeps; the layers run at rank 1: give "
            f"--saved-ratio {got / exact:.3g} or more to say what is kept")


def unreached_flop_ratio(layers: list[LayerInfo], ranks: dict, cfg: InstantConfig,
                         rows: int = 1) -> str | None:
    """A warning when the budget policy's ranks of 1 still compute more than ``--flop-ratio``
    × the exact backward (session 38 probe: 0.05 asked, 0.103 run, no word)."""
    ratio = cfg.flop_ratio
    if cfg.rank_policy != "budget" or not ratio or not layers or \
            not _cap_binds(layers, cfg, rows):  # (the default cap on small layers: no cap)
        return None
    if any(ranks[ly.name][0] > 1 or (ranks[ly.name][1] > 1 and not gx_exact(ly, ranks[ly.name][1]))
           for ly in layers):
        return None
    got = sum(layer_flops(ly, *ranks[ly.name], rows) for ly in layers) / _exact_flops(layers)
    if got <= ratio:
        return None
    return (f"--flop-ratio {ratio:g} is below what ranks of 1 compute ({got:.3g} of the exact "
            "backward), the least INSTANT keeps; the layers run at rank 1: give --flop-ratio "
            f"{got:.3g} or more to say what is computed")


def _flops_per_rank(ly: LayerInfo, side: str, rows: int = 1) -> float:
    """Backward FLOPs per sample of one unit of rank on ``side`` ("x": the weight gradient and
    the forward projection of x, "g": the input gradient). Over the token axis every product
    runs per sample: 2·(L·Cx + L·Cy + Cx·Cy). Over the channel axis the two products with the
    activations run per sample, 2·L·(Cx + Cy), and the Cx·Cy one (g_W's ·P, g_x's Q·W) once per
    micro-batch of ``rows`` samples (rules/linear.py; a 2-D [N, C] layer has L = 1)."""
    once_per = 1 if (ly.x_axis if side == "x" else ly.g_axis) == "token" else max(1, rows)
    return 2 * ly.tokens * (ly.cx + ly.cy) + 2 * ly.cx * ly.cy / once_per


def gx_break_even(ly: LayerInfo, rows: int = 1) -> int:
    """The smallest Ry at which the compressed input gradient costs at least the exact one,
    Ry · :func:`_flops_per_rank` ≥ 2·L·Cx·Cy (always below g_dim)."""
    return max(1, math.ceil(2 * ly.tokens * ly.cx * ly.cy / _flops_per_rank(ly, "g", rows)))


def gx_exact(ly: LayerInfo, ry: int) -> bool:
    """Whether rank ``ry`` runs the exact input gradient (a full Q in a bundle that has it)."""
    return ly.gx_exact_at_full and ry >= ly.g_dim


def layer_flops(ly: LayerInfo, rx: int, ry: int, rows: int = 1) -> int:
    """Backward FLOPs per sample of one compressed layer at ranks (rx, ry) in micro-batches of
    ``rows`` samples, forward projection of x included."""
    gx = 2 * ly.tokens * ly.cx * ly.cy if gx_exact(ly, ry) else _flops_per_rank(ly, "g", rows) * ry
    return int(_flops_per_rank(ly, "x", rows) * rx + gx)


def _snap_gradient_ranks(layers: list[LayerInfo], ranks: dict, max_rank: int | None,
                         rows: int) -> None:
    """Ry = g_dim (the exact input gradient) wherever the compressed one would cost as much,
    unless ``--max-rank`` caps ranks below g_dim (the cap is kept as asked)."""
    for ly in layers:
        r = ranks[ly.name]
        if max_rank is not None and max_rank < ly.g_dim:
            continue
        if ly.gx_exact_at_full and r[1] >= gx_break_even(ly, rows):
            ranks[ly.name] = (r[0], ly.g_dim) if isinstance(r, tuple) else [r[0], ly.g_dim]


def choose_ranks(layers: list[LayerInfo], spectra: dict[str, tuple[Spectrum, Spectrum]],
                 cfg: InstantConfig, saved_budget: int | None, rows: int = 1,
                 cap_rows: int | None = None) -> dict[str, tuple[int, int]]:
    """(Rx, Ry) per layer under ``cfg``'s policy and the per-sample ``saved_budget`` (bytes),
    for micro-batches of ``rows`` samples (channel-axis costs, :func:`_flops_per_rank`).
    ``cap_rows`` (default ``rows``): the training micro-batch, at which the layers' exact
    backward decides whether the default FLOP cap binds (``cfg.flop_cap_min``)."""
    cap = cfg.max_rank
    if cfg.saved_ratio is not None:
        limit = int(cfg.saved_ratio * exact_saved_bytes(layers))
        saved_budget = limit if saved_budget is None else min(saved_budget, limit)
    if cfg.rank_policy == "budget":
        return _budget(layers, spectra, cfg, saved_budget, rows, cap_rows or rows)
    ranks = {}
    for ly in layers:
        sx, sg = spectra[ly.name]
        rx = rank_for_energy(sx.values, cfg.energy, cfg.oversample)
        ry = rank_for_energy(sg.values, cfg.energy, cfg.oversample)
        if cap is not None:
            rx, ry = min(rx, cap), min(ry, cap)
        ranks[ly.name] = (rx, ry)
    _tie(layers, ranks)
    _within_spectra(layers, spectra, ranks)
    _snap_gradient_ranks(layers, ranks, cap, rows)
    if saved_budget is not None:
        ranks = _shrink_to(layers, spectra, ranks, saved_budget)
    return ranks


def _within_spectra(layers: list[LayerInfo], spectra, ranks: dict) -> None:
    """No rank above the directions a calibration computed (a wide Gram of few vectors:
    calibrate.decompose): past them the data had no energy, and the budget's probes price the
    ranks at that width (budget._full_rank_bases). Layers sharing a basis share the spectrum,
    so a tie holds."""
    for ly in layers:
        sx, sg = spectra[ly.name]
        r = ranks[ly.name]
        new = (min(r[0], sx.vectors.shape[1]), min(r[1], sg.vectors.shape[1]))
        ranks[ly.name] = new if isinstance(r, tuple) else list(new)


def _tie(layers: list[LayerInfo], ranks: dict) -> None:
    """Every layer's Rx set to its basis group's largest (the group shares one x̂)."""
    for group in basis_groups(layers).values():
        rx = max(ranks[ly.name][0] for ly in group)
        for ly in group:
            ranks[ly.name] = (rx, ranks[ly.name][1]) if isinstance(ranks[ly.name], tuple) \
                else [rx, ranks[ly.name][1]]


def _shrink_to(layers, spectra, ranks, budget: int) -> dict[str, tuple[int, int]]:
    """Lower activation ranks, cheapest retained variance per byte first, until they fit (a
    basis shared by k layers loses k times the variance for the bytes of one x̂)."""
    ranks = dict(ranks)
    over = saved_bytes(layers, ranks) - budget
    heap = []
    groups = basis_groups(layers)
    for p, group in groups.items():
        rx = ranks[group[0].name][0]
        if rx > 1:
            var = spectra[group[0].name][0].variance
            heapq.heappush(heap, (len(group) * float(var[rx - 1]) / x_bytes_per_rank(group[0]),
                                  p))
    while over > 0 and heap:
        _, p = heapq.heappop(heap)
        group = groups[p]
        rx = ranks[group[0].name][0]
        for ly in group:
            ranks[ly.name] = (rx - 1, ranks[ly.name][1])
        over -= x_bytes_per_rank(group[0])
        if rx - 1 > 1:
            var = spectra[group[0].name][0].variance
            heapq.heappush(heap, (len(group) * float(var[rx - 2])
                                  / x_bytes_per_rank(group[0]), p))
    return ranks


def _exact_flops(layers: list[LayerInfo]) -> int:
    return sum(4 * ly.tokens * ly.cx * ly.cy for ly in layers)


def _cap_binds(layers: list[LayerInfo], cfg: InstantConfig, cap_rows: int) -> bool:
    """The FLOP cap binds: a ratio is set (0 or None: no cap) and the layers' exact backward
    takes at least ``flop_cap_min`` FLOPs a batch of ``cap_rows`` (the run's batch)."""
    return bool(cfg.flop_ratio) and max(1, cap_rows) * _exact_flops(layers) >= cfg.flop_cap_min


def starts_exact(layers: list[LayerInfo], cfg: InstantConfig, cap_rows: int) -> bool:
    """Whether the budget policy starts every rank at exact (``cfg.exact_when_small``, and the
    variance at its default: a config built with another one asks for the rule): the default
    FLOP cap is in force and does not bind (:func:`_cap_binds`)."""
    return (cfg.rank_policy == "budget" and cfg.exact_when_small
            and cfg.variance == InstantConfig.variance and bool(cfg.flop_ratio)
            and not _cap_binds(layers, cfg, cap_rows))


MIN_RANK_DIV = 4  # the budget policy's first pick keeps at least 1/4 of a tensor's directions


def _budget(layers, spectra, cfg: InstantConfig, saved_budget: int | None, rows: int,
            cap_rows: int) -> dict[str, tuple[int, int]]:
    """Each tensor's smallest rank that keeps ``cfg.variance`` of its variance (σ² of the data:
    1 - kept is the relative squared error of the projection), then, while the backward FLOPs
    pass ``flop_ratio`` × exact, or the compressed activations pass the plan's memory, lower the
    rank that costs the least kept variance per FLOP (or per byte)."""
    small = starts_exact(layers, cfg, cap_rows)
    ranks: dict[str, list[int]] = {}
    for ly in layers:
        pair = []
        for spec in spectra[ly.name]:
            if small:  # exact until the plan's memory lowers it (config.py)
                r = spec.values.size
            else:
                r = int(np.searchsorted(np.cumsum(spec.variance), cfg.variance - 1e-12)) + 1
            # at least a quarter of the directions before the FLOP cap and the memory lower
            # them: a from-scratch CNN's ReLU outputs put 99 % of their variance in 1-3
            # directions (their mean) and its output gradients too, early in training; those
            # ranks cost a probe's CNN 11.9 points (3 seeds; 1.7 with this floor), the learning
            # signal being in the rest
            r = max(1, min(max(r, -(-spec.values.size // MIN_RANK_DIV)), spec.values.size))
            if cfg.max_rank is not None:
                r = min(r, cfg.max_rank)
            pair.append(r)
        ranks[ly.name] = pair
    _tie(layers, ranks)
    _within_spectra(layers, spectra, ranks)
    by_name = {ly.name: ly for ly in layers}
    groups = {ly.name: g for g in basis_groups(layers).values() for ly in g}

    def flops() -> float:
        return sum(_flops_per_rank(by_name[n], "x", rows) * r[0]
                   + _flops_per_rank(by_name[n], "g", rows) * r[1] for n, r in ranks.items())

    if _cap_binds(layers, cfg, cap_rows):
        target = cfg.flop_ratio * _exact_flops(layers)
        _lower(ranks, spectra, groups,
               lambda ly, w, r: (r - 1, sum(_flops_per_rank(m, "x", rows) for m in groups[ly.name])
                                 if w == 0 else _flops_per_rank(ly, "g", rows)),
               (0, 1), lambda: flops() - target)
    if saved_budget is not None:
        _lower(ranks, spectra, groups, _byte_step, (0,),
               lambda: saved_bytes(layers, ranks) - saved_budget)
    # after the FLOP cap, which counts every Ry at its compressed cost: measured on the token MLP,
    # letting the cap see the cheaper exact products instead spent them on activation ranks
    # (1.21x vanilla's time, peak 724 MB, against 0.99x and 512 MB this way)
    _snap_gradient_ranks(layers, ranks, cfg.max_rank, rows)
    return {k: (int(v[0]), int(v[1])) for k, v in ranks.items()}


def _byte_step(ly: LayerInfo, w: int, r: int) -> tuple[int, float]:
    return r - 1, float(x_bytes_per_rank(ly))


def _lower(ranks, spectra, groups, step, which: tuple[int, ...], excess) -> None:
    """Lower ranks (of the tensors in ``which``: 0 activation, 1 gradient) while ``excess()``
    is positive, each time the step that gives up the least variance per unit of cost it saves
    (``step(layer, which, rank)`` -> (new rank, saving)). An activation rank is one per basis
    group (``groups``: layer name -> the layers sharing its basis, led by the first): lowering
    it loses the variance of every member."""
    heap = []

    def push(name: str, w: int) -> None:
        members = groups[name] if w == 0 else [None]
        if w == 0 and members[0].name != name:
            return  # the group's first layer stands for it
        r = ranks[name][w]
        new, saving = step(groups[name][0] if w == 0 else _layer(name), w, r)
        if 1 <= new < r and saving > 0:
            loss = len(members) * float(np.sum(spectra[name][w].variance[new:r]))
            heapq.heappush(heap, (loss / saving, name, w, r, new))

    def _layer(name: str):
        return next(ly for ly in groups[name] if ly.name == name)

    for name in ranks:
        for w in which:
            push(name, w)
    over = excess()
    while over > 0 and heap:
        _, name, w, r, new = heapq.heappop(heap)
        if ranks[name][w] != r:
            continue
        for m in (groups[name] if w == 0 else [_layer(name)]):
            ranks[m.name][w] = new
        push(name, w)
        over = excess()
