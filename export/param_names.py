"""Torch parameter names for the initializers of a traced graph: torch's exporter keeps most
under their names, folds some (a MatMul weight stored transposed, GroupNorm's affine weights
reshaped to [C, 1, 1]) and rearranges others (an RNN's gates) beyond recognition."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["fingerprinted_export", "name_initializers", "onnx_param_names"]


def fingerprinted_export(module, export):
    """``export()`` (the module's ONNX graph) run again with distinct random values in every
    parameter, and those values; the real ones are restored after. None where it fails: the
    first mapping then stands."""
    import torch

    real = {n: p.detach().clone() for n, p in module.named_parameters()}
    gen = torch.Generator().manual_seed(20261202)
    try:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
            values = {n: p.detach().numpy().copy() for n, p in module.named_parameters()}
        return export(), values
    except Exception:  # noqa: BLE001 - no second opinion
        return None
    finally:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(real[n])


def _as_param(arr: np.ndarray, val: np.ndarray) -> str | None:
    """How initializer ``arr`` holds parameter value ``val``: "same", "T" (a 2-D weight stored
    transposed, as MatMul reads it), "reshape" (the same values with unit axes added or
    dropped, as GroupNorm's affine weights are folded to [C, 1, 1]), or None."""
    if arr.shape == val.shape and np.array_equal(arr, val):
        return "same"
    if arr.ndim == 2 and val.shape == arr.shape[::-1] and np.array_equal(val.T, arr):
        return "T"
    squeeze = lambda shape: [d for d in shape if d != 1]  # noqa: E731
    if squeeze(arr.shape) == squeeze(val.shape) and np.array_equal(arr.reshape(val.shape), val):
        return "reshape"
    return None


def name_initializers(model: onnx.ModelProto, module, fingerprinted
                       ) -> tuple[dict[str, tuple[str, bool]], dict[str, list[int]], list[str]]:
    """Map ONNX initializers to torch parameter names, renaming those torch's exporter folded
    (``onnx::MatMul_*``: transposed; ``onnx::Mul_*``: reshaped). Returns (initializer ->
    (torch name, transposed), torch name -> torch shape for reshaped ones, the parameters that
    have no initializer of their own: they cannot train).

    A parameter is found by its values; where equal values leave it ambiguous (two fresh
    GroupNorms), ``fingerprinted()`` exports the same module again with distinct random values
    in every parameter (the graph and its initializers come out the same) and those decide.
    """
    params = {n: p.detach().numpy() for n, p in module.named_parameters()}
    mapping: dict[str, tuple[str, bool]] = {}
    shapes: dict[str, list[int]] = {}
    rename: dict[str, str] = {}
    taken = {i.name for i in model.graph.initializer}
    for init in model.graph.initializer:
        if init.name in params:
            mapping[init.name] = (init.name, False)
    open_params = [n for n in params if n not in mapping and n not in taken]
    inits = [i for i in model.graph.initializer
             if i.name not in params and i.data_type == TensorProto.FLOAT]

    def claim(init: onnx.TensorProto, pname: str, how: str) -> None:
        rename[init.name] = pname
        mapping[pname] = (pname, how == "T")
        if how == "reshape":
            shapes[pname] = list(params[pname].shape)
        open_params.remove(pname)

    pending = []
    for init in inits:
        arr = numpy_helper.to_array(init)
        hits = [(n, how) for n in open_params if (how := _as_param(arr, params[n])) is not None]
        if len(hits) == 1:
            claim(init, *hits[0])
        elif hits:
            pending.append(init)
    if pending and open_params:  # equal values: only distinct ones tell them apart
        again = fingerprinted()
        if again is not None:
            fp_model, fp_values = again
            fp_inits = {i.name: i for i in fp_model.graph.initializer}
            for init in inits:
                if init.name in rename or init.name not in fp_inits:
                    continue
                fp_arr = numpy_helper.to_array(fp_inits[init.name])
                hits = [(n, how) for n in open_params
                        if (how := _as_param(fp_arr, fp_values[n])) is not None]
                # and the real initializer holds the real values the same way
                if len(hits) == 1 and _as_param(numpy_helper.to_array(init),
                                                params[hits[0][0]]) == hits[0][1]:
                    claim(init, *hits[0])
    for init in model.graph.initializer:
        if init.name in rename:
            init.name = rename[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return mapping, shapes, open_params


ROLE = {("MatMul", 1): "weight", ("Gemm", 1): "weight", ("Gemm", 2): "bias",
         ("Conv", 1): "weight", ("Conv", 2): "bias", ("Add", 0): "bias", ("Add", 1): "bias",
         ("LayerNormalization", 1): "weight", ("LayerNormalization", 2): "bias",
         ("BatchNormalization", 1): "weight", ("BatchNormalization", 2): "bias",
         ("Mul", 0): "weight", ("Mul", 1): "weight", ("Gather", 0): "weight"}


def onnx_param_names(model: onnx.ModelProto) -> dict[str, tuple[str, bool]]:
    """Readable names for an ONNX file's float initializers: their own name, or, where it is
    anonymous (``onnx::MatMul_470``), the consuming node's module path plus the role
    (``encoder.layer.0.attention.self.query.weight``). MatMul weights are [in, out]: marked
    transposed with respect to PyTorch's Linear ([out, in]), for ``export-model``'s safetensors."""
    from .layers import is_anonymous, node_module_path

    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    names: dict[str, tuple[str, bool]] = {}
    taken: set[str] = set(n for n in inits if not is_anonymous(n))
    for node in model.graph.node:
        for k, i in enumerate(node.input):
            if i not in inits or i in names:
                continue
            transposed = node.op_type == "MatMul" and k == 1 and len(inits[i].dims) == 2
            if not is_anonymous(i):
                names[i] = (i, transposed)
                continue
            path = node_module_path(node)
            role = ROLE.get((node.op_type, k), f"param{k}")
            base = f"{path}.{role}" if path else i
            name, j = base, 1
            while name in taken:
                j += 1
                name = f"{base}.{j}"
            taken.add(name)
            names[i] = (name, transposed)
    return names
