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


@RULES.gradient("LayerNormalization")
def layernorm_grad(ctx, node, gy):
    """y = x̂·scale + B, x̂ = (x - mean)·invstd over axes [axis, rank);
    g_x = invstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) with ĝ = g·scale."""
    x, scale = node.input[0], node.input[1]
    y, g, b = node.output[0], gy[0], ctx.bwd
    rank = ctx.shapes.rank(x)
    axes = list(range(attrs(node).get("axis", -1) % rank, rank))
    gx = gs = gb = None
    if needs(ctx, node, 2):
        gb = unbroadcast(ctx, g, y, node.input[2])
    if needs(ctx, node, 0) or needs(ctx, node, 1):
        mean, invstd = _layernorm_stats(node)
        xhat = b.op("Mul", [b.op("Sub", [x, mean]), invstd])
        if needs(ctx, node, 1):
            gs = unbroadcast(ctx, b.op("Mul", [g, xhat]), y, scale)
        if needs(ctx, node, 0):
            gh = b.op("Mul", [g, scale])
            m1 = mean_over(ctx, gh, axes, x)
            m2 = mean_over(ctx, b.op("Mul", [gh, xhat]), axes, x)
            gx = b.op("Mul", [b.op("Sub", [b.op("Sub", [gh, m1]), b.op("Mul", [xhat, m2])]),
                              invstd])
    return [gx, gs, gb][: len(node.input)]
