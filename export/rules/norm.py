"""Gradient rules of normalisation layers (exact)."""

from __future__ import annotations

import onnx

from ..autodiff import RuleSet
from ..graph import ExportError
from .common import attrs, mean_over, needs, reduce_sum, unbroadcast

RULES = RuleSet("norm")


@RULES.gradient("BatchNormalization")
def batchnorm_grad(ctx, node, gy):
    a = attrs(node)
    if a.get("training_mode", 0):
        raise ExportError(f"BatchNormalization '{node.name}' is in training form; export the "
                          "model in eval mode (running statistics) to fine-tune it")
    x, scale, bias, mean, var = node.input[:5]
    for i in (3, 4):
        if needs(ctx, node, i):
            raise ExportError(f"BatchNormalization '{node.name}': running statistics "
                              f"'{node.input[i]}' cannot be trainable")
    eps = float(a.get("epsilon", 1e-5))
    b = ctx.bwd
    rank = ctx.shapes.rank(x)
    c = ctx.shapes.of(x)[1]
    bshape = b.ints([c] + [1] * (rank - 2))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])])
    axes = [0] + list(range(2, rank))
    gx = gs = gb = None
    if needs(ctx, node, 0):
        gx = b.op("Mul", [gy[0], b.op("Reshape", [b.op("Mul", [scale, inv]), bshape])])
    if needs(ctx, node, 1):
        xhat = b.op("Mul", [b.op("Sub", [x, b.op("Reshape", [mean, bshape])]),
                            b.op("Reshape", [inv, bshape])])
        gs = reduce_sum(ctx, b.op("Mul", [gy[0], xhat]), axes, keepdims=0)
    if needs(ctx, node, 2):
        gb = reduce_sum(ctx, gy[0], axes, keepdims=0)
    return [gx, gs, gb, None, None]


def _layernorm_stats(node: onnx.NodeProto) -> tuple[str, str]:
    """Ask the forward LayerNormalization for its Mean and InvStdDev outputs (small: one value
    per normalised row), as the MaxPool rule asks for indices."""
    while len(node.output) < 3:
        node.output.append("")
    for i, suffix in ((1, "mean"), (2, "invstd")):
        if not node.output[i]:
            node.output[i] = f"{node.output[0]}.{suffix}"
    return node.output[1], node.output[2]


@RULES.gradient("LayerNormalization", outputs=3)
def layernorm_grad(ctx, node, gy):
    """y = x̂·scale + B, x̂ = (x - mean)·invstd over axes [axis, rank);
    g_x = invstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) with ĝ = g·scale. Where the model also reads the
    Mean and InvStdDev outputs (C values normalised together): + g_mean/C and
    - g_invstd·invstd²·x̂/C (an outside review: they were dropped, and a graph reading the
    mean alone failed in a TypeError)."""
    x, scale = node.input[0], node.input[1]
    y, g, b = node.output[0], gy[0], ctx.bwd
    g_stats = [gy[i] if len(gy) > i else None for i in (1, 2)]
    rank = ctx.shapes.rank(x)
    axes = list(range(attrs(node).get("axis", -1) % rank, rank))
    gx = gs = gb = None
    if g is not None and needs(ctx, node, 2):
        gb = unbroadcast(ctx, g, y, node.input[2])
    if needs(ctx, node, 0) or (g is not None and needs(ctx, node, 1)):
        mean, invstd = _layernorm_stats(node)
        xhat = b.op("Mul", [b.op("Sub", [x, mean]), invstd])
        if g is not None and needs(ctx, node, 1):
            gs = unbroadcast(ctx, b.op("Mul", [g, xhat]), y, scale)
        if g is not None and needs(ctx, node, 0):
            gh = b.op("Mul", [g, scale])
            m1 = mean_over(ctx, gh, axes, x)
            m2 = mean_over(ctx, b.op("Mul", [gh, xhat]), axes, x)
            gx = b.op("Mul", [b.op("Sub", [b.op("Sub", [gh, m1]), b.op("Mul", [xhat, m2])]),
                              invstd])
        if needs(ctx, node, 0) and any(t is not None for t in g_stats):
            gx = _layernorm_stats_grad(ctx, node, x, axes, xhat, invstd, gx, *g_stats)
    return [gx, gs, gb][: len(node.input)]


def _layernorm_stats_grad(ctx, node, x: str, axes: list[int], xhat: str, invstd: str,
                          gx: str | None, g_mean: str | None, g_invstd: str | None) -> str:
    """``gx`` plus what reaches x through LayerNormalization's Mean and InvStdDev outputs:
    ∂mean/∂x = 1/C, ∂invstd/∂x = −invstd²·x̂/C."""
    b = ctx.bwd
    count = ctx.shapes.numel_static(x, axes)
    if count is None:
        raise ExportError(f"LayerNormalization '{node.name}': its Mean/InvStdDev outputs are "
                          "used and its normalised axes have no fixed size; export with fixed "
                          "sizes there")
    terms = [] if gx is None else [gx]
    if g_mean is not None:
        terms.append(b.op("Mul", [g_mean, b.const(1.0 / count)]))
    if g_invstd is not None:
        inv2 = b.op("Mul", [invstd, invstd])
        terms.append(b.op("Mul", [b.op("Mul", [g_invstd, inv2]),
                                  b.op("Mul", [xhat, b.const(-1.0 / count)])]))
    total = terms[0]
    for t in terms[1:]:
        total = b.op("Add", [total, t])
    # (a Mean term alone has the statistics' shape: broadcast to x's)
    return b.op("Expand", [total, b.op("Shape", [x])]) if gx is None and g_invstd is None \
        else total


@RULES.gradient("RMSNormalization")
def rmsnorm_grad(ctx, node, gy):
    """Opset 23: y = x̂·scale, x̂ = x·inv, inv = 1/√(mean(x²) + ε) over axes [axis, rank)
    (LLaMA's RMSNorm); recomputed from x: g_scale = Σ g·x̂, g_x = inv·(ĝ − x̂·mean(ĝ·x̂)),
    ĝ = g·scale."""
    x, scale = node.input[0], node.input[1]
    y, g, b = node.output[0], gy[0], ctx.bwd
    rank = ctx.shapes.rank(x)
    axes = list(range(attrs(node).get("axis", -1) % rank, rank))
    eps = float(attrs(node).get("epsilon", 1e-5))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [
        mean_over(ctx, b.op("Mul", [x, x]), axes, x), b.const(eps)])])])
    xhat = b.op("Mul", [x, inv])
    gs = unbroadcast(ctx, b.op("Mul", [g, xhat]), y, scale) if needs(ctx, node, 1) else None
    gx = None
    if needs(ctx, node, 0):
        gh = b.op("Mul", [g, scale])
        m = mean_over(ctx, b.op("Mul", [gh, xhat]), axes, x)
        gx = b.op("Mul", [b.op("Sub", [gh, b.op("Mul", [xhat, m])]), inv])
    return [gx, gs]


@RULES.gradient("InstanceNormalization")
def instancenorm_grad(ctx, node, gy):
    """y = x̂·scale_c + B_c, x̂ = (x - mean)·invstd over the spatial axes of each sample and
    channel (torch's InstanceNorm, and GroupNorm over [N, G, -1]); the statistics are
    recomputed from x in the backward, then the LayerNorm formula:
    g_x = invstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) with ĝ = g·scale_c."""
    x, scale = node.input[0], node.input[1]
    g, b = gy[0], ctx.bwd
    rank = ctx.shapes.rank(x)
    if rank < 3:
        raise ExportError(f"InstanceNormalization '{node.name}': input of rank {rank}; "
                          "expected [N, C, spatial...]")
    axes = list(range(2, rank))
    c = ctx.shapes.of(x)[1]
    bshape = b.ints([c] + [1] * (rank - 2))
    eps = float(attrs(node).get("epsilon", 1e-5))
    gx = gs = gb = None
    if needs(ctx, node, 2):
        gb = reduce_sum(ctx, g, [0] + axes, keepdims=0)
    if needs(ctx, node, 0) or needs(ctx, node, 1):
        xc = b.op("Sub", [x, mean_over(ctx, x, axes, x)])
        var = mean_over(ctx, b.op("Mul", [xc, xc]), axes, x)
        invstd = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])])
        xhat = b.op("Mul", [xc, invstd])
        if needs(ctx, node, 1):
            gs = reduce_sum(ctx, b.op("Mul", [g, xhat]), [0] + axes, keepdims=0)
        if needs(ctx, node, 0):
            gh = b.op("Mul", [g, b.op("Reshape", [scale, bshape])])
            m1 = mean_over(ctx, gh, axes, x)
            m2 = mean_over(ctx, b.op("Mul", [gh, xhat]), axes, x)
            gx = b.op("Mul", [b.op("Sub", [b.op("Sub", [gh, m1]), b.op("Mul", [xhat, m2])]),
                              invstd])
    return [gx, gs, gb]
