"""The padding mask of a token model exported without a tokenizer.

With ``--tokenizer`` the exporter learns which input is the padding mask from the tokenizer and
checks on its encodings that the model ignores its padding (export/any_length.py); its INSTANT
layers over the token axis then project the real tokens only (docs/method.md "Padded
positions"). A user who trains a text model from arrays (token ids and an attention mask in an
``.npz``) has the same padding, and without the mask a reduced-rank projection spends its rank
on padded positions and the lifted input gradient spreads into them.

``padding_mask`` finds the input: ``[N, L]``, integer, boolean or float, named ``*mask*``, next
to inputs that all carry the same token axis (``[N, L, ...]``). It keeps it only where the model
demonstrably ignores the positions it marks 0: on random tokens, two runs that differ only at
those positions give the same outputs (right padding of several lengths and one scattered
pattern). A model that reads its padding, reads the mask the other way round (1 = padding), or
that onnxruntime cannot run here keeps no mask: exact gradients at full rank either way, and
the mask only changes what a reduced rank keeps.
"""

from __future__ import annotations

import copy

import numpy as np
from onnx import TensorProto

from .graph import Shapes
from .tracing import Traced

__all__ = ["fixed_length", "layers_ignoring_padding", "mask_marks_padding", "padding_mask",
           "pinned_lengths", "tokenizer_mask_inverted"]

_NP = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_,
       TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
       TensorProto.FLOAT16: np.float16}
_ROWS = 4


def padding_mask(traced: Traced, shapes: Shapes, bounds: dict[str, int],
                 dynamic_batch, params: list[str] | None = None) -> tuple[str, int] | None:
    """(mask input, token length L) where the check above holds, else None.

    ``bounds``: rows of the embedding table each integer input indexes (exporter's
    ``_index_bounds``); ``dynamic_batch`` the exporter's step that frees the batch axis;
    ``params``: the trainable tensors, at whose moved values the check holds too (session 29
    probe: a zero-initialised gate hid a token shift from the check at the initial weights,
    and once it trained INSTANT dropped the padded rows' share of a weight gradient)."""
    mask, length = _candidate(traced, shapes)
    if mask is None or not _ignores(traced, shapes, bounds, dynamic_batch, mask, length):
        return None
    if params and not _ignores(traced, shapes, bounds, dynamic_batch, mask, length,
                               moved_params=params):
        return None
    return mask, length


def mask_marks_padding(traced: Traced, shapes: Shapes, bounds: dict[str, int],
                       dynamic_batch, per_token: bool = True) -> str | None:
    """The ``*mask*`` input where it demonstrably marks the padding with 1 (torch's
    ``src_key_padding_mask``): the outputs (``per_token``: of a per-token output ``[N, L, C]``,
    at the positions it marks 0) ignore the tokens it marks 1, and not the other way round.
    ``--pool mean`` then averages where it is 0; elsewhere (the attention-mask convention, or
    nothing checkable) where it is 1."""
    mask, length = _candidate(traced, shapes)
    if mask is None:
        return None
    for ones_real in (True, False):
        if _ignores(traced, shapes, bounds, dynamic_batch, mask, length, ones_real=ones_real,
                    per_token=per_token):
            return None if ones_real else mask
    return None


def tokenizer_mask_inverted(traced: Traced, shapes: Shapes, bounds: dict[str, int],
                            dynamic_batch) -> str | None:
    """The ``*mask*`` input that a tokenizer would fill, where it marks the padding with 1
    (:func:`mask_marks_padding` on the model's first output). A tokenizer's ``attention_mask``
    has 1 on real tokens: fed as it is, such a model attends to the padding alone (session 26
    probe: losses and evaluations silently wrong)."""
    mask, length = _candidate(traced, shapes)
    if mask is None or not traced.outputs:
        return None
    out = shapes.of(traced.outputs[0])
    return mask_marks_padding(traced, shapes, bounds, dynamic_batch,
                              per_token=len(out) >= 3 and out[1] == length)


def _ignores(traced: Traced, shapes: Shapes, bounds: dict[str, int], dynamic_batch, mask: str,
             length: int, ones_real: bool = True, per_token: bool = False,
             moved_params: list[str] | None = None) -> bool:
    """Whether two runs that differ only at the positions ``mask`` marks as padding (0 where
    ``ones_real``, else 1) give the same outputs (``per_token``: the same outputs at the real
    positions of a [N, L, ...] output); with ``moved_params``, at those trainable tensors
    moved as training could move them (any_length.moved)."""
    model = _model(traced, dynamic_batch, moved_params)
    real = _pattern(length)
    feeds = _feeds(traced, shapes, bounds, mask, length, ones_real)
    if feeds is None:
        return False
    feeds_a, feeds_b = feeds
    try:
        from .any_length import ort_session

        sess = ort_session(model)
        out_a = sess.run(None, feeds_a)
        out_b = sess.run(None, feeds_b)
    except Exception:  # noqa: BLE001 - a model onnxruntime cannot run here keeps no mask
        return False
    return _same(out_a, out_b, real if per_token else None)


def _model(traced: Traced, dynamic_batch, moved_params: list[str] | None = None):
    """A copy of the traced model with a free batch axis (``moved_params``: those trainable
    tensors moved as training could move them, any_length.moved)."""
    model = copy.deepcopy(traced.model)
    dynamic_batch(model, traced.inputs + traced.outputs)
    if moved_params:
        from onnx import numpy_helper

        from .any_length import moved

        inits = {t.name: t for t in model.graph.initializer if t.name in set(moved_params)}
        new = moved({k: numpy_helper.to_array(t) for k, t in inits.items()},
                    traced.padding_rows)
        for k, t in inits.items():
            t.CopyFrom(numpy_helper.from_array(new[k], k))
    return model


def _feeds(traced: Traced, shapes: Shapes, bounds: dict[str, int], mask: str, length: int,
           ones_real: bool = True) -> tuple[dict, dict] | None:
    """Two feeds of random tokens with the mask of :func:`_pattern` that differ only at the
    padded positions (None: an input of a dtype the check cannot draw)."""
    rng = np.random.default_rng(0)
    real = _pattern(length)
    feeds_a, feeds_b = {}, {}
    for name in traced.inputs:
        dims = [_ROWS, *shapes.of(name)[1:]]
        dtype = _NP.get(shapes.dtype.get(name))
        if dtype is None:
            return None
        if name == mask:
            feeds_a[name] = feeds_b[name] = (real if ones_real else ~real).astype(dtype)
            continue
        a, b = _draw(rng, dims, dtype, bounds.get(name)), _draw(rng, dims, dtype, bounds.get(name))
        pad = ~real.reshape(_ROWS, length, *([1] * (len(dims) - 2)))
        b = np.where(pad, b, a)  # the same tokens where the mask says real, others elsewhere
        feeds_a[name], feeds_b[name] = a, b
    return feeds_a, feeds_b


def _same(out_a, out_b, real: np.ndarray | None = None) -> bool:
    """Whether two runs' outputs agree (``real``: at those positions of [N, L, ...] outputs)."""
    for x, y in zip(out_a, out_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if real is not None:
            if x.shape[:2] != real.shape:
                return False
            x, y = x[real], y[real]
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            return False
        if float(np.abs(x - y).max(initial=0.0)) > 1e-4 * (1.0 + float(np.abs(x).max(initial=0.0))):
            return False
    return True


def mask_checked(traced: Traced, shapes: Shapes, bounds: dict[str, int], dynamic_batch,
                 found: tuple[str, int], layers, params: list[str] | None, forward,
                 notes: list[str] | None) -> int:
    """Give the padding mask ``found`` (:func:`padding_mask`) to the layers over its tokens
    whose padded rows reach no output (:func:`layers_ignoring_padding`), with a note on what
    was and was not masked. Returns how many layers got it."""
    from .layers import mask_padding, over_tokens

    mask, length = found
    keep = layers_ignoring_padding(traced, shapes, bounds, dynamic_batch, mask, length, layers,
                                   params)
    count = mask_padding([ly for ly in layers if ly.name in keep], mask, length, forward)
    if notes is not None and count:
        notes.append(f"note: input '{mask}' marks the padding (checked: the output ignores the "
                     f"tokens where it is 0, and the outputs of {count} INSTANT layer(s) over "
                     f"its {length} tokens there); those project the real tokens only")
    left = [ly.name for ly in over_tokens(layers, length) if ly.name not in keep]
    if notes is not None and left:
        notes.append(f"note: input '{mask}' marks the padding, but the outputs of "
                     f"{len(left)} INSTANT layer(s) at padded positions reach the model's "
                     f"outputs ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}: e.g. "
                     "attention without a key mask reads them); they project every position")
    return count


def layers_ignoring_padding(traced: Traced, shapes: Shapes, bounds: dict[str, int],
                            dynamic_batch, mask: str, length: int, layers,
                            params: list[str] | None = None) -> set[str]:
    """The names of ``layers`` (over the token axis) whose outputs at the positions ``mask``
    marks 0 reach none of the model's outputs, at the initial and at moved trainable tensors:
    for those, dropping the padded rows from the weight gradient and the input gradient is
    exact. The model-level check (:func:`padding_mask`) varies the tokens at padded positions
    only; a session-30 probe's model zeroed its padded embeddings and added a position
    parameter, so the padded positions held the same values whatever the tokens, and its
    attention (no key mask) read them: it passed, and INSTANT dropped their share of the
    q/k/v weight gradient (102 % error at full rank). Each layer's output gets noise at the
    padded positions (an Add on a graph input) and the outputs must not move."""
    from .layers import over_tokens

    cand = over_tokens(layers, length)
    if not cand:
        return set()
    feeds = _feeds(traced, shapes, bounds, mask, length)
    if feeds is None:
        return set()
    pad = ~_pattern(length)
    keep = {ly.name for ly in cand}
    for moved_params in [None] + ([params] if params else []):
        if not keep:
            break
        model = _model(traced, dynamic_batch, moved_params)
        deltas = _add_deltas(model, [ly for ly in cand if ly.name in keep])
        keep &= {name for name, _ in deltas.values()}
        try:
            from .any_length import ort_session

            sess = ort_session(model)
            zero = {d: np.zeros((_ROWS, length, cy), np.float32) for d, (_, cy) in deltas.items()}
            base = sess.run(None, {**feeds[0], **zero})
            rng = np.random.default_rng(1)
            for d, (name, cy) in deltas.items():
                noise = rng.standard_normal((_ROWS, length, cy)).astype(np.float32)
                got = sess.run(None, {**feeds[0], **zero, d: noise * pad[..., None]})
                if not _same(base, got):
                    keep.discard(name)
        except Exception:  # noqa: BLE001 - a model onnxruntime cannot run so: nothing checked
            return set()
    return keep


def _add_deltas(model, layers) -> dict[str, tuple[str, int]]:
    """Route each layer's output ``y`` through ``y + delta`` (a new float input [N, L, Cy]);
    returns {delta input: (layer name, Cy)}. A layer whose output is a graph output, or is not
    produced by a node here, gets none (its padded rows are then not shown to be ignored)."""
    from onnx import helper

    g = model.graph
    outputs = {o.name for o in g.output}
    out = {}
    for k, ly in enumerate(layers):
        at = next((i for i, n in enumerate(g.node) if ly.y in n.output), None)
        if at is None or ly.y in outputs:
            continue
        delta, moved_y = f"__pad_delta_{k}", f"{ly.y}__pad_delta_{k}"
        for n in g.node:
            for j, name in enumerate(n.input):
                if name == ly.y:
                    n.input[j] = moved_y
        g.node.insert(at + 1, helper.make_node("Add", [ly.y, delta], [moved_y],
                                               name=f"{delta}_add"))
        g.input.append(helper.make_tensor_value_info(delta, TensorProto.FLOAT, None))
        out[delta] = (ly.name, ly.cy)
    return out


def pinned_lengths(traced: Traced, shapes: Shapes, layers, found: tuple[str, int] | None,
                   dynamic_batch) -> dict[str, int]:
    """Inputs whose symbolic token axis the training graphs take at one length only, with that
    length, for the manifest (data of another length is then one clear error instead of
    onnxruntime's): those sharing the padding mask's axis (``found``, from
    :func:`padding_mask`), else token ids ``[N, seq]`` whose layers run at one length T where
    the model runs at T and fails at another (:func:`fixed_length`)."""
    if found is not None:
        symbol = shapes.of(found[0])[1]
        if isinstance(symbol, str):
            return {n: found[1] for n in traced.inputs
                    if len(shapes.of(n)) > 1 and shapes.of(n)[1] == symbol}
    ts = {ly.tokens for ly in layers if ly.rank3 and not ly.flat and not ly.seq_first}
    free = [n for n in traced.inputs if len(shapes.of(n)) == 2 and isinstance(shapes.of(n)[1], str)]
    if len(ts) != 1 or not free or any(np.dtype(_NP.get(shapes.dtype.get(n), np.float32)).kind
                                       not in "iu" for n in free):
        return {}
    t = next(iter(ts))
    return {n: t for n in free} if fixed_length(traced, shapes, free, t, dynamic_batch) else {}


def fixed_length(traced: Traced, shapes: Shapes, inputs: list[str], length: int,
                 dynamic_batch) -> bool:
    """True where the model runs with axis 1 of ``inputs`` (declared symbolic) at ``length``
    and fails at another: a graph fixed inside to that many tokens (position embeddings of
    ``length`` rows), whose bundle must say so in its manifest. False where it runs at both
    (it takes any length), or where it cannot be run here (nothing is claimed)."""
    model = copy.deepcopy(traced.model)
    dynamic_batch(model, traced.inputs + traced.outputs)
    try:
        from .any_length import ort_session

        sess = ort_session(model)
    except Exception:  # noqa: BLE001 - a model onnxruntime cannot run here: no claim
        return False

    def runs(n: int) -> bool:
        feeds = {}
        for name in traced.inputs:
            dims = [1, *shapes.of(name)[1:]]
            if name in inputs:
                dims[1] = n
            dtype = _NP.get(shapes.dtype.get(name))
            if dtype is None or not all(isinstance(d, int) for d in dims):
                raise ValueError(name)
            feeds[name] = np.ones(dims, dtype)  # token id 1, mask 1: valid for any table
        try:
            sess.run(None, feeds)
        except Exception:  # noqa: BLE001 - onnxruntime raises several types
            return False
        return True

    try:
        return runs(length) and not runs(max(1, length // 2) if length > 1 else 2)
    except ValueError:  # an input of unknown dtype or other free axes: no claim
        return False


def _candidate(traced: Traced, shapes: Shapes) -> tuple[str | None, int]:
    """The ``*mask*`` input [N, L] (L static, ≥ 2) when every other input is [N, L, ...] with
    static dims (the check feeds them random tokens)."""
    for name in traced.inputs:
        dims = shapes.of(name)
        if "mask" in name.lower() and len(dims) == 2 and isinstance(dims[1], int) \
                and dims[1] >= 2 and shapes.dtype.get(name) in _NP:
            length = dims[1]
            others = [shapes.of(n) for n in traced.inputs if n != name]
            if others and all(len(d) >= 2 and d[1] == length
                              and all(isinstance(k, int) for k in d[1:]) for d in others):
                return name, length
            return None, 0
    return None, 0


def _pattern(length: int) -> np.ndarray:
    """[rows, L] booleans, True at real tokens: right padding at three lengths (one real token,
    about half, all but one) and one scattered row; every row has a real and a padded place."""
    real = np.zeros((_ROWS, length), bool)
    for row, keep in enumerate((1, max(1, length // 2), length - 1)):
        real[row, :keep] = True
    real[3, ::2] = True
    real[3, -1] = False
    return real


def _draw(rng: np.random.Generator, dims: list[int], dtype, bound: int | None) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, max(1, bound or 2), size=dims).astype(dtype)
    if dtype == np.bool_:
        return rng.random(dims) < 0.5
    return rng.standard_normal(dims).astype(dtype)
