"""Gradient rules of the losses the exporter appends (exact)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..autodiff import RuleSet
from ..graph import ExportError
from .common import attrs

RULES = RuleSet("loss")


@RULES.gradient("SoftmaxCrossEntropyLoss", outputs=2)
def softmax_ce_grad(ctx, node, gy):
    """Scores [N, C] or [N, C, d1, …] (a class per position: a tagger, a language model),
    labels [N] or [N, d1, …]; ``ignore_index`` labels add nothing, and the mean is over the
    others. g = (softmax(s) - onehot(labels)) · keep / count; with ``reduction="none"`` (a loss
    per position, reduced by the model after it) each position's output gradient instead."""
    a = attrs(node)
    scores, labels = node.input[0], node.input[1]
    if len(node.input) > 2 and node.input[2]:
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': class weights are not "
                          "supported")
    classes = ctx.shapes.of(scores)[1]
    if not isinstance(classes, int):
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': the class count must be static")
    reduction = a.get("reduction", "mean")
    if reduction not in ("mean", "sum", "none"):
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': reduction {reduction!r}; "
                          "expected mean, sum or none")
    b = ctx.bwd
    prob = b.op("Softmax", [scores], axis=1)
    g_lp = _log_prob_grad(b, prob, gy[1] if len(gy) > 1 else None)
    if gy[0] is None:
        return [g_lp, None]
    ids, keep = labels, None
    if "ignore_index" in a:
        kept = b.op("Not", [b.op("Equal", [labels, b.const(int(a["ignore_index"]), np.int64)])])
        ids = b.op("Where", [kept, labels, b.const(0, np.int64)])
        keep = b.op("Cast", [kept], to=TensorProto.FLOAT)
    onehot = b.op("OneHot", [ids, b.const(classes, np.int64), b.const([0.0, 1.0])], axis=1)
    # reduction none: one loss per label position, its gradient beside the class axis
    scale = gy[0] if reduction != "none" else b.op("Unsqueeze", [gy[0], b.ints([1])])
    g = b.op("Mul", [b.op("Sub", [prob, onehot]), scale])
    if keep is not None:
        g = b.op("Mul", [g, b.op("Unsqueeze", [keep, b.ints([1])])])
    if reduction == "mean":
        if keep is not None:
            count = b.op("Max", [b.op("ReduceSum", [keep], keepdims=0), b.const(1.0)])
        else:
            count = b.op("Cast", [b.op("Size", [labels])], to=TensorProto.FLOAT)
        g = b.op("Div", [g, count])
    return [g if g_lp is None else b.op("Add", [g, g_lp]), None]


def _log_prob_grad(b, prob: str, g: str | None) -> str | None:
    """What reaches the scores through the ``log_prob`` output (log-softmax over axis 1):
    g − softmax·Σ_c g (an outside review found it dropped: every element wrong)."""
    if g is None:
        return None
    total = b.op("ReduceSum", [g, b.ints([1])], keepdims=1)
    return b.op("Sub", [g, b.op("Mul", [prob, total])])
