"""Backward pass ``half_batch_mask``: ``Mul(MatMul(Z, W), mask)`` runs per half-batch when
``mask`` comes from saved bits (``mask_bits``) and the MatMul is separable along the batch
(``Z`` batch-major [N, ...], ``W`` a matrix, either operand order), and so does ``Mul(If(..),
mask)`` where the ``If``'s branches only multiply one batch-major tensor by matrices (INSTANT's
input gradient, exact or compressed by the rank: ``export/rules/linear.py: full_rank``).

onnxruntime runs no elementwise op in place, so ``Mul(g, mask)`` holds three full-size tensors
at once (g, the unpacked float mask, the product). Per half: the MatMul, the unpacking and the
product run on half the rows each and are concatenated; at most two full-size tensors are alive.
Where it fires: INSTANT's input gradient ``g_x = Qᵀ((Q g) W)`` flowing into a ReLU of the layer
below. Measured on the token-MLP benchmark (four [256, 128, 512] layers): INSTANT peak above idle
235 -> 186 MB, with ``broadcast_expand`` and ``concat_pushdown``.

Leaves a note: ``notes["half_concat"][result] = [half results]`` (for ``concat_pushdown``).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from ..autodiff import Draft
from ..graph import Builder, Shapes, reads
from .mask_bits import unpack_bits

__all__ = ["batch_operand", "half_batch_mask", "on_half", "separable_operand"]


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


def separable_operand(shapes: Shapes, node: onnx.NodeProto,
                      declared: dict[str, str] | None = None) -> str | None:
    """The batch-major tensor ``node`` reads, where running ``node`` on two halves of that
    tensor's batch gives the two halves of its result: a MatMul by a matrix, an ``If`` its rule
    declared so (``declared``: ``GradContext.batch_separable``, e.g. INSTANT's input gradient,
    whose branches reshape rows for a Gemm), or an ``If`` whose branches only multiply that one
    batch-major tensor by matrices (MatMul, 2-D Transpose, Identity); else None."""
    if node.op_type == "MatMul":
        j = batch_operand(shapes, list(node.input))
        return None if j is None else node.input[j]
    if node.op_type != "If":
        return None
    if declared and node.output[0] in declared:
        return declared[node.output[0]]
    batch = []
    for t in sorted(set(reads(node)) - set(node.input)):
        dims = shapes.shape.get(t)
        if dims is None:
            return None
        if len(dims) >= 3 and isinstance(dims[0], str):
            batch.append(t)
        elif len(dims) > 2:
            return None
    if len(batch) != 1:
        return None
    for a in node.attribute:
        if a.type != onnx.AttributeProto.GRAPH or a.g.initializer:
            return None
        for n in a.g.node:
            perm = [list(x.ints) for x in n.attribute if x.name == "perm"]
            if n.op_type not in ("MatMul", "Transpose", "Identity") or (
                    n.op_type == "Transpose" and (not perm or len(perm[0]) != 2)):
                return None
    return batch[0]


def on_half(b: Builder, node: onnx.NodeProto, z: str, z_half: str) -> str:
    """A copy of separable ``node`` (:func:`separable_operand`) reading ``z_half`` in place of
    ``z``, appended to ``b``; returns its result."""
    if node.op_type == "MatMul":
        return b.op("MatMul", [z_half if i == z else i for i in node.input])
    tag = b.fresh("half")
    branches = {}
    for a in node.attribute:
        g = copy.deepcopy(a.g)
        rename = {o: f"{o}~{tag}" for n in g.node for o in n.output if o}
        rename.update({t.name: f"{t.name}~{tag}" for t in g.initializer})
        for t in g.initializer:
            t.name = rename[t.name]
        rename[z] = z_half
        for n in g.node:
            n.input[:] = [rename.get(i, i) for i in n.input]
            n.output[:] = [rename.get(o, o) for o in n.output]
            n.name = f"{n.name}~{tag}"
        for o in g.output:
            o.name = rename.get(o.name, o.name)
        g.name = f"{g.name}~{tag}"
        branches[a.name] = g
    return b.op("If", list(node.input), **branches)


def half_batch_mask(d: Draft) -> None:
    bits = d.notes.get("mask_bits", {})
    halves = d.notes.setdefault("half_concat", {})
    shapes = None
    producers = d.bwd_producers()  # (looked up again after each split, which rewires)
    for mul in list(d.bwd.nodes):
        if mul.op_type != "Mul" or len(mul.input) != 2 or mul.output[0] in d.protected:
            continue
        for k in (0, 1):
            g, m = mul.input[k], mul.input[1 - k]
            if m not in bits:
                continue
            mm = producers.get(g)
            if (mm is None or mm.op_type not in ("MatMul", "If")
                    or len(d.bwd_consumers(g)) != 1 or len(d.bwd_consumers(m)) != 1):
                continue
            shapes = shapes or d.backward_shapes()
            z = separable_operand(shapes, mm, d.notes.get("batch_separable"))
            if z is None:
                continue
            _split(d, mul, k, mm, z, bits[m]["packed"], halves)
            producers = d.bwd_producers()
            break


def _split(d: Draft, mul, k: int, mm, z: str, packed: str, halves: dict) -> None:
    b = d.bwd
    start = len(b.nodes)
    zero, one, axis0 = b.ints([0]), b.ints([1]), b.ints([0])
    parts = halves.get(z)  # z is itself per half (the layer above's): read its halves
    if parts is not None:
        half = b.op("Slice", [b.op("Shape", [parts[0]]), zero, one])
    else:
        half = b.op("Div", [b.op("Slice", [b.op("Shape", [z]), zero, one]), b.ints([2])])
    big = b.ints([np.iinfo(np.int64).max])
    outs = []
    for i, (lo, hi) in enumerate(((zero, half), (half, big))):
        zh = parts[i] if parts is not None else b.op("Slice", [z, lo, hi, axis0])
        gh = on_half(b, mm, z, zh)
        mask = unpack_bits(d, b.op("Slice", [packed, lo, hi, axis0]), b.op("Shape", [gh]))
        outs.append(b.op("Mul", [gh, mask] if k == 0 else [mask, gh]))
    b.op("Concat", outs, axis=0, out=mul.output[0])
    d.replace_bwd([mm, mul], d.take_new_bwd(start))
    halves[mul.output[0]] = outs
