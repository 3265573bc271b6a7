"""The frozen prefix of a text model's forward as a graph of its own, run without padding.

When only the last layers train (``--trainable last:K``), most of a training step's forward is
the frozen part of the model: on MiniLM ``last:3`` the embeddings and 4 of 6 encoder layers. That
part needs no saved activation and no gradient, and, where the model ignores its padding (the
any-length check of ``export/any_length.py``), it gives the same values for the real tokens
whatever padding follows them. So the exporter cuts the training forward where the first
trainable parameter enters:

* the **prefix** (``prefix.onnx``): every node that no trainable parameter (and not the labels)
  reaches, restricted to those whose outputs the rest needs and whose cone holds a MatMul, Gemm
  or Conv (the expensive part). It is taken from the any-length inference graph, so it takes any
  token length; its outputs (the *carried* tensors, e.g. the hidden states after layer 3) are
  inputs of every training graph, which keep the cheap rest (mask arithmetic) themselves;
* at run time a micro-batch goes through the prefix cut to its longest row (the runtime sorts a
  step's rows by length first), and each carried tensor is padded back to the trained length
  along its token axis and zeroed at every masked position before the training graphs see it
  (so a padded position holds zeros whatever micro-batch its row shares).

Exact for the real tokens where the trainable part ignores the padded positions. The exporter
does not assume it: it keeps the split only if, on the tokenizer's encodings of a few sentences,
the training forward fed from the trimmed prefix gives the uncut forward's outputs on the padded
batch; otherwise the training graphs stay whole. Measured effect: docs/memory.md, README Speed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from contract import LossSpec, TextSpec, names

from .graph import Shapes

__all__ = ["Prefix", "split_prefix"]

HEAVY = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "FusedMatMul")
SHAPE_ONLY = ("Shape", "Size")
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


class Prefix:
    """What :func:`split_prefix` found: the prefix graph, the cut training forward and each
    carried tensor's token axis (-1: none)."""

    def __init__(self, graph: onnx.ModelProto, forward: onnx.ModelProto,
                 axes: dict[str, int], bytes_per_sample: int) -> None:
        self.graph, self.forward, self.axes = graph, forward, axes
        self.bytes_per_sample = bytes_per_sample


def _frozen_nodes(g: onnx.GraphProto, tainted: set[str]) -> set[int]:
    """Indices of the nodes that no tensor of ``tainted`` reaches (graphs are topologically
    sorted; a node reading a tainted tensor taints all its outputs)."""
    tainted = set(tainted)
    frozen = set()
    for i, n in enumerate(g.node):
        if any(x in tainted for x in n.input if x):
            tainted.update(o for o in n.output if o)
        else:
            frozen.add(i)
    return frozen


def _cone(g: onnx.GraphProto, producer: dict[str, int], outputs: list[str],
          values_only: bool = False) -> set[int]:
    """Indices of the nodes that ``outputs`` depend on (``values_only``: not through the input
    of a Shape or Size node, which reads no value)."""
    seen: set[int] = set()
    stack = [producer[t] for t in outputs if t in producer]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        if values_only and g.node[i].op_type in SHAPE_ONLY:
            continue
        stack.extend(producer[x] for x in g.node[i].input if x in producer)
    return seen


def _carried(fwd: onnx.ModelProto, params: list[str], shapes: Shapes) -> list[str]:
    """Float tensors made by frozen nodes, read by the trainable part, with a MatMul/Gemm/Conv
    among the nodes whose values they depend on (the expensive part); the cheap rest (mask
    arithmetic, shapes computed from a carried tensor's shape) stays in the training graphs."""
    g = fwd.graph
    frozen = _frozen_nodes(g, set(params) | {names.LABELS})
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    read = {x for i, n in enumerate(g.node) if i not in frozen for x in n.input if x}
    read |= {o.name for o in g.output}
    out = []
    for i in sorted(frozen):
        for o in g.node[i].output:
            if o and o in read and o not in out and shapes.dtype.get(o) in FLOATS:
                cone = _cone(g, producer, [o], values_only=True)
                if any(g.node[j].op_type in HEAVY for j in cone):
                    out.append(o)
    return out


def _recomputes_heavy(cut: onnx.ModelProto, params: list[str]) -> bool:
    """Whether the cut forward still runs a frozen MatMul/Gemm/Conv (a frozen tensor that is
    not carried needs one): the split would then save nothing."""
    g = cut.graph
    frozen = _frozen_nodes(g, set(params) | {names.LABELS})
    return any(g.node[i].op_type in HEAVY for i in frozen)


def _cut_forward(fwd: onnx.ModelProto, carried: list[str], shapes: Shapes) -> onnx.ModelProto | None:
    """The forward with ``carried`` as graph inputs and what only they needed removed."""
    m = copy.deepcopy(fwd)
    g = m.graph
    for t in carried:
        dims = shapes.shape.get(t)
        if dims is None:
            return None
        g.input.append(helper.make_tensor_value_info(t, shapes.dtype.get(t, TensorProto.FLOAT),
                                                     ["N"] + list(dims[1:])))
    need = {o.name for o in g.output}
    keep = []
    stop = set(carried)
    for n in reversed(g.node):
        if any(o in stop for o in n.output):
            if any(o in need and o not in stop for o in n.output):
                return None  # a node making a carried tensor and another one still needed
            continue
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(x for x in n.input if x)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    return m


def _prefix_graph(free: onnx.ModelProto, carried: list[str], params: list[str],
                  dtypes: dict[str, int]) -> onnx.ModelProto | None:
    """The nodes of the any-length inference graph that compute ``carried`` (same tensor
    names: the two traces name tensors after the model's modules), as a graph of its own."""
    g = free.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    if any(t not in producer for t in carried):
        return None
    cone = _cone(g, producer, carried)
    used = {x for i in cone for x in g.node[i].input if x}
    if used & set(params):
        return None
    inputs = [vi for vi in g.input if vi.name in used]
    graph = helper.make_graph(
        [g.node[i] for i in sorted(cone)], "prefix", inputs,
        [helper.make_tensor_value_info(t, dtypes.get(t, TensorProto.FLOAT), None)
         for t in carried],
        [t for t in g.initializer if t.name in used])
    model = helper.make_model(graph, opset_imports=list(free.opset_import),
                              producer_name="instant-runtime")
    model.ir_version = free.ir_version
    return model


def split_prefix(fwd: onnx.ModelProto, free: onnx.ModelProto, params: list[str],
                 initial: dict[str, np.ndarray], lookups: dict[str, dict], tables,
                 text: TextSpec, tokenizer: Path, loss: LossSpec,
                 output: str, keep_rows: dict[str, int] | None = None) -> Prefix | None:
    """Cut ``fwd`` (the training forward with its loss) after its frozen prefix, or None (keep
    it whole): nothing expensive is frozen, the any-length graph ``free`` lacks a carried
    tensor, or the cut changes the outputs on real text (checked with onnxruntime).

    ``tables(name)`` gives a frozen lookup table's values (embedding rows for the check)."""
    shapes = Shapes(fwd)
    carried = _carried(fwd, params, shapes)
    if not carried:
        return None
    cut = _cut_forward(fwd, carried, shapes)
    graph = _prefix_graph(free, carried, params, shapes.dtype)
    if cut is None or graph is None or _recomputes_heavy(cut, params):
        return None
    try:
        axes = _check(fwd, cut, graph, carried, initial, lookups, tables, text, tokenizer, loss,
                      output, keep_rows)
    except Exception:  # noqa: BLE001 - any failure keeps the graphs whole
        return None
    if axes is None:
        return None
    dims = [shapes.shape.get(t) for t in carried]
    if any(d is None or not all(isinstance(k, int) for k in d[1:]) for d in dims):
        return None  # the planner needs each carried tensor's size per sample
    per = sum(int(np.prod(d[1:])) * _itemsize(shapes.dtype.get(t, TensorProto.FLOAT))
              for t, d in zip(carried, dims, strict=True))
    return Prefix(graph, cut, axes, per)


def _itemsize(onnx_type: int) -> int:
    return int(np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)).itemsize)


def run_graph(sess, x: dict[str, np.ndarray], outs: list[str], n: int, lookups: dict, tables,
              initial: dict[str, np.ndarray], loss: LossSpec) -> list[np.ndarray]:
    """Run an export check's session on ``n`` rows ``x``: embedding lookups filled from the
    frozen ``tables``, parameters at their ``initial`` values, zero labels, integer inputs in
    the session's own types."""
    want = {i.name: i for i in sess.get_inputs()}
    full = dict(x)
    for name, lk in lookups.items():
        if name in want:
            full[name] = tables(lk["table"])[x[lk["indices"]]]
    full.update((k, v) for k, v in initial.items() if k in want)
    if names.LABELS in want:
        dims = [n if not isinstance(d, int) else d for d in loss.labels.shape]
        full[names.LABELS] = np.zeros(dims, np.dtype(loss.labels.dtype))
    typed = {}
    for k, i in want.items():
        v = full[k]
        typed[k] = v.astype(np.int64 if i.type == "tensor(int64)" else
                            np.int32 if i.type == "tensor(int32)" else v.dtype)
    return sess.run(outs, typed)


def _check(fwd, cut, graph, carried, initial, lookups, tables, text, tokenizer, loss,
           output, keep_rows=None) -> dict[str, int] | None:
    """Token axis of each carried tensor, or None when the cut forward fed from the trimmed
    prefix does not give the uncut forward's outputs on padded text, at the initial weights
    and at weights moved as training could move them (any_length.py ``moved``)."""
    from .any_length import _encodings, moved
    from .any_length import ort_session as session

    feeds = _encodings(text, tokenizer)
    if feeds is None:
        return None
    n = len(next(iter(feeds.values())))
    sessions = session(fwd), session(graph), session(cut)
    keep = int(feeds[text.mask_input].sum(1).max())
    trimmed = {k: (np.ascontiguousarray(v[:, :keep]) if k in text.token_inputs else v)
               for k, v in feeds.items()}
    shorter = {k: (np.ascontiguousarray(v[:, :max(2, keep // 2)]) if k in text.token_inputs
                   else v) for k, v in feeds.items()}
    mask = feeds[text.mask_input] != 0
    axes = {}
    for values in (initial, moved(initial, keep_rows)):

        def run(sess, x, outs, values=values):
            return run_graph(sess, x, outs, n, lookups, tables, values, loss)

        whole = run(sessions[0], feeds, [output])[0]
        pre = run(sessions[1], trimmed, carried)
        pre2 = run(sessions[1], shorter, carried)
        padded = dict(feeds)
        for t, a, b in zip(carried, pre, pre2, strict=True):
            if a.ndim != b.ndim or a.ndim < 1 or a.shape[0] != n:
                return None  # the runtime pads along axis 1+ of tensors with a batch axis 0
            diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
            if len(diff) > 1 or diff == [0]:
                return None
            axis = diff[0] if diff else -1
            if axis >= 0:
                if a.shape[axis] != keep:
                    return None
                pad = [(0, 0)] * a.ndim
                pad[axis] = (0, text.seq_len - keep)
                # as the runtime feeds it: zero at every masked position, not only past ``keep``
                a = np.pad(a, pad) * mask.reshape(
                    [n] + [text.seq_len if i == axis else 1 for i in range(1, a.ndim)])
            axes[t] = axis
            padded[t] = a
        got = run(sessions[2], padded, [output])[0]
        scale = 1.0 + float(np.abs(whole).max())
        if got.shape != whole.shape or float(np.abs(got - whole).max()) > 1e-4 * scale:
            return None
    return axes
