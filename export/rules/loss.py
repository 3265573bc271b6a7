"""Gradient rules of the losses the exporter appends (exact)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..autodiff import RuleSet
from ..graph import ExportError
from .common import attrs

RULES = RuleSet("loss")


@RULES.gradient("SoftmaxCrossEntropyLoss")
def softmax_ce_grad(ctx, node, gy):
    a = attrs(node)
    scores, labels = node.input[0], node.input[1]
    if len(node.input) > 2 or "ignore_index" in a or ctx.shapes.rank(scores) != 2:
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': only 2-D scores without "
                          "weights or ignore_index are supported")
    classes = ctx.shapes.of(scores)[1]
    if not isinstance(classes, int):
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': the class count must be static")
    b = ctx.bwd
    prob = b.op("Softmax", [scores], axis=1)
    onehot = b.op("OneHot", [labels, b.const(classes, np.int64), b.const([0.0, 1.0])], axis=-1)
    g = b.op("Mul", [b.op("Sub", [prob, onehot]), gy[0]])
    if a.get("reduction", "mean") == "mean":
        n = b.op("Slice", [ctx.shape(scores), b.ints([0]), b.ints([1])])
        g = b.op("Div", [g, b.op("Cast", [n], to=TensorProto.FLOAT)])
    elif a.get("reduction") != "sum":
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': reduction must be mean or sum")
    return [g, None]
