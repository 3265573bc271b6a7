"""Training graphs at shorter token lengths, for micro-batches of short texts.

The training graphs read static shapes, so a text bundle trains at one token length L: a frozen
prefix runs each micro-batch without its trailing padding (export/prefix.py), but the trainable
part (or the whole graph, without a prefix) still ran every micro-batch padded to L. On Rotten
Tomatoes (mean 27 of 64 tokens) a step's rows, sorted by length and cut into micro-batches of
8-13, need at most 32 or 48 tokens in two thirds of the micro-batches. So the exporter traces
the model again at a few shorter lengths (default L/2 and 3L/4) and builds the vanilla and
instant graphs there too, as ``{mode}@{length}``; the runtime runs a micro-batch at the
shortest length that holds its longest row.

Only for a model whose inference graph takes any length and masks its padding
(export/any_length.py). Exact where the trained graph ignores padded positions, and checked: on
the tokenizer's encodings of sentences that fit, the forward at the shorter length must give
the full-length forward's loss and outputs; a length that fails (or cannot be traced, or whose
compressible layers differ in anything but their token count) is left out.

INSTANT at a shorter length uses the full-length bases cut to their first ``length`` positions
(token-axis layers): the same products as at L with the positions past ``length`` zero, so the
runtime plans and calibrates at L as before (runtime/trainer.py: ``_bases_at``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx

from contract import LossSpec, TextSpec, names

from .graph import ExportError, Shapes
from .layers import CompressedLayer, find_compressible_layers
from .tracing import Traced, at_length

__all__ = ["LengthGraphs", "auto_lengths", "length_graphs", "shorter_graphs"]

RENAMED = "length{}/"  # frozen tensors of a shorter trace whose values differ from the L trace's


@dataclasses.dataclass
class LengthGraphs:
    """The cut training forward at ``length`` and its compressible layers (the L layers' axes)."""

    length: int
    forward: onnx.ModelProto
    layers: list[CompressedLayer]


def auto_lengths(seq_len: int, step: int = 8) -> list[int]:
    """The default shorter lengths: L/2 and 3L/4 rounded down to multiples of ``step`` (the
    runtime rounds a micro-batch's length up to one), none below ``step``."""
    out = sorted({(seq_len * k // 4) // step * step for k in (2, 3)})
    return [n for n in out if step <= n < seq_len]


def shorter_graphs(traced: Traced, text: TextSpec, lengths: list[int] | None, *, prefix,
                   **kw) -> list[LengthGraphs]:
    """The forwards at ``lengths`` (None: :func:`auto_lengths`) that pass the checks of
    :func:`length_graphs`; ``prefix`` is what export/prefix.py split off (None: whole graphs).

    Raises:
        ExportError: a length not below the model's own.
    """
    out = []
    for n in auto_lengths(text.seq_len) if lengths is None else sorted(set(lengths)):
        if not 1 <= n < text.seq_len:
            raise ExportError(f"--lengths {n}: a shorter length must be 1 to "
                              f"{text.seq_len - 1} (the model's length is {text.seq_len})")
        got = length_graphs(traced, text, n, carried=prefix.axes if prefix else {},
                            prefix_graph=prefix.graph if prefix else None, **kw)
        if got is not None:
            out.append(got)
    return out


def length_graphs(traced: Traced, text: TextSpec, length: int, *, head: tuple[int, str] | None,
                  params: list[str], loss: str, loss_spec: LossSpec, layers: list[CompressedLayer],
                  carried: dict[str, int], full_forward: onnx.ModelProto, prefix_graph,
                  initial: dict[str, np.ndarray], lookups: dict, weights, tokenizer,
                  torch_names: dict[str, str], exclude: list[str] | None,
                  steps: dict[str, Callable]) -> LengthGraphs | None:
    """The training forward at ``length`` (cut after the prefix as ``full_forward`` is, where
    there is one), or None where this length cannot be used (see the module docstring).

    ``steps`` are the exporter's own graph steps (dynamic_batch, params_as_inputs,
    split_lookups, append_loss), applied here the same way; ``carried`` the prefix's outputs and
    their token axes; ``prefix_graph`` the any-length prefix (for the check; None: no prefix);
    ``weights`` the bundle's weight file (lookup tables are stored there once, by name)."""
    from .any_length import rename_differing
    from .heads import add_head
    from .prefix import _cut_forward

    again = at_length(traced, text.token_inputs, length)
    if again is None or again.inputs != traced.inputs:
        return None
    try:
        if head is not None:
            add_head(again, *head)
        if again.outputs != traced.outputs:
            return None
        fwd = again.model  # a trace of our own: changed in place
        steps["dynamic_batch"](fwd, again.inputs + again.outputs)
        steps["params_as_inputs"](fwd, params)
        if steps["split_lookups"](fwd, set(again.inputs), weights) != lookups:
            return None
        if steps["append_loss"](fwd, again.outputs[0], loss, Shapes(fwd)) != loss_spec:
            return None
        shapes = Shapes(fwd)
        found = find_compressible_layers(fwd, shapes, set(params), torch_names, exclude)
        if not _same_layers(found, layers, text.seq_len, length):
            return None
        for mine, full in zip(found, layers, strict=True):
            mine.name, mine.p_input, mine.q_input = full.name, full.p_input, full.q_input
            mine.x_axis, mine.g_axis, mine.x_itemsize = full.x_axis, full.g_axis, full.x_itemsize
            mine.gx_exact_at_full, mine.token_mask = full.gx_exact_at_full, full.token_mask
        cut = _cut_forward(fwd, list(carried), shapes) if carried else fwd
        if cut is None:
            return None
        rename_differing(cut, {t.name: t for t in full_forward.graph.initializer},
                         RENAMED.format(length))
        if not _same_outputs(cut, full_forward, prefix_graph, carried, length, text, tokenizer,
                             initial, lookups, weights.array, loss_spec, again.outputs[0],
                             traced.padding_rows):
            return None
    except Exception:  # noqa: BLE001 - any failure: no graphs at this length
        return None
    return LengthGraphs(length, cut, found)


def _same_layers(found: list[CompressedLayer], layers: list[CompressedLayer], seq_len: int,
                 length: int) -> bool:
    """The same layers in the same order, differing in their token count only, and only where
    it is the text's (seq_len at L, ``length`` here)."""
    if len(found) != len(layers):
        return False
    for a, b in zip(found, layers, strict=True):
        if (a.node, a.x, a.y, a.weight, a.kind, a.weight_layout, a.cx, a.cy, a.rank3) != \
                (b.node, b.x, b.y, b.weight, b.kind, b.weight_layout, b.cx, b.cy, b.rank3):
            return False
        if a.tokens != b.tokens and not (b.tokens == seq_len and a.tokens == length):
            return False
    return True


def _same_outputs(cut, full_forward, prefix_graph, carried, length, text, tokenizer, initial,
                  lookups, tables, loss_spec, output, keep_rows=None) -> bool:
    """Whether the forward at ``length`` gives the full-length forward's loss and output on the
    tokenizer's encodings of the sentences that fit ``length`` (padded positions zero, as the
    runtime feeds them), at the initial weights and at weights moved as training could move
    them (any_length.py ``moved``)."""
    from .any_length import _encodings, moved
    from .any_length import ort_session as session
    from .prefix import run_graph

    feeds = _encodings(text, tokenizer)
    if feeds is None:
        return False
    mask = feeds[text.mask_input]
    rows = np.nonzero(mask.sum(1) < length)[0]
    if rows.size == 0:
        return False
    feeds = {k: v[rows] for k, v in feeds.items()}
    mask = feeds[text.mask_input]
    n = len(rows)
    keep = int(mask.sum(1).max())
    tokens = set(text.token_inputs)
    trimmed = {k: (np.ascontiguousarray(v[:, :keep]) if k in tokens else v)
               for k, v in feeds.items()}
    sessions = {size: session(full_forward if size == text.seq_len else cut)
                for size in (text.seq_len, length)}
    pre_sess = session(prefix_graph) if carried else None
    for values in (initial, moved(initial, keep_rows)):

        def run(sess, x, outs, values=values):
            return run_graph(sess, x, outs, n, lookups, tables, values, loss_spec)

        pre = run(pre_sess, trimmed, list(carried)) if carried else []
        got = []
        for size, sess in sessions.items():
            x = {k: (np.ascontiguousarray(v[:, :size]) if k in tokens else v)
                 for k, v in feeds.items()}
            for (t, axis), a in zip(carried.items(), pre, strict=True):
                if axis >= 0:
                    pad = [(0, 0)] * a.ndim
                    pad[axis] = (0, size - a.shape[axis])
                    a = np.pad(a, pad) * (mask[:, :size] != 0).reshape(
                        [n] + [size if i == axis else 1 for i in range(1, a.ndim)])
                x[t] = a
            got.append(run(sess, x, [names.LOSS, output]))
        for a, b in zip(*got, strict=True):
            scale = 1.0 + float(np.abs(a).max())
            if a.shape != b.shape or float(np.abs(a - b).max()) > 1e-4 * scale:
                return False
    return True
