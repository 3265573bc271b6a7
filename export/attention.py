"""The opset-23 ``Attention`` op, lowered to the standard ops the autodiff differentiates.

torch's dynamo exporter at ``opset_version=23`` writes ``scaled_dot_product_attention`` as one
``Attention`` node. Rather than a rule of its own (the op has a dozen modes), each node becomes

    scores = (Q · scale) @ Kᵀ   [+ float mask | masked to -inf where a bool mask is False]
             [causal: -inf above the diagonal, upper-left aligned] [softcap: c·tanh(s/c)]
    Y      = Softmax(scores, last axis) @ V

with 3-D inputs ``[B, L, H·D]`` (``q_num_heads`` / ``kv_num_heads`` given) split into heads
and merged back, and grouped key/value heads (fewer than the query heads) repeated as torch's
``enable_gqa`` does; a query row whose keys are all masked gives 0 (as torch and the ONNX
reference do), not NaN. Refused with one error naming the node: a KV cache (``past_key`` /
``past_value`` inputs or ``present_*`` outputs in use), the ``qk_matmul_output`` output in
use, opset 24/25's ``nonpad_kv_seqlen`` and sliding windows, and 4-D inputs whose head counts
the graph does not say.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import ExportError, infer_shapes

__all__ = ["lower_attention"]


def lower_attention(model: onnx.ModelProto) -> int:
    """Replace every ``Attention`` node of ``model``'s main graph; returns how many."""
    g = model.graph
    if not any(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in g.node):
        return 0
    shapes, types = _static_shapes(model)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    out: list[onnx.NodeProto] = []
    count = 0
    for node in g.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            out.append(node)
            continue
        lowered, inits = _lower(node, shapes, types, used)
        out.extend(lowered)
        g.initializer.extend(inits)
        count += 1
    del g.node[:]
    g.node.extend(out)
    return count


def _static_shapes(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, int]]:
    """Shapes (None for a symbolic dim) and element types the graph says or infers."""
    try:
        inferred = infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes only help; without them fewer modes lower
        inferred = model
    shapes, types = {}, {}
    for vi in (list(inferred.graph.value_info) + list(inferred.graph.input)
               + list(inferred.graph.output)):
        if not vi.type.HasField("tensor_type"):
            continue
        types[vi.name] = vi.type.tensor_type.elem_type
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return shapes, types


def _lower(node: onnx.NodeProto, shapes: dict[str, list], types: dict[str, int],
           used: set[str]):
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    where = f"Attention '{node.name}'"
    ins = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask, past_k, past_v, nonpad = ins[:7]
    if past_k or past_v or any(o in used for o in node.output[1:] if o):
        raise ExportError(f"{where}: a KV cache (past/present key and value) or the "
                          "qk_matmul_output is not supported in training; export the model "
                          "without a cache")
    if nonpad or len(ins) > 7 or any(int(a.get(w, -1)) != -1
                                     for w in ("left_window_size", "right_window_size")):
        raise ExportError(f"{where}: nonpad_kv_seqlen and sliding windows (opset 24+) are not "
                          "supported; pass the padding as attn_mask, or export at opset 23")
    softcap = float(a.get("softcap", 0.0))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    base = f"{node.name or node.output[0]}/lowered"
    k_ = [0]

    def t(suffix: str) -> str:
        k_[0] += 1
        return f"{base}/{suffix}_{k_[0]}"

    def op(kind: str, inputs: list[str], **attrs) -> str:
        name = t(kind)
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def const(value, dtype=np.float32) -> str:
        name = t("const")
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    rank = len(shapes[q]) if shapes.get(q) is not None else None
    three_d = rank == 3 if rank is not None else bool(a.get("q_num_heads"))
    hq, hk = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
    if three_d:
        if not (hq and hk):
            raise ExportError(f"{where}: 3-D inputs need q_num_heads and kv_num_heads")

        def heads(x: str, n: int) -> str:  # [B, L, n·D] -> [B, n, L, D]
            return op("Transpose", [op("Reshape", [x, const([0, 0, n, -1], np.int64)])],
                      perm=[0, 2, 1, 3])
        q, k, v = heads(q, hq), heads(k, hk), heads(v, hk)
    else:
        sq, sk = shapes.get(q), shapes.get(k)
        hq = sq[1] if sq and len(sq) == 4 and sq[1] else 0
        hk = sk[1] if sk and len(sk) == 4 and sk[1] else 0
        if not (hq and hk):  # grouped heads would need repeating: refuse rather than guess
            raise ExportError(f"{where}: the graph does not say how many query and key/value "
                              "heads it has (symbolic dim 1 of Q or K); export with static head "
                              "counts")
    if hq and hk and hq != hk:  # grouped key/value heads: each serves hq/hk query heads
        if hq % hk:
            raise ExportError(f"{where}: {hq} query heads do not share {hk} key/value heads")

        def repeat(x: str) -> str:  # [B, hk, S, D] -> [B, hk, r, S, D] -> [B, hq, S, D]
            tiled = op("Tile", [op("Unsqueeze", [x, const([2], np.int64)]),
                                const([1, 1, hq // hk, 1, 1], np.int64)])
            shape = op("Concat", [op("Slice", [op("Shape", [x]), const([0], np.int64),
                                               const([1], np.int64)]),
                                  const([hq, -1], np.int64),
                                  op("Slice", [op("Shape", [x]), const([3], np.int64),
                                               const([4], np.int64)])], axis=0)
            return op("Reshape", [tiled, shape])
        k, v = repeat(k), repeat(v)
    scale = a.get("scale")
    if scale is None:  # 1/√D, D the query's last dim, read at run time
        d = op("Cast", [op("Shape", [q], start=-1)], to=TensorProto.FLOAT)
        qs = op("Div", [q, op("Sqrt", [d])])
    else:
        qs = op("Mul", [q, const(float(scale))])
    s = op("MatMul", [qs, op("Transpose", [k], perm=[0, 1, 3, 2])])
    if softcap > 0:
        s = op("Mul", [op("Tanh", [op("Div", [s, const(softcap)])]), const(softcap)])
    ms, ks = shapes.get(mask), shapes.get(ins[1])
    if mask and ms and ks and ms[-1] and ks[-2] and ms[-1] != ks[-2]:
        raise ExportError(f"{where}: attn_mask covers {ms[-1]} of {ks[-2]} keys; pass a mask "
                          "over every key")
    if mask:  # bool: True takes part; float: added to the scores
        s = (op("Where", [mask, s, const(-np.inf)]) if types.get(mask) == TensorProto.BOOL
             else op("Add", [s, mask]))
    if a.get("is_causal", 0):
        ls = op("Shape", [s], start=-2)  # [L, S]
        ones = op("ConstantOfShape", [ls], value=helper.make_tensor("one", TensorProto.FLOAT,
                                                                    [1], [1.0]))
        above = op("Cast", [op("Trilu", [ones, const(1, np.int64)], upper=1)],
                   to=TensorProto.BOOL)
        s = op("Where", [above, const(-np.inf), s])
    if mask or a.get("is_causal", 0):  # a row with every key masked: 0 (torch, ONNX), not NaN
        none = op("Equal", [op("ReduceMax", [s, const([-1], np.int64)], keepdims=1),
                            const(-np.inf)])
        # its softmax runs on zeros: the softmax of an all -inf row is NaN, which the Where
        # after it hid in the forward but not in the backward (an outside review: a float
        # mask's fully masked row made every key's gradient NaN)
        s = op("Where", [none, const(0.0), s])
        p = op("Where", [none, const(0.0), op("Softmax", [s], axis=-1)])
    else:
        p = op("Softmax", [s], axis=-1)
    y = op("MatMul", [p, v])
    if three_d:  # [B, hq, L, Dv] -> [B, L, hq·Dv]
        y = op("Reshape", [op("Transpose", [y], perm=[0, 2, 1, 3]),
                           const([0, 0, -1], np.int64)])
    nodes.append(helper.make_node("Identity", [y], [node.output[0]], name=f"{base}/out"))
    return nodes, inits

