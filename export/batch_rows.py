"""Whether a model's output for one row of its batch depends on the batch's other rows.

Training splits a batch into micro-batches (``--micro-batch``, or the one the budget planner
picks) and sums their gradients: exact for a model that computes each row on its own. A model
that takes a statistic over the batch axis (standardising by the batch's mean, in-batch
attention, contrastive scores against the other rows) computes another function on a
micro-batch than on the whole batch, so it would silently train something else (session 42
probe: 39 % gradient error at micro-batch 4 of 16, and NaN where a 4-row standard deviation
vanished, blamed on the data). The check runs the forward model on random rows, then again with
row 0 drawn anew: where another row's output moves, the bundle records it (manifest
``mixes_rows``) and the runtime trains it on whole batches only (runtime/budget.py
``run_plan``, and ``Trainer.gradients`` refuses a split batch). BatchNorm in eval form, as the
exporter traces it, mixes nothing.
"""

from __future__ import annotations

import numpy as np

from .graph import ExportError, Shapes
from .padding import _NP, _ROWS, _draw, _model
from .tracing import Traced

__all__ = ["check_rows_kept", "mixes_rows"]

_OTHER = 7  # the size of a symbolic axis besides the batch in check_rows_kept


def check_rows_kept(traced: Traced, shapes: Shapes, bounds: dict[str, int],
                    dynamic_batch) -> None:
    """Refuse a model none of whose outputs has one row per input row at two batch sizes
    (axis 0 of every input is the batch): a sequence-first model (``[L, N, C]``) traced as if
    axis 0 were the batch. Session 50 probe: such a file exported without a word and trained
    averaging over the samples, scoring token positions against labels (exit 0), and ``eval``
    ended in a traceback. Its other symbolic axes are drawn at a size of their own
    (``_OTHER``): a file declaring ``[16, "N", 12]`` had its own "N" tied to the batch's.
    Silent where the check cannot run (an input it cannot draw, a model onnxruntime cannot run
    here, e.g. at that size)."""
    from .any_length import ort_session

    rng = np.random.default_rng(0)
    try:
        sess = ort_session(_model(traced, dynamic_batch))
        got = []
        for rows in (_ROWS - 1, _ROWS + 1):
            feeds = {}
            for name in traced.inputs:
                dtype = _NP.get(shapes.dtype.get(name))
                dims = [rows, *(d if isinstance(d, int) and d > 0 else _OTHER
                                for d in shapes.of(name)[1:])]
                if dtype is None:
                    return
                feeds[name] = (np.ones(dims, dtype) if "mask" in name.lower()
                               else _draw(rng, dims, dtype, bounds.get(name)))
            outs = sess.run(None, feeds)
            got.append([np.shape(o) for o in outs])
            if any(len(s) and s[0] == rows for s in got[-1]):
                continue
            raise ExportError(
                f"the model's output '{traced.outputs[0]}' has "
                f"{got[-1][0][0] if got[-1][0] else 'no'} rows for a batch of {rows} (axis 0 of "
                "its inputs): the runtime reads axis 0 of every input and output as the batch, "
                f"one row per sample; {_way_out(traced)}")
    except ExportError:
        raise
    except Exception:  # noqa: BLE001 - not known to be wrong
        return


def _way_out(traced: Traced) -> str:
    """What to do, by what the file declares: every input's axis 0 fixed and nothing else
    symbolic is a file saved at a fixed batch (torch.onnx.export without dynamic_axes, where a
    reshape keeps ``x.shape[0]`` as a number: a session 50 probe was told to reshape to
    [N, -1], which its model did); a symbolic axis past axis 0 a sequence-first one."""
    from .shape_fold import declared_input_dims

    onnx_file = traced.origin is not None and traced.origin[0] == "onnx"
    dims = declared_input_dims(traced.origin[1]) if onnx_file else []
    if dims and all(d and None not in d for d in dims):
        return (f"the file fixes its axis 0 at {dims[0][0]}: export it again batch-first with "
                "a dynamic batch axis (torch.onnx.export dynamic_axes / dynamic_shapes)")
    return ("export a model whose outputs keep it (a sequence-first one: transpose its input "
            "and output inside the model; a reshape to a fixed number of rows: reshape to "
            "[N, -1] instead)")


def mixes_rows(traced: Traced, shapes: Shapes, bounds: dict[str, int], dynamic_batch,
               notes: list[str] | None = None, params: list[str] | None = None) -> bool:
    """True where another row's output changes when row 0's inputs do (False where the check
    cannot run: an input it cannot draw, an output that is not finite, a model onnxruntime
    cannot run here, a model whose outputs differ between two runs of the same rows: random
    ops); with ``notes``, says so there. Checked at the initial weights and at the trainable
    ``params`` moved as training could move them (a mixing branch behind a gate that starts at
    0 mixes nothing at first: padding.py's reason for the same)."""
    mixes = any(_mixes(traced, shapes, bounds, dynamic_batch, moved)
                for moved in (None, params) if moved is None or moved)
    if mixes and notes is not None:
        notes.append("note: the model's output for a row depends on the other rows of its "
                     "batch (a statistic or attention over the batch axis): it trains on whole "
                     "batches only (no --micro-batch below --batch; a --budget must hold the "
                     "whole batch), and its scores depend on how many rows are scored together")
    return mixes


def _mixes(traced: Traced, shapes: Shapes, bounds: dict[str, int], dynamic_batch,
           moved: list[str] | None) -> bool:
    from .any_length import ort_session

    rng = np.random.default_rng(0)
    feeds_a, feeds_b = {}, {}
    for name in traced.inputs:
        dtype = _NP.get(shapes.dtype.get(name))
        dims = [_ROWS, *shapes.of(name)[1:]]
        if dtype is None or not all(isinstance(d, int) and d > 0 for d in dims):
            return False
        if "mask" in name.lower():  # an attention mask: every position real in both runs
            feeds_a[name] = feeds_b[name] = np.ones(dims, dtype)
            continue
        a = _draw(rng, dims, dtype, bounds.get(name))
        b = a.copy()
        b[0] = _draw(rng, dims, dtype, bounds.get(name))[0]
        feeds_a[name], feeds_b[name] = a, b
    floats = any(np.issubdtype(v.dtype, np.floating) for v in feeds_a.values())
    try:
        sess = ort_session(_model(traced, dynamic_batch, moved))
        # at smaller scales too: an attention over the batch saturates on large inputs (each
        # row's softmax all on itself) and mixed nothing measurable at the first
        for scale in (1.0, 0.1, 0.01) if floats else (1.0,):
            a, b = (_scaled(f, scale) for f in (feeds_a, feeds_b))
            out_a, again, out_b = (sess.run(None, f) for f in (a, a, b))
            if _differ(out_a, again):  # random ops: the comparison tells nothing (a review)
                return False
            if _differ(out_a, out_b):
                return True
    except Exception:  # noqa: BLE001 - a model onnxruntime cannot run here: not known to mix
        return False
    return False


def _scaled(feeds: dict, scale: float) -> dict:
    return {k: (v * v.dtype.type(scale) if np.issubdtype(v.dtype, np.floating) and
                "mask" not in k.lower() else v) for k, v in feeds.items()}


def _differ(out_a, out_b) -> bool:
    """Whether rows 1.. of the two runs' outputs (those with the batch axis first) differ."""
    for x, y in zip(out_a, out_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.ndim == 0 or x.shape[0] != _ROWS or x.shape != y.shape:
            continue  # (no batch axis to compare along)
        x, y = x[1:], y[1:]
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            return False  # (not known to mix)
        if float(np.abs(x - y).max(initial=0.0)) > 1e-4 * (1.0 + float(np.abs(x).max(
                initial=0.0))):
            return True
    return False
