"""Fold shape arithmetic (Reshape targets, Pad widths, Slice bounds ...) into constants, where
ONNX shape inference cannot follow it.

TorchScript exports of ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``) with a
dynamic batch compute each Reshape's target from ``Shape`` through ``Slice``/``Mod``/``Concat``;
ONNX shape inference loses the rank there, and every gradient rule downstream needs it. Since
only the batch is free, each such target is either the same at every batch size (a constant) or
has exactly one entry that grows with the batch, which is then what Reshape's ``-1`` computes
(the element count fixes it): the target becomes a constant with ``-1`` in that place. The same
holds for any other computed operand that is equal at every batch size (``nn.ZeroPad2d``'s pads
come through a ConstantOfShape/Concat/Reshape/Slice chain). Which is which is measured, not
guessed: the model runs at three batch sizes with those values as outputs. Only done where shape
inference leaves a tensor's shape unknown and every input dim except the batch is static; a value
that fits neither form is left as it was.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import ExportError, Shapes

if TYPE_CHECKING:
    from .tracing import Traced


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}

# integer ops of a shape computation (from Shape to a Reshape's target)
_SHAPE_OPS = {"Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Mul",
              "Add", "Sub", "Div", "Mod", "Cast", "Reshape", "Identity", "Constant", "Floor",
              "Ceil", "Max", "Min", "Neg", "Abs", "ReduceProd", "Expand", "ConstantOfShape",
              "Range", "Equal", "Where", "Not", "Sqrt", "Transpose", "OneHot", "Tile", "CumSum",
              "ReduceSum", "ReduceMax", "ReduceMin", "Less", "Greater", "And", "Or"}


def _unknown_shapes(model: onnx.ModelProto) -> bool:
    """Whether shape inference loses a tensor's rank, or more than one of its dims (one may be
    the batch, or a product with it)."""
    shapes = Shapes(model)
    for n in model.graph.node:
        for o in n.output:
            dims = shapes.shape.get(o) if o else []
            if dims is None or sum(not isinstance(d, int) for d in dims) > 1:
                return True
    return False


def _free_dims_only_batch(model: onnx.ModelProto, inputs: list[str]) -> bool:
    by_name = {vi.name: vi for vi in model.graph.input}
    for name in inputs:
        dims = by_name[name].type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:]):
            return False
    return True


def _shape_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from shapes and constants only."""
    known = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in _SHAPE_OPS:
            continue
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size", "Constant") or all(i in known for i in ins):
            known.update(o for o in node.output if o)
    return known - {i.name for i in model.graph.initializer}


def _run(model: onnx.ModelProto, inputs: list[str], outputs: list[str], batch: int,
         extra: list[onnx.NodeProto] = ()) -> list[np.ndarray] | None:
    import onnxruntime as ort

    m = copy.deepcopy(model)
    m.graph.node.extend(extra)
    del m.graph.value_info[:]  # shapes recorded at the file's own batch size
    feeds = {}
    for vi in m.graph.input:
        if vi.name not in inputs:
            continue
        t = vi.type.tensor_type
        dims = [batch] + [d.dim_value for d in t.shape.dim[1:]]
        t.shape.dim[0].Clear()
        t.shape.dim[0].dim_param = "N"  # free, also where --input-shape fixed it
        feeds[vi.name] = np.ones(dims, helper.tensor_dtype_to_np_dtype(t.elem_type))
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(outputs, feeds)
    except Exception:  # noqa: BLE001 - not runnable as given: the export's checks say why
        return None


def fold_shape_operands(model: onnx.ModelProto, inputs: list[str]) -> int:
    """Replace computed shape operands (a Reshape's target, a Pad's pads, a Slice's bounds, an
    Expand's shape ...) by constants as the module docstring says; returns how many were
    replaced (0 where nothing needed it or nothing could be measured)."""
    if not _free_dims_only_batch(model, inputs) or not _unknown_shapes(model):
        return 0
    computed = _shape_tensors(model)
    # where a computed value enters the data path: an input of a node that is not itself part
    # of the shape computation
    uses = [(n, i) for n in model.graph.node for i, name in enumerate(n.input)
            if name in computed and not all(o in computed for o in n.output if o)]
    targets = sorted({n.input[i] for n, i in uses})
    if not targets:
        return 0
    # a target read by Reshapes only, all of one data tensor: its shape is measured too, so an
    # entry that always equals the data's own dim there can become 0 ("copy that dim")
    readers: dict[str, set[str] | None] = {}
    for n, i in uses:
        plain = n.op_type == "Reshape" and i == 1 and not attrs_of(n).get("allowzero", 0)
        prev = readers.get(n.input[i], set())
        readers[n.input[i]] = prev | {n.input[0]} if plain and prev is not None else None
    data_of = {t: next(iter(d)) for t, d in readers.items() if d is not None and len(d) == 1}
    probes = [helper.make_node("Shape", [d], [f"{t}.fold_shape"]) for t, d in data_of.items()]
    wanted = targets + [p.output[0] for p in probes]
    runs = [_run(model, inputs, wanted, n, probes) for n in (1, 2, 5)]
    if any(r is None for r in runs):
        return 0
    fixed: dict[str, np.ndarray] = {}
    for k, name in enumerate(targets):
        vs = [np.asarray(r[k]) for r in runs]
        va = vs[1]
        if (any(v.dtype != va.dtype or v.shape != va.shape for v in vs)
                or va.dtype.kind not in "iub" or va.size > 64):  # shapes, pads, bounds, an
            continue                                                 # If's condition: few ints
        diff = np.flatnonzero(np.any([v != va for v in vs], axis=0))
        if len(diff) == 0:
            fixed[name] = va
            continue
        if name not in readers or readers[name] is None or va.ndim != 1:
            continue
        const = va.astype(np.int64)
        if name in data_of:  # entries equal to the data's own dim at that axis: 0
            shapes = [np.asarray(r[len(targets) + list(data_of).index(name)]) for r in runs]
            for j in list(diff):
                if all(j < len(sh) and v[j] == sh[j] for v, sh in zip(vs, shapes, strict=True)):
                    const[j] = 0
                    diff = diff[diff != j]
        if len(diff) == 1 and not (const < 0).any():
            const[diff] = -1  # the one entry that grows with the batch: what -1 computes
            diff = diff[:0]
        if len(diff) == 0:
            fixed[name] = const
    if not fixed:
        return 0
    taken = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node for o in n.output}
    renamed: dict[str, str] = {}
    for name, value in fixed.items():
        k, new = 0, f"{name}.folded"
        while new in taken:
            k += 1
            new = f"{name}.folded{k}"
        taken.add(new)
        renamed[name] = new
        model.graph.initializer.append(numpy_helper.from_array(value, new))
    for node, i in uses:
        if node.input[i] in renamed:
            node.input[i] = renamed[node.input[i]]
    inline_constant_ifs(model)
    _drop_dead_nodes(model)
    return len(fixed)


def inline_constant_ifs(model: onnx.ModelProto) -> int:
    """Replace each ``If`` whose condition is a constant by the nodes of the branch it takes
    (TorchScript writes one for ``squeeze(dim)`` where it cannot tell the dim's size; the
    condition folds to a constant above): the backward differentiates plain nodes, never a
    branch. Returns how many were inlined; an If whose branch names clash is left as it was."""
    g = model.graph
    conds = {n.input[0] for n in g.node if n.op_type == "If" and n.input}
    if not conds:
        return 0
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if i.name in conds}
    for n in g.node:  # a condition in a Constant node counts as well
        if (n.op_type == "Constant" and n.output[0] in conds and len(n.attribute) == 1
                and n.attribute[0].name == "value"):
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    taken = ({i.name for i in g.initializer} | {o for n in g.node for o in n.output}
             | {i.name for i in g.input})
    nodes, done = [], 0
    for node in g.node:
        cond = consts.get(node.input[0]) if node.op_type == "If" and node.input else None
        if cond is None or cond.size != 1:
            nodes.append(node)
            continue
        which = "then_branch" if bool(cond.reshape(())) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == which)
        made = {o for n in branch.node for o in n.output} | {i.name for i in branch.initializer}
        if made & taken or len(branch.output) != len(node.output):
            nodes.append(node)
            continue
        taken |= made
        g.initializer.extend(branch.initializer)
        nodes.extend(branch.node)
        nodes.extend(helper.make_node("Identity", [b.name], [o], name=f"{node.name}/{which}/{o}")
                     for b, o in zip(branch.output, node.output, strict=True) if o)
        done += 1
    if done:
        del g.node[:]
        g.node.extend(nodes)
    return done


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is read (the shape arithmetic folded away)."""
    while True:
        used = {o.name for o in model.graph.output}
        for node in model.graph.node:
            used.update(node.input)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used.update(_graph_reads(a.g))
        keep = [n for n in model.graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(model.graph.node):
            return
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _graph_reads(g: onnx.GraphProto) -> set[str]:
    out = set()
    for node in g.node:
        out.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= _graph_reads(a.g)
    return out


def annotate_measured_shapes(model: onnx.ModelProto, inputs: list[str]) -> int:
    """Where shape inference still loses a shape (``cls.expand(x.shape[0], -1, -1)``: the
    Expand's target is computed from the batch size), record the shapes measured by running the
    model at batch sizes 2 and 3: a dim equal in both runs is static, one equal to the batch in
    both is ``N``, any other stays symbolic. Returns how many tensors were annotated."""
    if not _free_dims_only_batch(model, inputs) or not _unknown_shapes(model):
        return 0
    shapes = Shapes(model)
    names = [o for n in model.graph.node for o in n.output if o and (
        shapes.shape.get(o) is None or sum(not isinstance(d, int) for d in shapes.shape[o]) > 1)]
    if not names:
        return 0
    runs = [_run(model, inputs, names, n) for n in (2, 3)]
    if any(r is None for r in runs):
        return 0
    by_name = {vi.name: vi for vi in model.graph.value_info}
    done = 0
    for name, a, b in zip(names, *runs, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim != b.ndim or a.dtype != b.dtype or a.dtype.kind not in "fiub":
            continue
        dims = [int(p) if p == q else "N" if (p, q) == (2, 3) else None
                for p, q in zip(a.shape, b.shape, strict=True)]
        vi = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), dims)
        if name in by_name:
            model.graph.value_info.remove(by_name[name])
        model.graph.value_info.append(vi)
        done += 1
    return done


def declared_input_dims(path: str) -> list[list[int | None]]:
    """The dims an ONNX file's inputs declare (None: symbolic or unknown); [] where the file
    cannot be read again (it loaded before: read as "not known")."""
    try:
        g = onnx.load(path, load_external_data=False).graph
    except Exception:  # noqa: BLE001
        return []
    inits = {i.name for i in g.initializer}
    return [[d.dim_value if d.HasField("dim_value") else None
             for d in vi.type.tensor_type.shape.dim] for vi in g.input if vi.name not in inits]


def _declared_batch(path: str) -> int | None:
    """The one batch size an ONNX file's inputs of rank 2 or more declare, or None."""
    fixed = {d[0] for d in declared_input_dims(path) if len(d) >= 2 and d[0] is not None}
    return fixed.pop() if len(fixed) == 1 else None


def _refuse_fixed_batch(traced: Traced, sess, feeds: dict, n: int) -> None:
    """An ONNX file whose graph fixes the batch its inputs declare, exported at an example of
    another batch (an outside probe: a file fixing batch 4 exported at 8 rows gave a bundle
    that every train and eval refused, blaming the data): refused where the model fails at the
    example's batch and runs at the declared one. Otherwise nothing is said here.

    Raises:
        ExportError: the model runs at the file's declared batch only.
    """
    b = _declared_batch(traced.origin[1])
    if b is None or b == n or b > 4096:
        return
    try:
        sess.run(None, {k: np.resize(v, (b, *v.shape[1:])) for k, v in feeds.items()})
    except Exception:  # noqa: BLE001 - not the batch, or not only: other checks report it
        return
    raise ExportError(f"{traced.source}: the model runs at batch size {b} only (its graph fixes "
                      "the batch, and a bundle trains at any micro-batch, so exporting at that "
                      "batch cannot help): export it again with a dynamic batch axis "
                      "(dynamic_shapes / dynamic_axes)") from None


def _refuse_broken(traced: Traced, model: onnx.ModelProto, feeds: dict) -> None:
    """Refuse an ONNX file that onnxruntime loads but cannot run at the example's shapes, run
    again as written (no graph optimisation: not a fusion's fault, and the file's node names);
    an allocation failure is not the file's fault.

    Raises:
        ExportError: the file fails again, naming onnxruntime's reason.
    """
    import onnxruntime as ort

    from contract.errors import ort_message

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model.SerializeToString(), so,
                             providers=["CPUExecutionProvider"]).run(None, feeds)
        return
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        why = ort_message(exc, 300)
    if "alloc" in why.lower():
        return
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(feeds.items())[:4])
    raise ExportError(f"{traced.source}: the model fails on an example of its input shapes "
                      f"({shapes}): onnxruntime: {why}; the file is broken (export the model to "
                      "ONNX again) or takes other shapes (--input-shape or --npz, batch first)"
                      ) from None


def check_free_batch(traced: Traced) -> None:
    """The bundle trains at the user's micro-batch, so the model must run at any batch size.
    Files exported with a fixed batch (``torch.onnx.export(dynamo=True)`` without dynamic
    shapes fixes the example's) fail inside their Reshapes at another, as does a torch model
    traced here whose forward turns the batch size into a Python number (``len(x)``); found
    here by running the model at its example batch and one more.

    Raises:
        ExportError: the model runs at its own batch size only.
    """
    if traced.origin is None or traced.origin[0] not in ("onnx", "torch"):
        return
    import copy

    import onnxruntime as ort

    model = copy.deepcopy(traced.model)
    feeds = {}
    example = traced.origin[2]
    guessed = False  # (sizes of 1 for the file's unnamed dims: a failure proves little)
    if traced.origin[0] == "torch":  # traced with a free batch axis at the example's shapes
        if example is None or len(example) != len(traced.inputs):
            return
        feeds = dict(zip(traced.inputs, example, strict=True))
    given = dict(zip(traced.inputs, example or [], strict=False))
    for vi in model.graph.input:
        if vi.name not in traced.inputs or traced.origin[0] == "torch":
            continue
        t = vi.type.tensor_type
        guessed |= not all(d.HasField("dim_value") for d in t.shape.dim[1:])
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        if not dims or any(d <= 0 for d in dims[1:]):
            return  # unknown sizes: nothing to run
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        guessed |= dtype.kind not in "fc"  # (ids, indices, shapes: their values matter too)
        mine = given.get(vi.name)  # the user's rows (--npz) where they fit, else ones
        feeds[vi.name] = (mine.astype(dtype) if mine is not None and list(mine.shape) == dims
                          else np.ones(dims, dtype))
        t.shape.dim[0].ClearField("dim_value")
        t.shape.dim[0].dim_param = "N"
    for vi in model.graph.output:
        if vi.type.tensor_type.shape.dim:
            vi.type.tensor_type.shape.dim[0].ClearField("dim_value")
            vi.type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    if not feeds or any(np.ndim(v) == 0 for v in feeds.values()):
        return
    if int(sum(int(np.prod(v.shape)) * v.itemsize for v in feeds.values())) > 256 << 20:
        return  # too large an example to run here
    so = ort.SessionOptions()
    so.log_severity_level = 4
    n = next(iter(feeds.values())).shape[0]
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - not loadable as given: other checks report that
        return
    try:
        sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - not runnable as given (ones for ids, sizes of 1
        if traced.origin[0] == "onnx":  # for the file's unnamed dims)
            if example is not None:
                _refuse_fixed_batch(traced, sess, feeds, n)
            if not guessed:  # every size known: the file cannot run at all (session 40 probe:
                _refuse_broken(traced, model, feeds)  # a channel mismatch exported, then every
        return                                      # train said "re-export the bundle")
    try:
        sess.run(None, {k: np.concatenate([v, v[:1]]) for k, v in feeds.items()})
    except Exception:  # noqa: BLE001
        if traced.origin[0] == "torch":
            raise ExportError(f"{traced.source}: the traced model runs at batch size {n} only "
                              "(its forward turns the batch size into a Python number, e.g. "
                              "len(x) or a size read into a list); write that part with "
                              "x.flatten(1) or x.reshape(x.shape[0], -1), which trace with a "
                              "free batch") from None
        raise ExportError(f"{traced.source}: the model runs at batch size {n} only (its graph "
                          "fixes the batch, e.g. torch.onnx.export(dynamo=True) without "
                          "dynamic_shapes); export it again with a dynamic batch axis "
                          "(dynamic_shapes / dynamic_axes)") from None
