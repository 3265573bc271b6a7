"""Backward pass ``half_batch_mask``: ``Mul(MatMul(Z, W), mask)`` runs per half-batch when
``mask`` comes from saved bits (``mask_bits``) and the MatMul is separable along the batch
(``Z`` batch-major [N, ...], ``W`` a matrix, either operand order).

onnxruntime runs no elementwise op in place, so ``Mul(g, mask)`` holds three full-size tensors
at once (g, the unpacked float mask, the product). Per half: the MatMul, the unpacking and the
product run on half the rows each and are concatenated; at most two full-size tensors are alive.
Where it fires: INSTANT's input gradient ``g_x = Qᵀ((Q g) W)`` flowing into a ReLU of the layer
below. Measured on the token-MLP benchmark (four [256, 128, 512] layers): INSTANT peak above idle
235 -> 186 MB, with ``broadcast_expand`` and ``concat_pushdown``.

Leaves a note: ``notes["half_concat"][result] = [half results]`` (for ``concat_pushdown``).
"""

from __future__ import annotations

import numpy as np

from ..autodiff import Draft
from ..graph import Shapes
from .mask_bits import unpack_bits

__all__ = ["batch_operand", "half_batch_mask"]


def batch_operand(shapes: Shapes, inputs: list[str]) -> int | None:
    """Index of the batch-major operand of a MatMul whose other operand is a matrix (rank 2):
    applied to two halves of the batch it gives the two halves of the result."""
    if len(inputs) != 2:
        return None
    ranks = []
    for t in inputs:
        dims = shapes.shape.get(t)
        if dims is None:
            return None
        ranks.append(dims)
    for k in (0, 1):
        z, w = ranks[k], ranks[1 - k]
        if len(w) == 2 and len(z) >= 3 and isinstance(z[0], str):
            return k
    return None


def half_batch_mask(d: Draft) -> None:
    bits = d.notes.get("mask_bits", {})
    halves = d.notes.setdefault("half_concat", {})
    shapes = None
    for mul in list(d.bwd.nodes):
        if mul.op_type != "Mul" or len(mul.input) != 2 or mul.output[0] in d.protected:
            continue
        for k in (0, 1):
            g, m = mul.input[k], mul.input[1 - k]
            mm = d.bwd_producer(g)
            if (m not in bits or mm is None or mm.op_type != "MatMul"
                    or len(d.bwd_consumers(g)) != 1 or len(d.bwd_consumers(m)) != 1):
                continue
            shapes = shapes or d.backward_shapes()
            j = batch_operand(shapes, list(mm.input))
            if j is None:
                continue
            _split(d, mul, k, mm, j, bits[m]["packed"], halves)
            break


def _split(d: Draft, mul, k: int, mm, j: int, packed: str, halves: dict) -> None:
    b = d.bwd
    start = len(b.nodes)
    z = mm.input[j]
    zero, one, axis0 = b.ints([0]), b.ints([1]), b.ints([0])
    n = b.op("Slice", [b.op("Shape", [z]), zero, one])
    half = b.op("Div", [n, b.ints([2])])
    big = b.ints([np.iinfo(np.int64).max])
    outs = []
    for lo, hi in ((zero, half), (half, big)):
        inputs = list(mm.input)
        inputs[j] = b.op("Slice", [z, lo, hi, axis0])
        gh = b.op("MatMul", inputs)
        mask = unpack_bits(d, b.op("Slice", [packed, lo, hi, axis0]), b.op("Shape", [gh]))
        outs.append(b.op("Mul", [gh, mask] if k == 0 else [mask, gh]))
    b.op("Concat", outs, axis=0, out=mul.output[0])
    d.replace_bwd([mm, mul], d.take_new_bwd(start))
    halves[mul.output[0]] = outs
