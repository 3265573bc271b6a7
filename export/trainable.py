"""Which parameters train: the candidates of a traced model and ``--trainable`` (``all``,
``last:N``, globs) over them."""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph import NARROW_FLOATS, ExportError
from .tracing import Traced

__all__ = ["buffer_like", "buffer_note", "check_derived", "mask_like", "select_trainable", "selected_by"]


# float inputs that are settings, not data: a tensor read only here is no parameter (a
# dynamo file's Resize scales were a "trainable" 4-float tensor, and its export failed with
# "must be a constant")
_SETTINGS = {"Resize": {1, 2, 3}, "Upsample": {1}, "Clip": {1, 2}, "Dropout": {1, 2},
             "Range": {0, 1, 2}, "ConstantOfShape": {0}}


def _settings_only(g) -> set[str]:
    """Tensors that every node reading them reads at a settings position (``_SETTINGS``)."""
    setting, data = set(), set()
    for n in g.node:
        for i, name in enumerate(n.input):
            (setting if i in _SETTINGS.get(n.op_type, ()) else data).add(name)
    return setting - data


def _candidate_params(traced: Traced) -> list[str]:
    g = traced.model.graph
    used = []
    settings = _settings_only(g)
    bn_stats = {n.input[i] for n in g.node if n.op_type == "BatchNormalization"
                for i in (3, 4) if len(n.input) > i}
    inits = {i.name: i for i in g.initializer}
    group_norm_consts = _group_norm_constants(g, inits)
    roles = {n.input[i] for n in g.node for i in range(len(n.input))
             if (n.op_type, i) in (("Gemm", 2), ("Conv", 2), ("ConvTranspose", 2),
                                   ("PRelu", 1))}  # a one-element slope is still a parameter
    order = {}
    for k, n in enumerate(g.node):
        for i in n.input:
            order.setdefault(i, k)
    for init in g.initializer:
        if (init.data_type != TensorProto.FLOAT or init.name in bn_stats | group_norm_consts
                or (init.name in settings and not traced.from_torch)):  # torch: by its names
            continue
        if traced.from_torch and init.name not in traced.torch_names:
            continue  # a torch buffer or a folded constant, not a parameter
        if not traced.from_torch and int(np.prod(init.dims)) < 2 and init.name not in roles:
            continue  # a scalar constant (an epsilon, a scale), unless a layer's bias
        if not traced.from_torch and not np.isfinite(numpy_helper.to_array(init)).all():
            continue  # -inf in a folded causal mask: a constant, no weight can hold it
        if init.name in order:
            used.append(init.name)
    return sorted(used, key=lambda n: order[n])


def _scalars(traced: Traced, cands: list[str]) -> list[str]:
    """The float one-element initializers of an ONNX file that nodes read and that are not
    parameters by role (see ``_candidate_params``)."""
    return [] if traced.from_torch else _one_value(traced.model, set(cands))


def _one_value(model: onnx.ModelProto, exclude: set[str]) -> list[str]:
    """The float one-element initializers of ``model`` that nodes read, but for ``exclude``."""
    used = {i for n in model.graph.node for i in n.input}
    return [i.name for i in model.graph.initializer
            if i.data_type == TensorProto.FLOAT and int(np.prod(i.dims)) < 2
            and i.name in used and i.name not in exclude]


def _group_norm_constants(g, inits) -> set[str]:
    """The fixed ones/zeros scale and shift of an InstanceNormalization that normalises a
    reshaped input: how exporters write GroupNorm (its own affine weights follow as Mul/Add),
    constants of the decomposition, not parameters."""

    made_by = {o: n.op_type for n in g.node for o in n.output}
    out = set()
    for n in g.node:
        if n.op_type != "InstanceNormalization" or made_by.get(n.input[0]) != "Reshape":
            continue
        for name, want in zip(n.input[1:3], (1.0, 0.0), strict=False):
            if name in inits and np.all(numpy_helper.to_array(inits[name]) == want):
                out.add(name)
    return out


def select_trainable(traced: Traced, spec: str) -> list[str]:
    """``all``, ``last:N`` (last N top-level children / layer groups) or comma-separated globs."""
    cands = _candidate_params(traced)
    quantized = _quantized(traced)
    if quantized:  # (session 34 probe: a QDQ model's weights froze without a word)
        traced.notes.append(f"note: {len(quantized)} weight(s) are stored quantized (integers "
                            f"read through DequantizeLinear: {', '.join(quantized[:4])}"
                            f"{' …' if len(quantized) > 4 else ''}) and stay frozen; to train "
                            "them, export the model before quantizing it")
    narrow = _narrow(traced)
    if narrow and cands:  # (an outside probe: a float16 head of a float32 model froze silently)
        traced.notes.append(f"note: {len(narrow)} weight(s) are float16/bfloat16/float64 and "
                            f"the model computes with them in that type ({', '.join(narrow[:4])}"
                            f"{' …' if len(narrow) > 4 else ''}); they stay frozen (training "
                            "runs in float32): export the model in float32 to train them")
    spec = spec.strip()
    if spec == "all":
        chosen = cands
    elif spec.startswith("last:") or spec.isdigit():
        try:
            n = int(spec.split(":", 1)[-1])
        except ValueError:
            raise ExportError(f"invalid --trainable '{spec}': expected last:N") from None
        if traced.children:
            groups = [names for _, names in traced.children if names]
        else:
            prefixes: dict[str, list[str]] = {}
            for p in cands:
                prefixes.setdefault(traced.display(p).rsplit(".", 1)[0], []).append(p)
            groups = list(prefixes.values())
        if n <= 0 or n > len(groups):
            raise ExportError(f"invalid --trainable '{spec}': the model has {len(groups)} "
                              "top-level parameterized children")
        chosen = [p for grp in groups[-n:] for p in grp if p in cands]
    else:
        pats = [p.strip() for p in spec.split(",") if p.strip()]

        def hit(c: str, p: str) -> bool:
            return fnmatch.fnmatch(traced.display(c), p) or fnmatch.fnmatch(c, p)

        # a scalar of an ONNX file (CLIP's logit_scale) is a constant unless a pattern names it
        # exactly: a wildcard would also catch epsilons and fixed scales
        named = [c for c in _scalars(traced, cands)
                 if any(p in (c, traced.display(c)) for p in pats)]
        chosen = [c for c in cands if any(hit(c, p) for p in pats)] + named
        for p in pats:
            if not any(hit(c, p) for c in cands) and not any(p in (c, traced.display(c))
                                                             for c in named):
                shown = [traced.display(c) for c in cands]
                q = [c for c in quantized if fnmatch.fnmatch(c, p)]
                h = [c for c in narrow if fnmatch.fnmatch(c, p)]
                raise ExportError(f"--trainable pattern '{p}' matches no parameter" + (
                    f" (it names quantized weight(s), {', '.join(q[:3])}, which cannot train: "
                    "export the model before quantizing it)" if q else "") + (
                    f" (it names weight(s) computed in float16/bfloat16/float64, "
                    f"{', '.join(h[:3])}; training runs in float32: export the model in "
                    "float32)" if h else "") + "; parameters: "
                    f"{', '.join(shown[:12])}{' …' if len(shown) > 12 else ''}")
    return _without_no_grad(traced, spec, chosen)


def _quantized(traced: Traced) -> list[str]:
    """Integer initializers that a DequantizeLinear reads as its data (a QDQ model's weights)."""
    read = {n.input[0] for n in traced.model.graph.node
            if n.op_type == "DequantizeLinear" and n.input}
    return [i.name for i in traced.model.graph.initializer
            if i.name in read and i.data_type != TensorProto.FLOAT]


def _narrow(traced: Traced) -> list[str]:
    """Weights (two or more values) stored in float16/bfloat16/float64 that nodes read as they
    are: those behind a Cast to float32 were made float32 at import (``float32_weights``)."""
    read = {i for n in traced.model.graph.node for i in n.input}
    return [i.name for i in traced.model.graph.initializer
            if i.data_type in NARROW_FLOATS and i.name in read and int(np.prod(i.dims)) >= 2
            and (not traced.from_torch or i.name in traced.torch_names)]  # (not buffers)


def _no_float32(traced: Traced) -> str:
    """Why a model has no trainable tensor, where its weights are all in another float type,
    quantized, or none at all."""
    found = sorted({NARROW_FLOATS[i.data_type] for i in traced.model.graph.initializer
                    if i.data_type in NARROW_FLOATS})
    if not found:
        if _quantized(traced):
            return (": its weights are quantized (integers read through DequantizeLinear); "
                    "export the model before quantizing it")
        if not any(i.data_type == TensorProto.FLOAT and int(np.prod(i.dims)) >= 2
                   for i in traced.model.graph.initializer):
            return (": the model holds no float weights (nothing to train); export a model "
                    "with its parameters")
        return ""
    return (f": the model's weights are {'/'.join(found)} and it computes in that type, while "
            "training runs in float32; export the model in float32 (torch: model.float() "
            "before exporting)")


def _without_no_grad(traced: Traced, spec: str, chosen: list[str]) -> list[str]:
    """``chosen`` less the parameters the user froze in torch (``requires_grad_(False)``): they
    stay frozen, as in torch, with a note (an error where nothing else is left)."""
    off = [c for c in chosen if c in traced.no_grad]
    if not chosen or len(off) == len(chosen):
        why = (f": {len(off)} parameter(s) it matches have requires_grad=False in torch "
               f"({', '.join(traced.display(c) for c in off[:4])}{' …' if len(off) > 4 else ''});"
               " call requires_grad_(True) on the ones to train in the model factory, or pick "
               "others" if off else _no_float32(traced))
        raise ExportError(f"--trainable '{spec}' selects no parameter{why}")
    if off:
        shown = ", ".join(traced.display(c) for c in off[:6]) + (" …" if len(off) > 6 else "")
        traced.notes.append(f"note: {len(off)} parameters have requires_grad=False in torch and "
                            f"stay frozen ({shown}); call requires_grad_(True) on them in the "
                            "model factory to train them")
    return [c for c in chosen if c not in traced.no_grad]


def selected_by(traced: Traced, spec: str, torch_name: str) -> bool:
    """Whether --trainable ``spec`` covers torch parameter ``torch_name`` (one without a tensor
    in the graph, so not among the candidates ``select_trainable`` chose from)."""
    spec = spec.strip()
    if spec == "all":
        return True
    if spec.startswith("last:") or spec.isdigit():
        n = int(spec.split(":", 1)[-1])
        last = [c for c, names in traced.children if names][-n:]
        return torch_name.split(".", 1)[0] in last
    return any(fnmatch.fnmatch(torch_name, p.strip()) for p in spec.split(",") if p.strip())


def check_derived(traced: Traced, params: list[str]) -> None:
    """Refuse to train parameters that torch's exporter folded into a computed constant besides
    their own tensor (``F.normalize(self.weight)``: the norm became a constant): their gradient
    would miss that path, silently wrong (export/param_names.py finds those constants; a second
    export with only the trainable parameters changed tells whether those are among theirs)."""
    if not traced.derived or traced.derived_changes is None or not params:
        return
    trainable = [traced.display(p) for p in params]
    hit = traced.derived_changes(set(trainable))
    if not hit:
        return  # computed from frozen parameters only: a true constant for this training
    const = sorted(hit)[0]
    culprits = trainable
    if len(trainable) <= 8:  # small enough to ask parameter by parameter
        culprits = [p for p in trainable if const in traced.derived_changes({p})] or trainable
    where = f"module '{traced.derived[const]}'" if traced.derived[const] else "the model"
    raise ExportError(
        f"{where} computes a tensor from parameter(s) {', '.join(culprits[:4])}"
        f"{' …' if len(culprits) > 4 else ''} that torch's exporter folds into the constant "
        f"'{const}' (e.g. F.normalize(self.weight), weight norm), so their gradient would miss "
        "that path; leave them out of --trainable, or export the model yourself with "
        "torch.onnx.export(..., do_constant_folding=False) and pass the .onnx file")


def mask_like(model: onnx.ModelProto, params: list[str]) -> list[str]:
    """Trainable tensors of an ONNX file that look like masks: every value 0 or 1 (both seen)
    and an input of a Mul whose other input is another trainable tensor (a masked conv's
    ``weight * mask``; a probe's PixelCNN trained its mask, silently)."""
    inits = {t.name: t for t in model.graph.initializer}
    chosen = set(params)
    found = []
    for node in model.graph.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for k in (0, 1):
            m, other = node.input[k], node.input[1 - k]
            if m in chosen and other in chosen and m in inits and m not in found:
                v = numpy_helper.to_array(inits[m])
                if v.size > 1 and v.dtype.kind == "f" and np.isin(v, (0.0, 1.0)).all() \
                        and (v == 0).any() and (v == 1).any():
                    found.append(m)
    return found


def buffer_like(model: onnx.ModelProto, params: list[str]) -> list[str]:
    """Trainable tensors of an ONNX file that look like buffers: read only by ``Sub`` / ``Div``
    (an input normalisation's mean and std), or only added (rank 2 or more) to a value no
    MatMul / Gemm / Conv made (a position table; a bias is added to a product). torch's exporter
    writes buffers as initializers like weights (session 29 probe: an exported model's
    ``mean``, ``std`` and sinusoidal ``pe`` trained, and export-model shipped them changed)."""
    inits = {t.name: t for t in model.graph.initializer}
    trained = set(params)

    nodes = {o: n for n in model.graph.node for o in n.output}

    def normalised(name: str) -> bool:  # a normalisation's output (through a Reshape)
        n = nodes.get(name)
        while n is not None and n.op_type == "Reshape":
            n = nodes.get(n.input[0])
        return n is not None and n.op_type in ("InstanceNormalization", "LayerNormalization")

    def maker(n) -> str:  # a norm's scale by a trained tensor (GroupNorm's Mul then Add,
        # session 42 probe) makes a product its bias is added to, as MatMul does; not any Mul
        # (a buffer's x * scale + shift stays a buffer's, a review)
        scaled = n.op_type == "Mul" and any(normalised(i) for i in n.input) and any(
            i in inits and i in trained and math.prod(inits[i].dims) > 1 for i in n.input)
        return "MatMul" if scaled else n.op_type
    made_by = {o: maker(n) for n in model.graph.node for o in n.output}
    uses: dict[str, list[tuple[str, str]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in inits:
                other = node.input[1 - k] if len(node.input) == 2 and k < 2 else ""
                uses.setdefault(name, []).append((node.op_type, made_by.get(other, "")))
    found = []
    for p in params:
        seen = uses.get(p, [])
        if not seen or p not in inits:
            continue
        if all(op in ("Sub", "Div") for op, _ in seen) or (
                len(inits[p].dims) >= 2 and all(
                    op == "Add" and src not in ("MatMul", "Gemm", "Conv", "") for op, src in seen)):
            found.append(p)
    return found


def buffer_note(model: onnx.ModelProto, params: list[str]) -> str | None:
    """The export's notes (lines) on :func:`buffer_like` tensors and on named one-value tensors
    that stay constant (None: neither)."""
    found = buffer_like(model, params)
    lines = [f"note: {', '.join(found[:4])}{' …' if len(found) > 4 else ''} look(s) like "
             "buffers (read only by Sub/Div, or a table added to an input): an .onnx file "
             "cannot tell them from weights, so they train unless left out: pass --trainable "
             "naming the weights only"] if found else []
    scalars = named_scalars(model, params)
    if scalars:  # (session 30 probe: a torch Parameter(2.0) stayed 2.0 without a word)
        lines.append(f"note: {', '.join(scalars[:4])}{' …' if len(scalars) > 4 else ''}: "
                     "one-value tensor(s) that stay constant (an .onnx file holds epsilons and "
                     "fixed scales so too); a learned one (a temperature, a scale) trains when "
                     "--trainable names it exactly")
    return "\n".join(lines) or None


def named_scalars(model: onnx.ModelProto, params: list[str]) -> list[str]:
    """Float one-value initializers that nodes read, that are not among ``params`` and whose
    names an exporter did not make up (``onnx::Mul_12``, ``/layer/Constant_output_0``,
    ``_val_3``): a module's own scalar, a parameter or a buffer."""
    made_up = ("onnx::", "/", "_val", "val_", "Constant", "const")
    return [n for n in _one_value(model, set(params))
            if not any(m in n for m in made_up) and not n.startswith("_")]


def fresh_norms_note(model: onnx.ModelProto) -> str | None:
    """The export's note on BatchNormalization nodes whose running statistics are those of a
    norm that has seen no data (mean 0, variance 1 in every channel): in eval mode they do not
    normalise, and training keeps them so (a session 36 probe: a from-scratch keyword-spotting
    CNN reached 0.61 held-out after 300 steps where torch's training mode reached 0.89)."""
    inits = {t.name: t for t in model.graph.initializer}
    fresh = []
    for n in model.graph.node:
        if n.op_type != "BatchNormalization" or len(n.input) < 5 or \
                not all(i in inits for i in n.input[3:5]):
            continue
        mean, var = (numpy_helper.to_array(inits[i]) for i in n.input[3:5])
        if mean.size and not mean.any() and np.all(var == 1):
            fresh.append(n.input[1].removesuffix(".weight") if n.input[1] else n.name)
    if not fresh:
        return None
    return (f"note: {len(fresh)} BatchNorm layer(s) ({', '.join(fresh[:4])}"
            f"{' …' if len(fresh) > 4 else ''}) hold the statistics of a norm that has seen no "
            "data (mean 0, variance 1): they do not normalise, and training keeps their "
            "statistics fixed, so a model trained from scratch learns more slowly than in "
            "torch's training mode; run it in train mode over some of your data before "
            "exporting (torch then sets the statistics), or use LayerNorm/GroupNorm")
