"""Torch parameter names for the initializers of a traced graph: torch's exporter keeps most
under their names, folds some (a MatMul weight stored transposed, GroupNorm's affine weights
reshaped to [C, 1, 1]) and rearranges others (an RNN's gates) beyond recognition."""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["derived_changes", "fingerprinted_export", "name_initializers", "onnx_param_names",
           "tie_equal_initializers"]


def fingerprinted_export(module, export, only: set[str] | None = None):
    """``export()`` (the module's ONNX graph) run again with distinct random values in every
    parameter (or in those named in ``only``), and those values; the real ones are restored
    after. None where it fails: the first mapping then stands."""
    import torch

    real = {n: p.detach().clone() for n, p in module.named_parameters()}
    gen = torch.Generator().manual_seed(20261202)
    try:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if only is None or n in only:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
            values = {n: (p.detach().float() if p.is_floating_point() else p.detach())
                      .numpy().copy() for n, p in module.named_parameters()}  # (as below)
        return export(), values
    except Exception:  # noqa: BLE001 - no second opinion
        return None
    finally:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(real[n])


def derived_changes(model: onnx.ModelProto, derived: dict[str, str], module, export):
    """A function of a set of torch parameter names: which of the ``derived`` constants of
    ``model`` change when only those parameters change (a second export)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name in derived}

    def changes(names: set[str]) -> set[str]:
        again = fingerprinted_export(module, export, only=names)
        if again is None:
            return set(values)  # no second opinion: assume the worst
        got = {i.name: numpy_helper.to_array(i) for i in again[0].graph.initializer}
        return {c for c, v in values.items()
                if c not in got or got[c].shape != v.shape or not np.array_equal(got[c], v)}
    return changes


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
                       ) -> tuple[dict[str, tuple[str, bool]], dict[str, list[int]], list[str],
                                  dict[str, str]]:
    """Map ONNX initializers to torch parameter names, renaming those torch's exporter folded
    (``onnx::MatMul_*``: transposed; ``onnx::Mul_*``: reshaped). Returns (initializer ->
    (torch name, transposed), torch name -> torch shape for reshaped ones, the parameters that
    have no initializer of their own: they cannot train, and the constants computed from
    parameters: constant -> the module path of a node that reads it).

    A parameter is found by its values; where equal values leave it ambiguous (two fresh
    GroupNorms), ``fingerprinted()`` exports the same module again with distinct random values
    in every parameter (the graph and its initializers come out the same) and those decide.

    The same second export shows which other constants depend on parameters: torch's exporter
    folds any computation on parameters alone. A second copy of a parameter that has a tensor
    of its own (a language model's output layer tied to its embedding: the table transposed)
    is computed from it in the graph instead (Transpose / Reshape / Identity), so both uses
    train one tensor; any other such constant (``F.normalize(self.weight)``'s norms, a weight
    norm) would cut its parameters' gradient short and is returned for the caller to refuse.
    """
    # float32 values: a float64 or bfloat16 parameter used through .float() is found as the
    # float32 tensor the exporter made of it (bfloat16 has no numpy type: it was a traceback)
    params = {n: (p.detach().float() if p.is_floating_point() else p.detach()).numpy()
              for n, p in module.named_parameters()}
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

    fp_cache: list = []

    def second():
        if not fp_cache:
            fp_cache.append(fingerprinted())
        return fp_cache[0]

    pending = []
    for init in inits:
        arr = numpy_helper.to_array(init)
        hits = [(n, how) for n in open_params if (how := _as_param(arr, params[n])) is not None]
        if len(hits) == 1:
            claim(init, *hits[0])
        elif hits:
            pending.append(init)
    if pending and open_params:  # equal values: only distinct ones tell them apart
        again = second()
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
    derived = _derived_constants(model, inits, rename, mapping, second) if inits else {}
    for init in model.graph.initializer:
        if init.name in rename:
            init.name = rename[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return mapping, shapes, open_params, derived


def _derived_constants(model: onnx.ModelProto, inits: list, rename: dict[str, str],
                       mapping: dict[str, tuple[str, bool]], second) -> dict[str, str]:
    """Float constants that may follow the parameters (see :func:`name_initializers`): copies
    of a parameter with a tensor of its own become nodes reading it (in ``model``, before the
    renaming); the others are returned, constant -> module path of a node reading it, for
    :func:`derived_changes` to tell which do."""
    from .layers import node_module_path

    real = {i.name: i for i in model.graph.initializer}
    # each parameter's own tensor (in the graph's layout) under its name before the renaming
    own_name = {p: next((o for o, q in rename.items() if q == p), p) for p in mapping}
    own = {p: numpy_helper.to_array(real[o]) for p, o in own_name.items() if o in real}
    derived: dict[str, str] = {}
    copies: list[onnx.NodeProto] = []
    for init in inits:
        if init.name in rename:
            continue
        a = numpy_helper.to_array(init)
        # a copy of a parameter by its values, confirmed by the second export (equal values
        # can be chance: a constant filled with zeros, a fresh LayerNorm's ones)
        hits = [(p, how) for p, v in own.items() if (how := _as_param(a, v)) is not None]
        if len(hits) == 1 and (again := second()) is not None:
            fp = {i.name: i for i in again[0].graph.initializer}
            p, how = hits[0]
            src = own_name[p]
            if not (init.name in fp and src in fp and _as_param(
                    numpy_helper.to_array(fp[init.name]), numpy_helper.to_array(fp[src])) == how):
                hits = []
        if len(hits) != 1:
            # maybe computed from parameters: the caller asks a second export when it matters
            readers = [n for n in model.graph.node if init.name in n.input]
            path = node_module_path(readers[0]) if readers else None
            derived[init.name] = path or ""
            continue
        p, how = hits[0]
        src = own_name[p]
        if how == "T":
            copies.append(helper.make_node("Transpose", [src], [init.name], perm=[1, 0],
                                           name=f"tied/{init.name}"))
        elif how == "reshape":
            shape = numpy_helper.from_array(np.array(a.shape, np.int64), f"{init.name}.shape")
            model.graph.initializer.append(shape)
            copies.append(helper.make_node("Reshape", [src, shape.name], [init.name],
                                           name=f"tied/{init.name}"))
        else:
            copies.append(helper.make_node("Identity", [src], [init.name],
                                           name=f"tied/{init.name}"))
    if copies:
        gone = {n.output[0] for n in copies}
        keep = [i for i in model.graph.initializer if i.name not in gone]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        nodes = copies + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return derived


ROLE = {("MatMul", 1): "weight", ("Gemm", 1): "weight", ("Gemm", 2): "bias",
         ("Conv", 1): "weight", ("Conv", 2): "bias", ("Add", 0): "bias", ("Add", 1): "bias",
         ("LayerNormalization", 1): "weight", ("LayerNormalization", 2): "bias",
         ("BatchNormalization", 1): "weight", ("BatchNormalization", 2): "bias",
         ("Mul", 0): "weight", ("Mul", 1): "weight", ("Gather", 0): "weight"}


def onnx_param_names(model: onnx.ModelProto) -> dict[str, tuple[str, bool]]:
    """Readable names for an ONNX file's float initializers: their own name, or, where it is
    anonymous (``onnx::MatMul_470``), the consuming node's module path plus the role
    (``encoder.layer.0.attention.self.query.weight``). An anonymous MatMul weight is [in, out],
    an exporter's transposed copy of PyTorch's Linear weight ([out, in]): marked transposed, for
    ``export-model``'s safetensors. A named one is the tensor the model holds, in its own layout
    (``x @ self.W``; was marked transposed too, and its safetensors did not load into torch)."""
    from .layers import is_anonymous, module_path, node_module_path

    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    names: dict[str, tuple[str, bool]] = {}
    taken: set[str] = set(n for n in inits if not is_anonymous(n))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    for node in model.graph.node:
        for k, i in enumerate(node.input):
            if i not in inits or i in names:
                continue
            transposed = node.op_type == "MatMul" and k == 1 and len(inits[i].dims) == 2
            if not is_anonymous(i):
                names[i] = (i, False)
                continue
            paired = _bias_paired(node, k, readers, inits, taken)
            if paired is not None:
                taken.add(paired)
                names[i] = (paired, transposed)
                continue
            path = node_module_path(node)
            raw = module_path(node.name, collapse=False)
            if path and raw and raw != path and any(n.startswith(raw + ".") for n in taken) \
                    and not any(n.startswith(path + ".") for n in taken):
                path = raw  # a named sibling (the bias) says the scope was not a container's
            role = _recurrent_role(node, k) or ROLE.get((node.op_type, k), f"param{k}")
            base = f"{path}.{role}" if path else i
            name, j = base, 1
            while name in taken:
                j += 1
                name = f"{base}.{j}"
            taken.add(name)
            names[i] = (name, transposed)
    return names


_RECURRENT = {1: "W", 2: "R", 3: "B", 7: "P"}  # ONNX GRU / LSTM inputs holding weights


def _recurrent_role(node, k: int) -> str | None:
    """A GRU / LSTM weight's role as the exporter names a traced torch layer's
    (``GRU_1.W``: layer 1 of the module, from TorchScript's node name ``/r/GRU_1``), which
    ``export-model`` turns into torch's ``weight_ih_l1`` & co. (an outside probe: an ONNX
    file's were ``r.param1``..3, in ONNX's packed layout, and ``load_state_dict(strict=False)``
    skipped the whole layer). A node not named so gets ``GRU.W`` (layer 0)."""
    if node.op_type not in ("GRU", "LSTM") or k not in _RECURRENT:
        return None
    last = node.name.rstrip("/").rsplit("/", 1)[-1]
    op = last if re.fullmatch(rf"{node.op_type}(_\d+)?", last) else node.op_type
    return f"{op}.{_RECURRENT[k]}"


def _bias_paired(node, k: int, readers, inits, taken: set[str]) -> str | None:
    """The torch name of an anonymous MatMul / Gemm weight whose product its module adds a
    named bias to: that bias's name with ``weight`` for ``bias``
    (``enc.self_attn.in_proj_bias`` -> ``enc.self_attn.in_proj_weight``; the guess from the
    node, ``enc.self_attn.weight``, is no name nn.MultiheadAttention has). None without one."""
    from .layers import is_anonymous, node_module_path

    if (node.op_type, k) not in (("MatMul", 1), ("Gemm", 1)):
        return None
    if node.op_type == "Gemm":
        bias = [node.input[2]] if len(node.input) > 2 else []
    else:
        scope = node_module_path(node)
        bias = [b for n in readers.get(node.output[0], []) if n.op_type == "Add"
                and scope is not None and node_module_path(n) == scope
                for b in n.input if b in inits]
    bias = [b for b in bias if not is_anonymous(b) and b.endswith(("_bias", ".bias"))]
    if len(bias) != 1:
        return None
    name = bias[0][:-len("bias")] + "weight"
    return None if name in taken else name


TIE_MIN_ELEMENTS = 16  # below this, equal values can be chance (a small bias, a fresh norm)


def tie_equal_initializers(model: onnx.ModelProto) -> list[str]:
    """An ONNX file's float initializers that hold one tensor's values twice (a language model's
    output layer tied to its embedding: exporters write the table and its transpose, or split
    it into two tensors) become one: the later copy is computed from the first in the graph
    (Transpose / Reshape / Identity), so training updates both uses together, as in the model
    that was exported. Only tensors of at least ``TIE_MIN_ELEMENTS`` values that are not all
    equal count (equal fresh weights are chance), and only a lookup table (a Gather's data)
    with a copy that other ops read (an output layer's MatMul / Gemm, the table or its
    transpose): equal tensors otherwise are copies of one layer (a deep-copied layer before
    training, read the same way or one by a MatMul and the other by a Gemm) and stay apart.
    Returns the notes to print."""
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT
              and int(np.prod(t.dims)) >= TIE_MIN_ELEMENTS]
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for k, i in enumerate(node.input):
            uses.setdefault(i, set()).add((node.op_type, k))
    seen: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    copies: list[onnx.NodeProto] = []
    notes: list[str] = []
    gone: set[str] = set()
    apart: list[tuple[str, str]] = []
    for t in floats:
        a = numpy_helper.to_array(t)
        if float(a.max()) == float(a.min()):
            continue
        key = (a.size, float(a.astype(np.float64).sum()), float(np.abs(a).max()))
        first = next(((n, v) for n, v in seen.get(key, []) if _as_param(a, v) is not None), None)
        if first is None:
            seen.setdefault(key, []).append((t.name, a))
            continue
        how = _as_param(a, first[1])
        looked_up = [("Gather", 0) in uses.get(n, set()) for n in (t.name, first[0])]
        if looked_up[0] == looked_up[1]:
            # the same values, not a table and its output layer: copies of one layer
            # (nn.TransformerEncoder and HF's clones deep-copy a layer, equal until trained;
            # a copy may be read by a MatMul, transposed, and the original by a Gemm)
            apart.append((t.name, first[0]))
            continue
        if how == "T":
            copies.append(helper.make_node("Transpose", [first[0]], [t.name], perm=[1, 0],
                                           name=f"tied/{t.name}"))
        elif how == "reshape":
            shape = numpy_helper.from_array(np.array(a.shape, np.int64), f"{t.name}.shape")
            model.graph.initializer.append(shape)
            copies.append(helper.make_node("Reshape", [first[0], shape.name], [t.name],
                                           name=f"tied/{t.name}"))
        else:
            copies.append(helper.make_node("Identity", [first[0]], [t.name],
                                           name=f"tied/{t.name}"))
        gone.add(t.name)
        notes.append(f"note: '{t.name}' holds the values of '{first[0]}'"
                     f"{' transposed' if how == 'T' else ''}: trained as one tensor (tied "
                     "weights)")
    if apart:
        notes.append(f"note: {len(apart)} weight(s) hold the same values as another "
                     f"('{apart[0][0]}' = '{apart[0][1]}'): trained as separate tensors, "
                     "copies of one layer as a model's deep-copied layers start out; a model "
                     "that really ties them trains them as one when exported from PyTorch "
                     "(--model file.py:factory)")
    if copies:
        keep = [i for i in model.graph.initializer if i.name not in gone]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        inputs = [i for i in model.graph.input if i.name not in gone]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        nodes = copies + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return notes
