"""Backward FLOPs and saved-activation bytes of the compressed layers (docs/method.md formulas).

Per sample, one layer with L tokens, Cx inputs, Cy outputs:
    vanilla backward  4·L·Cx·Cy FLOPs                 saved  L·Cx floats
    INSTANT backward  2(Rx+Ry)(Cx·Cy + L·Cx + L·Cy)   saved  Rx·Cx (token axis) or L·Rx (channel)
                      (a full Ry: the exact input
                      gradient, 2·L·Cx·Cy, runtime/ranks.py)
                                                      floats, or as many int8 plus a float32
                                                      scale per rank (``export --saved-int8``)
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.manifest import LayerInfo

from .ranks import gx_exact, layer_flops, x_bytes_per_rank

__all__ = ["LayerCost", "layer_costs", "format_table"]


@dataclass
class LayerCost:
    name: str
    axes: str
    rx: int
    ry: int
    vanilla_flops: int
    instant_flops: int
    vanilla_bytes: int
    instant_bytes: int
    gx_exact: bool = False  # a full Ry: the graphs run the exact input gradient
    shared: bool = False  # reads the x of a layer above: both modes save it once, counted there
    kept: tuple[float, float] | None = None  # variance fractions the ranks keep (x, g)


def layer_costs(layers: list[LayerInfo], ranks: dict[str, tuple[int, int]], rows: int = 1,
                kept: dict[str, tuple[float, float]] | None = None) -> list[LayerCost]:
    """Per-layer costs per sample at ``ranks``, in micro-batches of ``rows`` samples. A layer
    that reads the same x as one above it (an attention's key and value after its query) saves
    nothing of its own in vanilla mode, nor in INSTANT mode where it shares that layer's basis
    (export/layers.py: share_activation_bases). ``kept``: per layer, the fractions of the
    calibration's activation and output-gradient variance its ranks keep (a column each)."""
    out = []
    xs: set[str] = set()
    bases: set[str] = set()
    for ly in layers:
        L, cx, cy = ly.tokens, ly.cx, ly.cy
        rx, ry = ranks.get(ly.name, (ly.x_dim, ly.g_dim))
        van = 0 if ly.x in xs else 4 * L * cx
        ins = 0 if ly.p_input in bases else x_bytes_per_rank(ly) * rx
        xs.add(ly.x)
        bases.add(ly.p_input)
        out.append(LayerCost(
            ly.name, f"{ly.x_axis[0]}/{ly.g_axis[0]}", rx, ry,
            4 * L * cx * cy, layer_flops(ly, rx, ry, rows), van, ins, gx_exact(ly, ry),
            shared=van == 0 and ins == 0, kept=(kept or {}).get(ly.name)))
    return out


def format_table(costs: list[LayerCost]) -> str:
    w = max([24, *(len(c.name) for c in costs)])  # (a file's m.layer4.attention.output: 25)
    kept = all(c.kept is not None for c in costs) and bool(costs)
    rows = [f"{'layer':<{w}} {'axes':>4} {'Rx':>5} {'Ry':>5} {'bwd MFLOP van':>14} "
            f"{'bwd MFLOP ins':>14} {'saved KB van':>13} {'saved KB ins':>13}"
            + (f" {'kept x':>7} {'kept g':>7}" if kept else "")]
    tv = ti = bv = bi = 0
    for c in costs:
        ry = "exact" if c.gx_exact else c.ry
        kb = (f"{'shared':>13} {'shared':>13}" if c.shared else
              f"{c.vanilla_bytes / 1e3:>13.2f} {c.instant_bytes / 1e3:>13.2f}")
        rows.append(f"{c.name:<{w}} {c.axes:>4} {c.rx:>5} {ry:>5} {c.vanilla_flops / 1e6:>14.3f} "
                    f"{c.instant_flops / 1e6:>14.3f} {kb}"
                    + (f" {c.kept[0]:>7.3f} {1.0 if c.gx_exact else c.kept[1]:>7.3f}"
                       if kept else ""))
        tv, ti = tv + c.vanilla_flops, ti + c.instant_flops
        bv, bi = bv + c.vanilla_bytes, bi + c.instant_bytes
    if costs:
        rows.append(f"{'total (per sample)':<{w}} {'':>4} {'':>5} {'':>5} {tv / 1e6:>14.3f} "
                    f"{ti / 1e6:>14.3f} {bv / 1e3:>13.2f} {bi / 1e3:>13.2f}")
        rows.append(f"backward FLOP ratio instant/vanilla = {ti / tv:.3f}; "
                    f"saved-activation ratio = {bi / bv:.3f}")
        if ti > tv:  # (a session 36 probe: a d=32 ViT, 1.14x, with no word)
            rows.append("INSTANT's backward costs more than the exact one here: these layers are "
                        "too small for the projections to pay; --mode vanilla trains exactly for "
                        f"less compute, at {bv / max(bi, 1):.2f}x INSTANT's saved activations")
        if kept:  # (issue 15: the plan prints each layer's ranks and retained energy)
            rows.append("kept x, kept g: the fraction of the calibration's activation and "
                        "output-gradient variance (σ², eigenvalues of the batch Gram) the ranks "
                        "keep; 1.000 is exact")
        if any(c.shared for c in costs):
            rows.append("shared: the layer reads the same activation as the one above it, "
                        "saved once for both (INSTANT: one basis, one x̂)")
        if any(c.gx_exact for c in costs):
            rows.append("Ry exact: the output gradient's projection would cost more than the "
                        "exact input gradient, which runs instead")
    return "\n".join(rows)
