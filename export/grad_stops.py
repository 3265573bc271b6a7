"""Where a torch model stops or replaces the gradient of a trainable parameter.

``x.detach()``, a block under ``torch.no_grad()`` and a custom ``torch.autograd.Function``
all export to plain forward ops (ONNX has no stop-gradient and no user backward), and the
bundle's autodiff then differentiates straight through them: a straight-through estimator,
a stop-gradient head, a teacher run under ``no_grad`` or a gradient-reversal layer trained with
other gradients than torch's, silently (session 29 probe: weights torch leaves alone moved,
and the other way round).

One trace with autograd on, the parameters that will train marked ``requires_grad`` and the
others not, shows each such place: an op with an input that needs a gradient and a
floating-point output that has none (``detach``, an op under ``no_grad``), or a custom
``Function`` (``prim::PythonOp``) with such an input, on the way to an output. Ops whose
output does not depend on their input's values (``zeros_like`` & co.) are not stops.
"""

from __future__ import annotations

import re

__all__ = ["check_gradient_stops", "gradient_stops"]

# outputs made from an input's shape or dtype only: no gradient to stop
_VALUE_FREE = {"aten::zeros_like", "aten::ones_like", "aten::full_like", "aten::empty_like",
               "aten::rand_like", "aten::randn_like", "aten::randint_like", "aten::new_zeros",
               "aten::new_ones", "aten::new_full", "aten::new_empty", "aten::bernoulli",
               "aten::size", "aten::numel"}
_FLOATS = {"Float", "Double", "Half", "BFloat16"}
_FRAME = re.compile(r"^(.*)\((\d+)\): (\S+)$")


def check_gradient_stops(traced, params: list[str]) -> None:
    """Refuse a torch model whose forward stops or replaces a trainable weight's gradient
    (export/grad_stops.py): the bundle would train through the stop.

    Raises:
        ExportError: naming the first place, and the way out.
    """
    if traced.grad_stops is None:
        return
    stops = traced.grad_stops({traced.torch_names[p][0] for p in params
                               if p in traced.torch_names})
    if stops:
        more = f" and {len(stops) - 1} more" if len(stops) > 1 else ""
        from .graph import ExportError

        raise ExportError(f"model '{traced.source}' stops or replaces the gradient of trainable "
                          f"weights at {stops[0]}{more}: ONNX has no form for that, and the "
                          "bundle would train through it as if it were not there (other "
                          "gradients than torch's); freeze the weights before it with "
                          "--trainable, or export a version of the model without it")


def gradient_stops(module, args: tuple, trainable: set[str]) -> list[str]:
    """Where ``module``'s forward on ``args`` stops or replaces the gradient of one of the
    ``trainable`` parameters (torch names), as ``"x.detach() or torch.no_grad() (aten::detach
    at model.py:8)"`` strings; empty where it does not, or where the model cannot be traced
    this way (the check is then skipped)."""
    import torch

    params = dict(module.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in trainable)
        with torch.enable_grad():
            graph, _ = torch.jit._get_trace_graph(module, args)
    except Exception:  # noqa: BLE001 - a model this trace cannot take: nothing is claimed
        return []
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
    needed = _feeding_outputs(graph)
    found = []
    for node in graph.nodes():
        if not any(_needs_grad(v) for v in node.inputs()):
            continue
        if not any(o.unique() in needed for o in node.outputs()):
            continue
        kind = node.kind()
        if kind == "prim::PythonOp":
            found.append(f"custom autograd.Function {node.pyname()} ({_where(node)})")
        elif kind not in _VALUE_FREE and any(_is_float(o) and not _needs_grad(o)
                                             for o in node.outputs()):
            what = "x.detach()" if kind == "aten::detach" else "torch.no_grad()"
            found.append(f"{what} ({kind} at {_where(node)})")
    return found


def _feeding_outputs(graph) -> set[int]:
    """The ``unique()`` ids of the values the graph's outputs depend on."""
    seen: set[int] = set()
    stack = list(graph.outputs())
    while stack:
        v = stack.pop()
        if v.unique() in seen:
            continue
        seen.add(v.unique())
        stack.extend(v.node().inputs())
    return seen


def _needs_grad(v) -> bool:
    import torch

    t = v.type()
    return isinstance(t, torch._C.TensorType) and bool(t.requires_grad())


def _is_float(v) -> bool:
    import torch

    t = v.type()
    return isinstance(t, torch._C.TensorType) and t.scalarType() in _FLOATS


def _where(node) -> str:
    """The first frame of the node's source outside torch itself, as ``file.py:LINE``."""
    frames = [_FRAME.match(line.strip()) for line in node.sourceRange().splitlines()]
    for m in frames:
        if m and "/torch/" not in m[1].replace("\\", "/"):
            return f"{m[1].replace(chr(92), '/').rsplit('/', 1)[-1]}:{m[2]}"
    return "a line inside torch"
