"""Turn the user's model into a clean forward ONNX graph (opset 17, IR 8).

Sources: a built-in name, ``path/to/file.py:factory`` (a function returning an ``nn.Module``) or
an ``.onnx`` file. PyTorch models are traced with the TorchScript exporter (``dynamo=False``:
opset 17 / IR 8, loads on onnxruntime >= 1.17), in eval mode with ``TrainingMode.PRESERVE`` so
BatchNorm keeps its own parameters (no Conv+BN folding) and uses running statistics.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.onnx_scan import LOOP_OPS

from .grad_stops import gradient_stops
from .graph import ExportError, check_ops, name_nodes
from .layers import node_module_path
from .model_inputs import (
    _first_line,
    _load_factory,
    buffers_written,
    by_name,
    example_arrays,
    fixed_by_tracer,
    parse_input_shapes,
    same_buffers,
)
from .onnx_import import (
    check_valid,
    drop_doc_strings,
    float32_weights,
    folded_norm_notes,
    identity_weights,
    initializers_not_inputs,
    onnx_inputs,
    raise_opset,
    sort_nodes,
    zero_padding_rows,
)
from .outputs import forward_params
from .outputs import input_names as _input_names
from .outputs import output_names as _output_names
from .outputs import pick_output as _pick_output
from .param_names import (
    ROLE,
    derived_changes,
    fingerprinted_export,
    name_initializers,
    onnx_param_names,
    tie_equal_initializers,
)
from .recurrent import lower_traced
from .shape_fold import annotate_measured_shapes, fold_shape_operands, inline_constant_ifs
from .symbolics import refuse_unreproducible
from .symbolics import register as register_symbolics

__all__ = ["Traced", "any_length", "at_length", "example_arrays", "load_model",
           "parse_input_shapes"]

OPSET = 17


@dataclass
class Traced:
    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    source: str
    # ONNX initializer name -> (torch parameter name, stored transposed?)
    torch_names: dict[str, tuple[str, bool]] = field(default_factory=dict)
    # torch top-level children in order, with the ONNX names of their parameters
    children: list[tuple[str, list[str]]] = field(default_factory=list)
    from_torch: bool = False  # torch_names lists exactly the module's parameters
    # torch name -> the parameter's torch shape, where the graph holds it reshaped
    torch_shapes: dict[str, list[int]] = field(default_factory=dict)
    # torch parameters with no tensor of their own in the graph (a GRU's weights, which the
    # exporter rearranges; values folded into others): they cannot train
    unmapped: list[str] = field(default_factory=list)
    # constants torch's exporter computed from parameters (F.normalize(self.weight)): constant ->
    # the module path of a node reading it (export/param_names.py); they cannot carry a gradient
    derived: dict[str, str] = field(default_factory=dict)
    # embedding table -> the row whose lookups carry no gradient (nn.Embedding's padding_idx;
    # ONNX's Gather has none: rules/shape.py gather_grad drops those lookups' share)
    padding_rows: dict[str, int] = field(default_factory=dict)
    # which of those change when only the given torch parameters do (a second export)
    derived_changes: Callable[[set[str]], set[str]] | None = field(default=None, repr=False,
                                                                  compare=False)
    notes: list[str] = field(default_factory=list)  # what the export prints after it
    # ONNX names of torch parameters the user froze (requires_grad_(False)): never trained
    no_grad: set[str] = field(default_factory=set)
    # how to trace/load the same model again with a free sequence axis (any_length())
    origin: tuple | None = field(default=None, repr=False, compare=False)
    # where the forward stops or replaces the gradient of the given trainable torch parameters
    # (export/grad_stops.py): detach, no_grad, a custom autograd.Function
    grad_stops: Callable[[set[str]], list[str]] | None = field(default=None, repr=False,
                                                               compare=False)

    def display(self, name: str) -> str:
        """The name a user sees and matches with --trainable (the torch / module-path name)."""
        return self.torch_names.get(name, (name, False))[0]


def load_model(spec: str, example: list[np.ndarray] | None, output: str | None = None,
               example_names: list[str] | None = None, classes: int | None = None) -> Traced:
    """Trace or load ``spec``; ``example`` gives one array per input (batch first; for an ONNX
    file it fixes the declared shapes), named ``example_names`` where an .npz named them (put
    in the model's order where those are its inputs' names); ``output`` picks one of several
    model outputs.

    Raises:
        ExportError: unknown model or output, unreadable file, bad example inputs.
    """
    if spec.endswith(".onnx"):
        example = by_name(example, example_names, lambda: onnx_inputs(spec))
        traced = _folded(lower_traced(_pick_output(_load_onnx(spec, example), output)))  # no torch here
        traced.origin = ("onnx", spec, example, output)
        traced.padding_rows = zero_padding_rows(traced.model)  # (noted at export, if trained)
        return traced
    import torch

    from .models import BUILTIN_MODELS

    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        torch.manual_seed(0)  # ``classes`` (export --classes): a built-in's head of that many
        module = entry.factory(**({"classes": classes} if classes else {}))
        if example is None:
            example = entry.example_inputs()
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        module = _load_factory(spec)
    else:
        raise ExportError(f"unknown model '{spec}'; use a built-in ({', '.join(BUILTIN_MODELS)}),"
                          " path/to/file.py:factory or a .onnx file")
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"model factory for '{spec}' returned {type(module).__name__}, "
                          "expected a torch.nn.Module")
    if example is None:
        raise ExportError(f"model '{spec}' needs example inputs: pass --input-shape or an .npz")
    example = by_name(example, example_names, lambda: forward_params(module))
    training = module.training and spec not in BUILTIN_MODELS
    written = buffers_written(module, example) if spec not in BUILTIN_MODELS else []
    traced = _folded(lower_traced(_pick_output(_trace_torch(module, example, spec), output)))
    traced.origin = ("torch", module, example, output)
    changes = _train_behaviour(module) if training else ""
    if changes:
        traced.notes.append(f"note: the model from '{spec}' was in training mode; it is "
                            f"exported in eval mode ({changes})")
    if written:
        traced.notes.append(f"note: the model's forward changes buffer(s) {', '.join(written[:4])}"
                            "; the bundle keeps them as the factory made them (no forward of "
                            "training updates them)")
    return traced


def _folded(traced: Traced) -> Traced:
    """Shape arithmetic folded where shape inference cannot follow it (``export/shape_fold.py``:
    TorchScript's MultiheadAttention, ``nn.ZeroPad2d``)."""
    inline_constant_ifs(traced.model)  # a condition that is a constant already
    fold_shape_operands(traced.model, traced.inputs)  # (and those it folds)
    annotate_measured_shapes(traced.model, traced.inputs)
    return traced


def any_length(traced: Traced, seq_inputs: list[str]) -> Traced | None:
    """The same model again with axis 1 of ``seq_inputs`` (the token inputs) left free, or None
    where that is not possible (an ONNX file that fixes the length, a trace that fails).

    The training graphs need a fixed length (token-axis bases are L×L); the inference graph does
    not, and a batch whose padding is dropped costs less (``docs/memory.md``). Whether the model's
    output really ignores trailing padding is for the caller to check.
    """
    if traced.origin is None or not seq_inputs:
        return None
    kind, src, example, output = traced.origin
    try:
        if kind == "onnx":
            free = _load_onnx(src, example, keep_free={n: 1 for n in seq_inputs})
            if free is None:
                return None
        else:
            from .models import free_length

            pos = [traced.inputs.index(n) for n in seq_inputs]
            with free_length():
                free = _trace_torch(src, example, traced.source, seq_axes=pos)
        return _pick_output(free, output)
    except Exception:  # noqa: BLE001 - any failure keeps the fixed-length graph
        return None


def at_length(traced: Traced, seq_inputs: list[str], length: int) -> Traced | None:
    """The same model traced (or loaded) again with axis 1 of ``seq_inputs`` fixed at
    ``length`` instead of the trained length, or None where that fails (export/lengths.py)."""
    if traced.origin is None or not seq_inputs or any(n not in traced.inputs
                                                      for n in seq_inputs):
        return None
    kind, src, example, output = traced.origin
    if example is None:  # an ONNX file that declares its shapes: ones of those shapes
        by_name = {vi.name: vi.type.tensor_type for vi in traced.model.graph.input}
        example = []
        for n in traced.inputs:
            t = by_name[n]
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            if len(dims) < 2 or any(d <= 0 for d in dims[1:]):
                return None
            example.append(np.ones([1] + dims[1:], helper.tensor_dtype_to_np_dtype(t.elem_type)))
    pos = {traced.inputs.index(n) for n in seq_inputs}
    if any(np.ndim(example[i]) < 2 or np.shape(example[i])[1] <= length for i in pos):
        return None
    cut = [np.ascontiguousarray(a[:, :length]) if i in pos else a for i, a in enumerate(example)]
    try:
        if kind == "onnx":
            again = _load_onnx(src, cut)
            if again is None:
                return None
        else:
            again = _trace_torch(src, cut, traced.source)
        return _folded(lower_traced(_pick_output(again, output)))
    except Exception:  # noqa: BLE001 - any failure: no graphs at this length
        return None


def _train_behaviour(module) -> str:
    """What eval mode changes in the module (batch norms, dropout), as the note says it; ""
    where nothing does."""
    import torch

    mods = list(module.modules())
    said = []
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in mods):
        said.append("BatchNorm normalises with its running statistics, which stay fixed")
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd | torch.nn.Dropout) for m in mods):
        said.append("Dropout is off")
    return "; ".join(said)


def _trace_torch(module, example: list[np.ndarray], source: str,
                 seq_axes: list[int] | None = None) -> Traced:
    import torch

    module.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    names = _input_names(module, len(args))
    try:
        with torch.no_grad(), warnings.catch_warnings(), same_buffers(module):
            warnings.simplefilter("ignore")  # (torch's own: an error after them is one line)
            result = module(*args)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's forward: theirs to fix
        shapes = "; ".join(f"{','.join(map(str, a.shape))}:{a.dtype}" for a in example)
        kinds = {p.dtype for p in module.parameters()}
        if kinds and torch.float32 not in kinds and all(k.is_floating_point for k in kinds):
            # (a probe's model.double(): told to change --input-shape's types, then, with
            # float64 inputs, that training runs in float32: two errors for one way out)
            raise ExportError(f"model '{source}' has {'/'.join(sorted(map(str, kinds)))} "
                              "weights; training runs in float32: export the model in float32 "
                              "(torch: model.float() before exporting)") from None
        raise ExportError(f"model '{source}' fails on example inputs {shapes}: "
                          f"{_first_line(exc)}; pass --input-shape (or --npz) with the shapes "
                          "and types its forward takes, batch first, e.g. 8,3,32,32 or "
                          "8,64:int64 for token ids") from None
    outs = _output_names(result, names)
    dyn = {n: {0: "N"} for n in names + outs}
    for i in seq_axes or []:
        dyn[names[i]] = {0: "N", 1: "L"}

    fixed: list[str] = []  # where the tracer fixed a value computed from the inputs

    def export() -> onnx.ModelProto:
        buf = io.BytesIO()
        register_symbolics()  # ops torch refuses at opset 17 (RMSNorm, Threshold)
        with warnings.catch_warnings(record=True) as seen, _output_discarded(), \
                same_buffers(module):  # torch's C++ side logs its IR graph on failure
            warnings.simplefilter("always")
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=names,
                              output_names=outs, dynamic_axes=dyn, do_constant_folding=True)
        fixed[:] = fixed_by_tracer(seen)
        m = onnx.load_from_string(buf.getvalue())
        _materialize_identity_initializers(m)
        return m

    try:
        model = export()
        said = list(fixed)  # (the first export's: later ones re-run it with other weights)
    except Exception as exc:  # noqa: BLE001 - torch's exporter refuses the model
        raise ExportError(f"torch.onnx.export cannot export '{source}' at opset {OPSET}: "
                          f"{_first_line(exc)}; change that part of the model, or export "
                          "it to .onnx yourself and pass the file") from None
    for node in model.graph.node:
        if node.op_type in LOOP_OPS:  # the runtime never runs a loop (a step must end)
            where = node_module_path(node)
            raise ExportError(
                f"model '{source}'{f' (module {where!r})' if where else ''} exports to an ONNX "
                f"{node.op_type} node, which the runtime does not run (nn.EmbeddingBag, or a "
                "data-dependent loop in forward); write that part with plain tensor ops, e.g. "
                "nn.Embedding followed by .mean(1)")
    check_ops(model, source)
    fingerprinted = lambda: fingerprinted_export(module, export)  # noqa: E731
    torch_names, torch_shapes, frozen, derived = name_initializers(model, module, fingerprinted)
    onnx_of = {tn: on for on, (tn, tr) in torch_names.items() if not tr}
    rows = {}
    for mname, mod in module.named_modules():
        refuse_unreproducible(mname or str(source), mod)
        if isinstance(mod, torch.nn.Embedding) and mod.padding_idx is not None:
            pname = f"{mname}.weight" if mname else "weight"
            if pname in onnx_of:
                rows[onnx_of[pname]] = int(mod.padding_idx) % int(mod.num_embeddings)
    off = {n for n, p in module.named_parameters() if not p.requires_grad}
    no_grad = {on for on, (tn, _) in torch_names.items() if tn in off}
    children = []
    for cname, child in module.named_children():
        pnames = [f"{cname}.{p}" for p, _ in child.named_parameters()]
        onnx_of = {tn: on for on, (tn, _) in torch_names.items()}
        children.append((cname, [onnx_of[p] for p in pnames if p in onnx_of]))
    return Traced(model, names, outs, source, torch_names, children, from_torch=True,
                  torch_shapes=torch_shapes, unmapped=frozen, derived=derived,
                  padding_rows=rows, no_grad=no_grad,
                  grad_stops=lambda names: gradient_stops(module, args, names),
                  derived_changes=derived_changes(model, derived, module, export)
                  if derived else None, notes=said)



@contextlib.contextmanager
def _output_discarded():
    """File descriptors 1 and 2 sent to /dev/null for the block: torch's C++ side logs its IR
    graph there when an export fails (through C stdio, so flushed before they come back)."""
    import ctypes

    for f in (sys.stdout, sys.stderr):
        f.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        for fd, dup in zip((1, 2), saved, strict=True):
            os.dup2(dup, fd)
            os.close(dup)


def _hoist(model: onnx.ModelProto, source) -> None:
    """Replace every node for which ``source(node)`` gives a tensor by an initializer holding a
    copy of it, named after the node's output (same values, same graph)."""
    keep = []
    for node in model.graph.node:
        t = source(node)
        if t is None:
            keep.append(node)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _materialize_identity_initializers(model: onnx.ModelProto) -> None:
    """The exporter deduplicates equal initializers with Identity nodes (e.g. a fresh BatchNorm's
    weight and running_var are both ones). Give each its own copy so training one never changes
    the other."""
    inits = {i.name: i for i in model.graph.initializer}
    _hoist(model, lambda n: inits.get(n.input[0]) if n.op_type == "Identity" else None)


def _load_onnx(path: str, example: list[np.ndarray] | None = None,
               keep_free: dict[str, int] | None = None) -> Traced | None:
    """Load an ONNX file (``example`` fixes its declared input shapes). With ``keep_free``
    (input -> axis) those axes stay symbolic; None when the file fixes one of them."""
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"ONNX model '{path}' not found")
    try:
        model = onnx.load(str(file))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        if "outside the directory" in str(exc) or "should be a relative path" in str(exc):
            raise ExportError(  # (a session 48 probe: "not an ONNX file ... export it again")
                f"ONNX model '{path}' keeps a tensor's external data outside its folder "
                f"({str(exc)[:160]}), which onnx does not read: save the model again with "
                "its data in its own folder (torch.onnx.export and onnx.save(..., "
                "save_as_external_data=True) write it so)") from None
        raise ExportError(f"cannot read ONNX model '{path}': {str(exc)[:200]}; it is not an "
                          "ONNX file, or a damaged or cut-short one: export the model to ONNX "
                          "again (or copy the file again)") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ExportError(f"'{path}' declares no ONNX opset: an empty file or not an ONNX model; "
                          "export the model to ONNX again")
    newest = onnx.defs.onnx_opset_version()
    if opset < 13 or opset > newest:
        raise ExportError(f"ONNX model '{path}' uses opset {opset}; opsets 13 to {newest} are "
                          "supported (re-export it, or convert with onnx.version_converter)")
    notes: list[str] = folded_norm_notes(model)
    drop_doc_strings(model)
    sort_nodes(model)
    initializers_not_inputs(model)
    identity_weights(model)
    _materialize_identity_initializers(model)  # (an Identity of a float16 weight read as is)
    _constants_to_initializers(model)
    notes += float32_weights(model)
    # again once the Casts are gone: an Identity of a float16 weight's float32 value (a
    # deduplicated copy, as of a float32 one) had trained as one tensor for both layers
    _materialize_identity_initializers(model)
    name_nodes(model)
    check_ops(model, path)
    if keep_free is None:
        check_valid(model, file, path)
    notes += raise_opset(model, path)
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in init_names]
    weights = [t for t in model.graph.initializer if int(np.prod(t.dims)) >= 2]
    unset = [n for n in inputs if n.startswith("onnx::") or n.endswith((".weight", ".bias"))]
    if not weights and unset:  # (session 29 probe: blamed on a fixed batch size)
        raise ExportError(f"ONNX model '{path}' holds no weights: its parameters ("
                          f"{', '.join(unset[:3])}{', ...' if len(unset) > 3 else ''}) are graph "
                          "inputs without values (torch.onnx.export(..., export_params=False)); "
                          "export it again with export_params=True")
    if any(vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_value")
           for vi in model.graph.input if vi.name in inputs):
        # exported with a fixed batch: the file's intermediate shapes carry it too, while the
        # bundle's graphs run at any micro-batch (check_free_batch checks the ops themselves)
        del model.graph.value_info[:]
    if keep_free:
        by_name = {vi.name: vi for vi in model.graph.input}
        for name, axis in keep_free.items():
            dims = by_name[name].type.tensor_type.shape.dim if name in by_name else []
            if len(dims) <= axis or dims[axis].HasField("dim_value"):
                return None
    if example is not None:
        _fix_input_shapes(model, inputs, example, keep_free or {})
    outputs = [o.name for o in model.graph.output]
    notes += tie_equal_initializers(model)
    return Traced(model, inputs, outputs, f"onnx:{file.name}", onnx_param_names(model),
                  notes=notes)


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Some tools store weights in ``Constant`` nodes instead of initializers; a float tensor of
    two or more elements there becomes an initializer of the same name (same values, same graph),
    so it can be selected for training and kept out of the graphs' bytes. Only where a parameter
    goes (a MatMul/Gemm/Conv weight, a bias, a norm's scale: ``param_names.ROLE``); scalars,
    a tensor of one value throughout in a file whose weights are initializers (a fill), and
    constants such as a Resize's scales, stay."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    as_param = {name for n in model.graph.node for i, name in enumerate(n.input)
                if (n.op_type, i) in ROLE}
    has_weights = any(t.data_type in floats and int(np.prod(t.dims)) >= 2
                      for t in model.graph.initializer)

    def weight(node: onnx.NodeProto) -> onnx.TensorProto | None:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        ok = (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None
              and len(node.attribute) == 1 and value.data_type in floats
              and int(np.prod(value.dims)) >= 2 and node.output[0] in as_param)
        if ok and has_weights and np.unique(numpy_helper.to_array(value)).size == 1:
            # one value throughout, in a file that keeps its weights as initializers (torch's
            # zero bias of LayerNorm(bias=False)): a constant (session 29 probe: it trained)
            ok = False
        return value if ok else None

    _hoist(model, weight)


def _fix_input_shapes(model: onnx.ModelProto, inputs: list[str],
                      example: list[np.ndarray], keep_free: dict[str, int] | None = None) -> None:
    """Make the declared input shapes static (the batch stays symbolic) from example arrays:
    an encoder exported with a dynamic sequence axis gets the sequence length to train at."""
    if len(example) != len(inputs):
        raise ExportError(f"--input-shape gives {len(example)} input(s); the model has "
                          f"{len(inputs)}: {', '.join(inputs)}")
    by_name = {vi.name: vi for vi in model.graph.input}
    for name, arr in zip(inputs, example, strict=True):
        t = by_name[name].type.tensor_type
        want = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.dtype(want) != arr.dtype:
            raise ExportError(f"model input '{name}' is {np.dtype(want)}; --input-shape gives "
                              f"{arr.dtype} (write e.g. 8,64:{np.dtype(want)})")
        if not t.HasField("shape"):  # no shape declared at all: --input-shape gives it
            t.shape.dim.add().dim_param = "N"
            for _ in range(arr.ndim - 1):
                t.shape.dim.add()
        if len(t.shape.dim) != arr.ndim:
            raise ExportError(f"model input '{name}' has {len(t.shape.dim)} dims; "
                              f"--input-shape gives {arr.ndim}")
        for axis, (d, v) in enumerate(zip(t.shape.dim, arr.shape, strict=True)):
            if keep_free and keep_free.get(name) == axis:
                continue
            if d.HasField("dim_value") and d.dim_value != v and d is not t.shape.dim[0]:
                raise ExportError(f"model input '{name}' has a fixed size {d.dim_value} where "
                                  f"--input-shape gives {v}")
            d.ClearField("dim_param")
            d.dim_value = v
    for vi in list(model.graph.value_info):
        model.graph.value_info.remove(vi)  # stale shapes of the dynamic model
