"""Backward pass ``empty_half``: a basis times a batch-major tensor also runs on an empty batch.

``half_batch_mask`` and ``concat_pushdown`` run INSTANT's products per half-batch: at a
micro-batch of 1 the first half holds 0 samples. onnxruntime up to 1.31 (1.31.1 is the newest
onnxruntime-gpu as of 2026-12, and the CPU build before 1.32) refuses ``MatMul(A, B)`` where B
has a batch dimension of 0 and A has none or 1: "matmul_helper.h:144 Compute right operand
cannot broadcast on dim 0"; 1.32 returns the empty product. Every INSTANT token model with a
ReLU below a compressed layer failed there at micro-batch 1, which every budget plan probes
(found on an H200 with onnxruntime-gpu 1.31.1, session 22; the CPU build 1.31.1 fails the same).

Each ``MatMul(basis, X)`` of the backward (P or Q, or its 2-D transpose; in the main graph and
in the branches of INSTANT's ``If``) reads the basis broadcast to X's rank with leading
dimensions ``[min(n, 1), 1, …]``, n being X's first dimension: the same product (a broadcast
of a leading 1), and both operands empty where X is. The shape arithmetic is a few integer ops
on the host; the copy is the basis itself (r × L floats). Any rank of X is handled (rank ≤ 2:
no leading dimensions, the basis unchanged).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..autodiff import Draft

__all__ = ["empty_half"]


def empty_half(d: Draft) -> None:
    bases = _bases(d)
    if not bases:
        return
    count = [0]
    d.bwd.nodes[:] = _guarded(list(d.bwd.nodes), bases, count, "grad/empty_half")


def _bases(d: Draft) -> set[str]:
    names = {i.name for i in d.graph.input} | set(d.graph_inputs())
    for n in d.bwd.nodes:
        names.update(n.input)
    return {t for t in names if t.startswith("instant.") and t.endswith((".P", ".Q"))}


def _guarded(nodes: list[onnx.NodeProto], bases: set[str], count: list[int],
             prefix: str) -> list[onnx.NodeProto]:
    """``nodes`` with every basis-left MatMul guarded (recursing into If branches)."""
    matrices = set(bases)  # a basis, or a 2-D transpose of one made in this graph
    out: list[onnx.NodeProto] = []
    for n in nodes:
        if n.op_type == "Transpose" and n.input and n.input[0] in matrices:
            perm = [list(a.ints) for a in n.attribute if a.name == "perm"]
            if not perm or perm[0] == [1, 0]:
                matrices.add(n.output[0])
        if n.op_type == "If":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    sub = _guarded(list(a.g.node), matrices, count, prefix)
                    del a.g.node[:]
                    a.g.node.extend(sub)
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[0] in matrices:
            count[0] += 1
            extra, left = _guard(n.input[0], n.input[1], f"{prefix}_{count[0]}")
            out.extend(extra)
            n.input[0] = left
        out.append(n)
    return out


def _const(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(values, dtype=np.int64), name))


def _guard(left: str, right: str, p: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes making ``left`` (a matrix) ``[min(n, 1), 1, …] + shape(left)`` with as many
    leading dimensions as ``right`` has beyond two (n: ``right``'s first dimension)."""
    mk = helper.make_node
    nodes = [
        _const(f"{p}/zero", [0]), _const(f"{p}/one", [1]), _const(f"{p}/two", [2]),
        _const(f"{p}/end", [np.iinfo(np.int64).max]),
        mk("Shape", [right], [f"{p}/shape"]),
        mk("Shape", [f"{p}/shape"], [f"{p}/rank"]),
        mk("Sub", [f"{p}/rank", f"{p}/two"], [f"{p}/k"]),
        mk("Max", [f"{p}/k", f"{p}/zero"], [f"{p}/lead"]),  # leading dims: rank - 2, at least 0
        mk("ConstantOfShape", [f"{p}/lead"], [f"{p}/ones"],
           value=numpy_helper.from_array(np.ones(1, np.int64), "v")),
        mk("Slice", [f"{p}/shape", f"{p}/zero", f"{p}/one"], [f"{p}/n"]),
        mk("Min", [f"{p}/n", f"{p}/one"], [f"{p}/n1"]),
        mk("Slice", [f"{p}/ones", f"{p}/one", f"{p}/end"], [f"{p}/rest"]),
        mk("Concat", [f"{p}/n1", f"{p}/rest"], [f"{p}/first"], axis=0),
        mk("Slice", [f"{p}/first", f"{p}/zero", f"{p}/lead"], [f"{p}/dims"]),
        mk("Shape", [left], [f"{p}/own"]),
        mk("Concat", [f"{p}/dims", f"{p}/own"], [f"{p}/target"], axis=0),
        mk("Expand", [left, f"{p}/target"], [f"{p}/left"]),
    ]
    return nodes, f"{p}/left"
