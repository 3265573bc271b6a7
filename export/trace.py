"""Turn the user's model into a clean forward ONNX graph (opset 17, IR 8).

Sources: a built-in name, ``path/to/file.py:factory`` (a function returning an ``nn.Module``) or
an ``.onnx`` file. PyTorch models are traced with the TorchScript exporter (``dynamo=False``:
opset 17 / IR 8, loads on onnxruntime >= 1.17), in eval mode with ``TrainingMode.PRESERVE`` so
BatchNorm keeps its own parameters (no Conv+BN folding) and uses running statistics.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import ExportError

__all__ = ["Traced", "load_model", "parse_input_shapes"]

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


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """``32,1,8,8`` or ``32,16;32,16`` (one shape per model input, batch first)."""
    shapes = []
    for part in text.split(";"):
        try:
            dims = tuple(int(d) for d in part.split(",") if d.strip())
        except ValueError:
            raise ExportError(f"invalid --input-shape '{text}': expected comma-separated "
                              "integers, e.g. 32,1,8,8 (use ';' between inputs)") from None
        if not dims or any(d <= 0 for d in dims):
            raise ExportError(f"invalid --input-shape '{text}': dims must be positive")
        shapes.append(dims)
    return shapes


def _load_factory(spec: str):
    path, _, fn = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"model file '{path}' not found (expected path/to/file.py:factory)")
    mod_spec = importlib.util.spec_from_file_location(f"_user_model_{file.stem}", file)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file may raise anything
        raise ExportError(f"cannot import model file '{path}': {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        avail = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ExportError(f"'{fn}' is not a function in {path}; callables there: "
                          f"{', '.join(avail) or 'none'}")
    return factory()


def load_model(spec: str, example: list[np.ndarray] | None) -> Traced:
    """Trace or load ``spec``; ``example`` gives one array per input (batch first)."""
    if spec.endswith(".onnx"):
        return _load_onnx(spec)  # no torch needed for an ONNX model
    import torch

    from .models import BUILTIN_MODELS

    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        torch.manual_seed(0)
        module = entry.factory()
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
    return _trace_torch(module, example, spec)


def _input_names(module, n: int) -> list[str]:
    import inspect

    try:
        names = [p for p in inspect.signature(module.forward).parameters if p != "self"]
    except (TypeError, ValueError):
        names = []
    if len(names) >= n:
        return names[:n]
    return ["x"] if n == 1 else [f"x{i}" for i in range(n)]


def _trace_torch(module, example: list[np.ndarray], source: str) -> Traced:
    import torch

    module.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    names = _input_names(module, len(args))
    with torch.no_grad():
        n_out = len(module(*args)) if isinstance(module(*args), tuple | list) else 1
    outs = ["logits"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    dyn = {n: {0: "N"} for n in names + outs}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=names,
                          output_names=outs, dynamic_axes=dyn, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    _materialize_identity_initializers(model)
    torch_names = _name_initializers(model, module)
    children = []
    for cname, child in module.named_children():
        pnames = [f"{cname}.{p}" for p, _ in child.named_parameters()]
        onnx_of = {tn: on for on, (tn, _) in torch_names.items()}
        children.append((cname, [onnx_of[p] for p in pnames if p in onnx_of]))
    return Traced(model, names, outs, source, torch_names, children)


def _materialize_identity_initializers(model: onnx.ModelProto) -> None:
    """The exporter deduplicates equal initializers with Identity nodes (e.g. a fresh BatchNorm's
    weight and running_var are both ones). Give each its own copy so training one never changes
    the other."""
    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _name_initializers(model: onnx.ModelProto, module) -> dict[str, tuple[str, bool]]:
    """Map ONNX initializers to torch parameter names (renaming folded ``onnx::MatMul_*``)."""
    params = {n: p.detach().numpy() for n, p in module.named_parameters()}
    mapping: dict[str, tuple[str, bool]] = {}
    rename: dict[str, str] = {}
    taken = {i.name for i in model.graph.initializer}
    for init in model.graph.initializer:
        if init.name in params:
            mapping[init.name] = (init.name, False)
            continue
        arr = numpy_helper.to_array(init)
        for pname, val in params.items():
            if pname in taken or pname in rename.values():
                continue
            if arr.ndim == 2 and val.shape == arr.shape[::-1] and np.array_equal(val.T, arr):
                rename[init.name] = pname
                mapping[pname] = (pname, True)
                break
    for init in model.graph.initializer:
        if init.name in rename:
            init.name = rename[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return mapping


def _load_onnx(path: str) -> Traced:
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"ONNX model '{path}' not found")
    try:
        model = onnx.load(str(file))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise ExportError(f"cannot read ONNX model '{path}': {exc}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 13:
        raise ExportError(f"ONNX model '{path}' uses opset {opset}; opset 13 or newer is needed "
                          "(re-export it, or convert with onnx.version_converter)")
    _materialize_identity_initializers(model)
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in init_names]
    outputs = [o.name for o in model.graph.output]
    return Traced(model, inputs, outputs, f"onnx:{file.name}")
