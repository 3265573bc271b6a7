"""Recurrent layers (ONNX ``GRU`` / ``LSTM``, which torch's ``nn.GRU`` / ``nn.LSTM`` export to)
unrolled over their static sequence length into ops that have gradient rules, so they train.

One ONNX ``GRU`` runs the whole sequence; its backward is backpropagation through time. Written
out step by step (a ``MatMul`` of the state with Rᵀ, the gates, the new state), the backward is
built by the ordinary rules and the weights W, R, B train like any other tensor. The input
projection X·Wᵀ runs once for all steps (one ``MatMul`` over [L, N, I]) and is split by time.
Equations, gate orders (GRU: z, r, h; LSTM: i, o, f, c) and layouts follow the ONNX operator
specification; supported: forward, reverse and bidirectional directions, ``layout`` 0 and 1,
GRU's ``linear_before_reset`` (torch sets it), LSTM peepholes, initial states. Not supported
(refused with the node named): custom activations, ``clip``, ``sequence_lens``, LSTM
``input_forget``, a sequence length that is not static.

The weights keep ONNX's layout (gates stacked and reordered with respect to torch's
``weight_ih_l0``): for a torch model they train as ``<module>.W``, ``.R``, ``.B`` of that
layout, and ``export-model`` writes them so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnx import helper

from .graph import Builder, ExportError, Shapes

if TYPE_CHECKING:
    from .tracing import Traced

__all__ = ["lower_recurrent", "lower_traced"]

_GATES = {"GRU": 3, "LSTM": 4}
_DEFAULT_ACTS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _check(node: onnx.NodeProto, a: dict, shapes: Shapes) -> tuple[int, int]:
    op = node.op_type
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    nd = 2 if a.get("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    if acts and [x.lower() for x in acts] != [x.lower() for x in _DEFAULT_ACTS[op] * nd]:
        raise ExportError(f"{op} '{node.name}': activations {acts} are not supported (only the "
                          "defaults)")
    for key in ("clip", "activation_alpha", "activation_beta"):
        if key in a:
            raise ExportError(f"{op} '{node.name}': attribute '{key}' is not supported")
    if op == "LSTM" and a.get("input_forget", 0):
        raise ExportError(f"LSTM '{node.name}': input_forget=1 is not supported")
    if _input(node, 4):
        raise ExportError(f"{op} '{node.name}': sequence_lens is not supported; pad the "
                          "sequences and export without lengths")
    xs = list(shapes.of(node.input[0]))
    ws = shapes.shape.get(node.input[1]) or []  # W: [directions, gates·hidden, input size]
    if len(xs) == 3 and not isinstance(xs[2], int) and len(ws) == 3 and isinstance(ws[2], int):
        # (a stacked GRU/LSTM from torch's dynamo exporter: the reshape between two layers
        # leaves the input size unknown to shape inference, while W states it; session 38
        # probe: the model was refused)
        xs[2] = ws[2]
    length = xs[1] if a.get("layout", 0) else xs[0]
    if len(xs) != 3 or not isinstance(length, int) or not isinstance(xs[2], int):
        raise ExportError(f"{op} '{node.name}': the sequence length and input size must be "
                          f"static, got {xs}; export with a fixed sequence length "
                          "(--input-shape N,L,C), or export the ONNX file with "
                          "torch.onnx.export(..., dynamo=False)")
    return length, nd


def _direction(b: Builder, op: str, node, xw_steps: list[str], d: int, reverse: bool,
               hidden: int, lbr: bool, layout: int) -> tuple[list[str], str, str | None]:
    """One direction's steps: the state after every step (in time order), the last state and,
    for an LSTM, the last cell."""
    H, k = hidden, _GATES[op]
    R = _input(node, 2)
    Rd = b.op("Squeeze", [b.op("Slice", [R, b.ints([d]), b.ints([d + 1]), b.ints([0])]),
                          b.ints([0])])                                   # [k·H, H]
    Rt = b.op("Transpose", [Rd], perm=[1, 0])                             # [H, k·H]
    rb = None
    if _input(node, 3):
        Bd = b.op("Slice", [_input(node, 3), b.ints([d]), b.ints([d + 1]), b.ints([0])])
        rb = b.op("Squeeze", [b.op("Slice", [Bd, b.ints([k * H]), b.ints([2 * k * H]),
                                             b.ints([1])]), b.ints([0])])  # [k·H]

    def initial(i: int) -> str | None:
        if not _input(node, i):
            return None
        axis = 1 if layout else 0  # [nd, N, H], or [N, nd, H] in layout 1
        s = b.op("Slice", [_input(node, i), b.ints([d]), b.ints([d + 1]), b.ints([axis])])
        return b.op("Squeeze", [s, b.ints([axis])])                       # [N, H]

    h = initial(5)
    c = initial(6) if op == "LSTM" else None
    if h is None or (op == "LSTM" and c is None):
        first = xw_steps[0]
        zero = b.op("Mul", [b.op("Slice", [first, b.ints([0]), b.ints([H]), b.ints([1])]),
                            b.const(0.0)])                                # zeros [N, H]
        h = h or zero
        c = c or zero if op == "LSTM" else None
    peep = None
    if op == "LSTM" and _input(node, 7):
        pd = b.op("Squeeze", [b.op("Slice", [_input(node, 7), b.ints([d]), b.ints([d + 1]),
                                             b.ints([0])]), b.ints([0])])
        peep = b.op_multi("Split", [pd, b.ints([H, H, H])], 3, axis=0)   # i, o, f
    rh_t = None
    if op == "GRU" and not lbr:  # (r ⊙ h) Rhᵀ: the h-gate's recurrence apart
        rh_t = b.op("Slice", [Rt, b.ints([2 * H]), b.ints([3 * H]), b.ints([1])])
        Rt = b.op("Slice", [Rt, b.ints([0]), b.ints([2 * H]), b.ints([1])])
    order = reversed(range(len(xw_steps))) if reverse else range(len(xw_steps))
    states: dict[int, str] = {}
    for t in order:
        xg = b.op_multi("Split", [xw_steps[t], b.ints([H] * k)], k, axis=1)
        hr = b.op("MatMul", [h, Rt])
        if op == "GRU":
            rbs = b.op_multi("Split", [rb, b.ints([H] * 3)], 3, axis=0) if rb else None
            if lbr:
                hg = b.op_multi("Split", [hr, b.ints([H] * 3)], 3, axis=1)
                if rbs:
                    hg = [b.op("Add", [g, rb_]) for g, rb_ in zip(hg, rbs, strict=True)]
            else:
                hg = b.op_multi("Split", [hr, b.ints([H] * 2)], 2, axis=1)
                if rbs:
                    hg = [b.op("Add", [g, rb_]) for g, rb_ in zip(hg, rbs[:2], strict=True)]
            z = b.op("Sigmoid", [b.op("Add", [xg[0], hg[0]])])
            r = b.op("Sigmoid", [b.op("Add", [xg[1], hg[1]])])
            if lbr:
                pre = b.op("Add", [xg[2], b.op("Mul", [r, hg[2]])])
            else:
                pre = b.op("Add", [xg[2], b.op("MatMul", [b.op("Mul", [r, h]), rh_t])])
                if rbs:
                    pre = b.op("Add", [pre, rbs[2]])
            n = b.op("Tanh", [pre])
            h = b.op("Add", [n, b.op("Mul", [z, b.op("Sub", [h, n])])])  # (1-z)n + z h
        else:
            if rb:
                hr = b.op("Add", [hr, rb])
            g = b.op_multi("Split", [hr, b.ints([H] * 4)], 4, axis=1)
            pre = [b.op("Add", [xg[j], g[j]]) for j in range(4)]         # i, o, f, c
            if peep:
                pre[0] = b.op("Add", [pre[0], b.op("Mul", [peep[0], c])])
                pre[2] = b.op("Add", [pre[2], b.op("Mul", [peep[2], c])])
            i_g, f_g = b.op("Sigmoid", [pre[0]]), b.op("Sigmoid", [pre[2]])
            c = b.op("Add", [b.op("Mul", [f_g, c]), b.op("Mul", [i_g, b.op("Tanh", [pre[3]])])])
            if peep:
                pre[1] = b.op("Add", [pre[1], b.op("Mul", [peep[1], c])])
            h = b.op("Mul", [b.op("Sigmoid", [pre[1]]), b.op("Tanh", [c])])
        states[t] = h
    return [states[t] for t in range(len(xw_steps))], h, c


def _lower(node: onnx.NodeProto, shapes: Shapes) -> list[onnx.NodeProto] | tuple:
    op, a = node.op_type, _attrs(node)
    length, nd = _check(node, a, shapes)
    H, k = int(a["hidden_size"]), _GATES[op]
    layout = int(a.get("layout", 0))
    b = Builder(node.name or op)
    x = node.input[0]
    if layout:
        x = b.op("Transpose", [x], perm=[1, 0, 2])                         # [L, N, I]
    ys, hs, cs = [], [], []
    for d in range(nd):
        Wd = b.op("Squeeze", [b.op("Slice", [node.input[1], b.ints([d]), b.ints([d + 1]),
                                             b.ints([0])]), b.ints([0])])   # [k·H, I]
        xw = b.op("MatMul", [x, b.op("Transpose", [Wd], perm=[1, 0])])    # [L, N, k·H]
        if _input(node, 3):
            Bd = b.op("Slice", [node.input[3], b.ints([d]), b.ints([d + 1]), b.ints([0])])
            wb = b.op("Squeeze", [b.op("Slice", [Bd, b.ints([0]), b.ints([k * H]),
                                                 b.ints([1])]), b.ints([0])])
            xw = b.op("Add", [xw, wb])
        steps = b.op_multi("Split", [xw, b.ints([1] * length)], length, axis=0)
        steps = [b.op("Squeeze", [s, b.ints([0])]) for s in steps]         # [N, k·H] each
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        reverse = direction == "reverse" or d == 1
        states, h_last, c_last = _direction(b, op, node, steps, d, reverse, H,
                                            bool(a.get("linear_before_reset", 0)), layout)
        ys.append(b.op("Unsqueeze", [b.op("Concat", [b.op("Unsqueeze", [s, b.ints([0])])
                                                     for s in states], axis=0), b.ints([1])]))
        hs.append(b.op("Unsqueeze", [h_last, b.ints([0])]))
        if c_last is not None:
            cs.append(b.op("Unsqueeze", [c_last, b.ints([0])]))
    outs = [(ys, None), (hs, [1, 0, 2]), (cs, [1, 0, 2])]  # Y [L, nd, N, H]; Y_h, Y_c [nd, N, H]
    for i, (parts, perm) in enumerate(outs[:len(node.output)]):
        name = node.output[i]
        if not name:
            continue
        if layout:
            t = b.op("Concat", parts, axis=0 if i else 1)
            b.op("Transpose", [t], out=name, perm=[2, 0, 1, 3] if i == 0 else perm)
        else:
            b.op("Concat", parts, out=name, axis=1 if i == 0 else 0)
    return b.nodes, b.initializers


def lower_recurrent(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Replace every GRU/LSTM node of ``model`` by its unrolled steps (in place); returns the
    nodes replaced."""
    if not any(n.op_type in _GATES for n in model.graph.node):
        return []
    shapes = Shapes(model)
    done, nodes = [], []
    for node in model.graph.node:
        if node.op_type not in _GATES:
            nodes.append(node)
            continue
        new, inits = _lower(node, shapes)
        nodes.extend(new)
        model.graph.initializer.extend(inits)
        done.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def lower_traced(traced: Traced) -> Traced:
    """GRU/LSTM nodes unrolled (``export/recurrent.py``), opset 23's ``Attention`` lowered
    (``export/attention.py``); a torch model's recurrent weights
    then train in ONNX's layout as ``<module>.<node>.W`` / ``.R`` / ``.B`` / ``.P``."""
    from .attention import lower_attention
    from .layers import module_path
    from .passes.strided_pointwise import split_strided_pointwise

    lower_attention(traced.model)  # opset 23's Attention as MatMul/Softmax (export/attention.py)
    split_strided_pointwise(traced.model)  # a stride-2 1x1 conv: Slice + a compressible conv
    done = lower_recurrent(traced.model)
    if not done or not traced.from_torch:
        return traced
    inits = {i.name for i in traced.model.graph.initializer}
    for node in done:
        path = module_path(node.name) or ""
        base = ".".join(p for p in (path, node.name.rsplit("/", 1)[-1]) if p)
        added = []
        for role, i in (("W", 1), ("R", 2), ("B", 3), ("P", 7)):
            name = node.input[i] if len(node.input) > i else ""
            if name in inits and name not in traced.torch_names:
                traced.torch_names[name] = (f"{base}.{role}", False)
                added.append(name)
        top = path.split(".", 1)[0]
        traced.unmapped = [p for p in traced.unmapped if not p.startswith(f"{path}.")]
        for cname, names in traced.children:
            if cname == top:
                names.extend(added)
    return traced
