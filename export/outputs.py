"""A traced model's outputs: their names (a dict's keys, ``output0``, ... or ``logits``) and
the one ``--output`` picks, the graph pruned to it (split from export/tracing.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from contract import names as names_

from .graph import ExportError, reads

if TYPE_CHECKING:
    from .tracing import Traced

__all__ = ["input_names", "output_names", "pick_output"]


def pick_output(traced: Traced, output: str | None) -> Traced:
    """Keep only the chosen output (the graph is pruned to what it needs)."""
    if output is None:
        if len(traced.outputs) != 1:
            raise ExportError(f"model has {len(traced.outputs)} outputs "
                              f"({', '.join(traced.outputs)}); pick the one to train with "
                              "--output NAME (add --head CLASSES to put a classifier on it)")
        return traced
    if output not in traced.outputs:
        raise ExportError(f"--output '{output}' is not an output of the model; outputs: "
                          f"{', '.join(traced.outputs)}")
    g = traced.model.graph
    keep_out = [o for o in g.output if o.name == output]
    others = [o.name for o in g.output if o.name != output]
    del g.output[:]
    g.output.extend(keep_out)
    needed = {output}
    nodes = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            nodes.append(n)
            needed.update(reads(n))  # with the names an If's branches read from outside
    del g.node[:]
    g.node.extend(reversed(nodes))
    inits = [t for t in g.initializer if t.name in needed]
    dropped = len(g.initializer) - len(inits)
    del g.initializer[:]
    g.initializer.extend(inits)
    traced.outputs = [output]
    if others:  # (a probe's second head vanished from the bundle and export-model unsaid)
        traced.notes.append(
            f"note: only output '{output}' is trained and exported; the model's other "
            f"output(s) ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''})"
            + (f" and the {dropped} tensor(s) only they use" if dropped else "")
            + " are left out of the bundle and of export-model's files")
    return traced


def forward_params(module) -> list[str]:
    """The names of ``module.forward``'s parameters ([] where they cannot be read)."""
    import inspect

    try:
        return [p for p in inspect.signature(module.forward).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def input_names(module, n: int) -> list[str]:
    names = forward_params(module)
    if len(names) >= n:
        return names[:n]
    return ["x"] if n == 1 else [f"x{i}" for i in range(n)]


def output_names(result, inputs: list[str]) -> list[str]:
    """Names for the forward's outputs in the order torch's exporter flattens them: a dict's
    keys (``{"aux": ..., "logits": ...}``: pick one with ``--output logits``), a nested value's
    key and place (``{"logits": ..., "extra": (a, b)}``: ``logits``, ``extra.0``, ``extra.1``;
    a session-28 probe's were ``output0..2``, and ``--output logits`` was refused),
    ``output0``, ``output1``, ... for a tuple or list (or nested ones), ``logits`` for a single
    tensor."""
    from torch.utils._pytree import tree_leaves

    n = sum(v is not None for v in tree_leaves(result))  # torch's exporter drops None outputs
    named = isinstance(result, dict) or _is_namedtuple(result)  # (an outside probe: a dict
    if named:  # with "loss": None was "2 output names for 1 output", a NamedTuple's output0..)
        paths = list(_paths(result, ""))
        # a key that is no plain name, or that an input or the bundle's own tensors use
        # (``loss``, ``labels``), gets ``_out`` (the --output error lists the names)
        taken = set(inputs) | {names_.LOSS, names_.LABELS}
        keys = [re.sub(r"[^A-Za-z0-9_.]", "_", k) or "output" for k in paths]
        keys = [f"{k}_out" if k in taken else k for k in keys]
        if len(keys) == n and len(set(keys)) == len(keys):  # (else as torch counts them)
            return keys
    return ["logits"] if n == 1 and not named else [f"output{i}" for i in range(n)]


def _is_namedtuple(value) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _paths(value, prefix: str):
    """Each tensor's place in a nest of dicts, NamedTuples, tuples and lists, in flattening
    order (None, which torch's exporter drops, has none)."""
    if value is None:
        return
    if isinstance(value, dict) or _is_namedtuple(value):
        items = value.items() if isinstance(value, dict) else zip(value._fields, value,
                                                                  strict=True)
        for k, v in items:
            yield from _paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from _paths(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix
