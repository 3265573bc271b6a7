"""Where a torch model stops or replaces the gradient of a trainable parameter.

``x.detach()``, a block under ``torch.no_grad()`` and a custom ``torch.autograd.Function``
all export to plain forward ops (ONNX has no stop-gradient and no user backward), and the
bundle's autodiff then differentiates straight through them: a straight-through estimator,
a stop-gradient head, a teacher run under ``no_grad`` or a gradient-reversal layer trained with
other gradients than torch's, silently (session 29 probe: weights torch leaves alone moved,
and the other way round).

With the parameters that will train marked ``requires_grad`` (the others not): a trace
shows each ``detach`` and custom ``Function`` (``prim::PythonOp``) that a trainable
parameter's value reaches on its way to an output, and a second forward under a
``TorchFunctionMode`` sees each torch call made with autograd off (``no_grad``) on a tensor
that needs a gradient.
"""

from __future__ import annotations

import re
import warnings

__all__ = ["check_gradient_stops", "gradient_stops"]

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
    ``trainable`` parameters (torch names), as ``"x.detach() (aten::detach at model.py:8)"``
    strings; empty where it does not, or where the model cannot be traced this way (the check
    is then skipped)."""
    import torch

    params = dict(module.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    found: list[str] = []
    try:
        for n, p in params.items():
            p.requires_grad_(n in trainable)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the tracer's TracerWarnings: export says its own)
            graph, _ = torch.jit._get_trace_graph(module, args)
            found += _traced_stops(graph)
            found += _no_grad_calls(module, args)
    except Exception:  # noqa: BLE001 - a model this check cannot run: nothing more is claimed
        return found
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
    return found


def _traced_stops(graph) -> list[str]:
    """``detach`` and custom ``Function`` nodes of a traced graph on a trainable parameter's
    way to an output. Which values depend on a trainable parameter is followed from the
    graph's inputs (the traced types' own ``requires_grad`` is not kept for every op: a
    convolution's output read False)."""
    dep = {v.unique() for v in graph.inputs() if _needs_grad(v)}
    stops = []
    for node in graph.nodes():
        if not any(v.unique() in dep for v in node.inputs()):
            continue
        kind = node.kind()
        if kind in ("aten::detach", "prim::PythonOp"):
            stops.append(node)
        if kind != "aten::detach":
            dep.update(o.unique() for o in node.outputs() if _is_float(o))
    needed = _feeding_outputs(graph)
    return [(f"custom autograd.Function {n.pyname()} ({_where(n.sourceRange())})"
             if n.kind() == "prim::PythonOp" else
             f"x.detach() (aten::detach at {_where(n.sourceRange())})")
            for n in stops if any(o.unique() in needed for o in n.outputs())]


def _no_grad_calls(module, args: tuple) -> list[str]:
    """Each torch call of one forward made with autograd off on a tensor that needs a gradient
    (a trainable weight, or a value computed from one): a ``torch.no_grad()`` block."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    found: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not torch.is_grad_enabled() and len(found) < 8 and any(
                    isinstance(t, torch.Tensor) and t.requires_grad
                    for t in tree_flatten((args, kwargs))[0]) and not _in_function():
                found.append(f"torch.no_grad() ({getattr(func, '__name__', func)} at "
                             f"{_where(None)})")
            return func(*args, **kwargs)

    with Watch():
        module(*args)
    return found


def _in_function() -> bool:
    """Whether a custom ``autograd.Function``'s forward is running (autograd is off there by
    design; the trace names the Function itself)."""
    import traceback

    return any(f.filename.replace("\\", "/").endswith("torch/autograd/function.py")
               for f in traceback.extract_stack())


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


def _where(source: str | None) -> str:
    """The first frame outside torch and this module, as ``file.py:LINE``: of a traced node's
    ``source`` (its ``sourceRange()``), or of the running stack where None."""
    if source is None:
        import traceback

        frames = [(f.filename, f.lineno) for f in reversed(traceback.extract_stack())]
    else:
        frames = [(m[1], int(m[2])) for m in map(_FRAME.match, (line.strip() for line in
                                                               source.splitlines())) if m]
    for file, line in frames:
        file = file.replace("\\", "/")
        if "/torch/" not in file and not file.endswith("export/grad_stops.py"):
            return f"{file.rsplit('/', 1)[-1]}:{line}"
    return "a line inside torch"
