"""ONNX files as other exporters write them, made into what the exporter expects (each a
note where it changes what the user sees): nodes in topological order, initializers that are
also listed as graph inputs read as weights, float16/bfloat16/float64 weights behind a Cast to
float32 trained in float32, and an opset below 16 converted to 16 (the gradients of lookups and
max pooling add with opset 16's scatter-add). ``tracing._load_onnx`` calls these in order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph import NARROW_FLOATS, ExportError
from .model_inputs import _first_line

__all__ = ["MIN_BUNDLE_OPSET", "check_valid", "drop_doc_strings", "float32_weights",
           "folded_norm_notes", "identity_weights", "initializers_not_inputs", "raise_opset",
           "sort_nodes"]


# The backward of a lookup (Gather) or of max pooling adds into a tensor with ScatterND /
# ScatterElements reduction="add", which opset 16 introduced.
MIN_BUNDLE_OPSET = 16


def raise_opset(model: onnx.ModelProto, path: str) -> list[str]:
    """An opset-13 to 15 file is converted to opset 16 (onnx's version converter: same
    computation) so the training graphs may use what their gradients need."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= MIN_BUNDLE_OPSET:
        return []
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, MIN_BUNDLE_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        raise ExportError(f"ONNX model '{path}' uses opset {opset} and onnx's version converter "
                          f"cannot raise it to {MIN_BUNDLE_OPSET} ({_first_line(exc)[:200]}); "
                          f"export the model at opset {MIN_BUNDLE_OPSET} or newer") from None
    model.CopyFrom(converted)
    return [f"note: the model's opset {opset} was converted to {MIN_BUNDLE_OPSET} (its "
            "gradients need opset 16's scatter-add); the computation is the same"]


def drop_doc_strings(model: onnx.ModelProto) -> None:
    """The file's documentation strings (model, graphs, their inputs, outputs, weights and
    nodes, functions) left out of the bundle: copied into every graph, a 300 KB doc string and
    50 KB a node took a model of 1 KB of weights to a 1.8 MB bundle and a 753 KB export-model
    file (session 46 probe)."""
    def nodes(ns) -> None:
        for n in ns:
            n.doc_string = ""
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    graph(sub)

    def graph(g) -> None:
        g.doc_string = ""
        for v in (*g.input, *g.output, *g.value_info, *g.initializer):
            v.doc_string = ""
        nodes(g.node)

    model.doc_string = ""
    graph(model.graph)
    for f in model.functions:
        f.doc_string = ""
        nodes(f.node)


def check_valid(model: onnx.ModelProto, file: Path, path: str) -> None:
    """Refuse a file that is not valid ONNX (torch's dynamo exporter at opset 17 writes Split's
    opset-18 ``num_outputs``): onnx's checker, and where it objects, onnxruntime decides (it
    loads some files the checker is stricter about). Was: a bundle whose training failed to load
    with "re-export the bundle", which could not help."""
    try:
        onnx.checker.check_model(model)
        return
    except Exception:  # noqa: BLE001 - the checker's verdict is only a first opinion
        pass
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        why = _first_line(exc).split("] ", 1)[-1][:300]
        raise ExportError(f"ONNX model '{path}' is not valid: onnxruntime cannot load it ({why});"
                          " the file itself is broken, so export the model again (e.g. at a "
                          "newer opset, or with another exporter)") from None


def sort_nodes(model: onnx.ModelProto) -> None:
    """Nodes in an order where each comes after the nodes making its inputs (ONNX asks for
    it and onnxruntime does not; the gradient builder walks the graph in its order). Stable:
    a sorted graph is left as it is; a cycle is left for the validity check to refuse."""
    nodes = list(model.graph.node)
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}

    def deps(i: int) -> set[int]:
        n = nodes[i]
        names = list(n.input)
        for a in n.attribute:  # a subgraph's reads of the outer graph
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names += [x for m in sub.node for x in m.input]
        return {made[x] for x in names if x in made and made[x] != i}

    need = [deps(i) for i in range(len(nodes))]
    if all(all(d < i for d in need[i]) for i in range(len(nodes))):
        return
    order, placed = [], set()
    progress = True
    while progress and len(order) < len(nodes):
        progress = False
        for i in range(len(nodes)):
            if i not in placed and need[i] <= placed:
                order.append(i)
                placed.add(i)
                progress = True
    if len(order) < len(nodes):
        return  # a cycle
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


def initializers_not_inputs(model: onnx.ModelProto) -> None:
    """Older exporters (and torch's ``keep_initializers_as_inputs=True``) also list every
    initializer as a graph input, a default a caller may override. The weights are the
    model's, so they are read as plain initializers."""
    inits = {i.name for i in model.graph.initializer}
    listed = [vi for vi in model.graph.input if vi.name in inits]
    for vi in listed:
        model.graph.input.remove(vi)


def identity_weights(model: onnx.ModelProto) -> None:
    """A weight that the graph reads only through one Identity (some converters write one) is
    read directly, the Identity removed: it keeps its name (session 34 probe: ``proj.weight``
    trained as the Identity's output ``wi``, with a note of a copy that did not exist, and
    ``--trainable 'proj.*'`` froze it). An initializer that other nodes read too is a shared
    value, copied per reader (``tracing._materialize_identity_initializers``)."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in g.node for a in n.attribute):
        return  # (a subgraph may read the Identity's output by name)
    inits = {i.name for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}
    alias = {}
    for name in inits - outputs:
        users = readers.get(name, [])
        if len(users) == 1 and users[0].op_type == "Identity" and users[0].output[0] not in outputs:
            alias[users[0].output[0]] = name
    _read_directly(model, alias, "Identity")


def _read_directly(model: onnx.ModelProto, renamed: dict[str, str], op: str) -> None:
    """Remove the ``op`` nodes whose outputs ``renamed`` maps to an initializer, their readers
    reading that initializer instead."""
    if not renamed:
        return
    keep = [n for n in model.graph.node if not (n.op_type == op and n.output[0] in renamed)]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def float32_weights(model: onnx.ModelProto) -> list[str]:
    """A float16 / bfloat16 / float64 initializer that the graph only reads through a Cast to
    float32 (weights stored small, computed in float32) becomes a float32 initializer of the
    same name, the Cast removed: it can then be trained (in float32) like any weight."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    renamed: dict[str, str] = {}
    for name, init in inits.items():
        users = readers.get(name, [])
        if (init.data_type not in NARROW_FLOATS or not users or name in graph_outputs
                or any(u.op_type != "Cast" or u.domain not in ("", "ai.onnx")
                       or next((a.i for a in u.attribute if a.name == "to"), None)
                       != TensorProto.FLOAT or u.output[0] in graph_outputs for u in users)):
            continue
        as32 = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), name)
        init.CopyFrom(as32)
        for u in users:
            renamed[u.output[0]] = name
    if not renamed:
        return []
    _read_directly(model, renamed, "Cast")
    shown = sorted(set(renamed.values()))
    return [f"note: {len(shown)} weights stored in float16/bfloat16/float64 and cast to float32 "
            f"by the model train in float32 ({', '.join(shown[:6])}{' …' if len(shown) > 6 else ''})"]


def zero_padding_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Lookup tables (a Gather's float data, axis 0) of an ONNX file with exactly one all-zero
    row, the others not: the row ``nn.Embedding(padding_idx=k)`` keeps at zero, which ONNX's
    Gather does not record. Its lookups then carry no gradient, as in torch (an outside probe:
    the row trained, 8 % off torch's table after one step). Returns table -> row."""
    readers = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input
               and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0}
    rows: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.name not in readers or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 \
                or t.dims[0] < 3:
            continue
        zero = np.flatnonzero(~numpy_helper.to_array(t).any(axis=1))
        if zero.size == 1:
            rows[t.name] = int(zero[0])
    return rows


def padding_rows_note(rows: dict[str, int], trainable: list[str]) -> str | None:
    """The note for the tables of :func:`zero_padding_rows` that train (None: none does)."""
    shown = [f"{k} row {v}" for k, v in rows.items() if k in trainable]
    if not shown:
        return None
    return (f"note: lookup table(s) with one all-zero row ({', '.join(shown[:3])}) read as "
            "nn.Embedding's padding_idx, which an .onnx file does not keep: that row's lookups "
            "carry no gradient and it stays zero, as in torch (a token of its own there needs "
            "a non-zero row in the file)")


def onnx_inputs(path: str) -> list[str]:
    """An ONNX file's graph inputs that are no initializer ([] where it cannot be read: loading
    it says why)."""
    try:
        g = onnx.load(path, load_external_data=False).graph
    except Exception:  # noqa: BLE001
        return []
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits]


# onnxscript's rewriter (torch.onnx.export(..., dynamo=True) optimizes with it) tags each node
# it rewrote with the rule's name
_REWRITE_RULE = "pkg.onnxscript.rewriter.rule_name"


def folded_norm_notes(model: onnx.ModelProto) -> list[str]:
    """A note per node into which the exporter folded a BatchNorm: its weight and bias keep the
    convolution's (torch's) names but hold values scaled by the norm's, and the norm's own
    parameters are gone (session 48 probe: such a file trained, correct for its function, and
    export-model wrote the folded values under torch's names without a word)."""
    inits = {t.name for t in model.graph.initializer}
    notes = []
    for node in model.graph.node:
        rule = next((p.value for p in node.metadata_props if p.key == _REWRITE_RULE), "")
        if not rule.startswith("FuseBatchNorm"):
            continue
        held = [i for i in node.input[1:] if i in inits]
        notes.append(
            f"note: the exporter folded a BatchNorm into {node.op_type} node '{node.name}' "
            f"({rule}): {', '.join(repr(h) for h in held) or 'its weights'} hold the layer's "
            "values scaled by the norm's, under the layer's names, and the norm has no "
            "parameters left to train; training and export-model use the folded values (to "
            "keep the norm apart: torch.onnx.export(..., optimize=False))")
    return notes
