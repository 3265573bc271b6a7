"""An inference graph for text models that takes any sequence length up to the trained one.

The training graphs need a fixed token length L (token-axis INSTANT bases are L×L, the autodiff
rules read static shapes), so every training batch is padded to L. Inference does not: where
the model masks its padding (attention keys masked, pooling over the valid tokens), dropping a
batch's trailing padding changes no output, and short texts cost a fraction of L. On Rotten
Tomatoes (mean 27 of 64 tokens) evaluation in length-sorted micro-batches does 43 % of the
padded work.

``any_length_infer`` traces (PyTorch) or loads (ONNX file with a symbolic length) the model a
second time with its token axis free, turns it into an inference graph exactly as the fixed one
(trainable parameters as inputs, embedding lookups split), and keeps it only if it gives the
fixed graph's outputs on padded text: the tokenizer's own encodings of a few sentences of
different lengths, run once padded to L through the fixed graph and once with the padding
dropped through the free one. A model whose output depends on its padding (e.g. pooling over
every position) keeps the fixed-length graph, and so does anything that fails along the way.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from contract import TextSpec

from .tracing import Traced, any_length

__all__ = ["any_length_infer"]

# Renamed frozen tensors of the second trace that differ from a same-named one of the first.
PREFIX = "any_length/"
_SENTENCES = [
    "fine.",
    "a quiet , moving film about two old friends .",
    "the plot wanders , the jokes land about half the time , and the ending arrives long "
    "after you stopped caring , yet the lead performance keeps it watchable .",
    "not bad at all",
]


def any_length_infer(traced: Traced, text: TextSpec, params: list[str], lookups: dict,
                     head: tuple[int, str] | None, tokenizer: Path, weights,
                     split_lookups, params_as_inputs, dynamic_batch) -> onnx.ModelProto | None:
    """The inference graph with a free token axis, or None (keep the fixed-length one).

    ``traced`` is the fixed-length model (head added); ``lookups`` what splitting its lookups
    gave; the three callables are the exporter's own graph steps, applied here the same way.
    """
    seq = text.token_inputs
    if text.mask_input is None or sorted(seq) != sorted(traced.inputs):
        return None  # without a mask the model cannot tell padding; other inputs stay fixed
    free = any_length(traced, seq)
    if free is None or free.inputs != traced.inputs:
        return None
    if head is not None:
        from .heads import add_head

        try:
            add_head(free, *head)
        except Exception:  # noqa: BLE001
            return None
    if free.outputs != traced.outputs:
        return None
    fixed_inits = {t.name: t for t in traced.model.graph.initializer}
    free_inits = {t.name: t for t in free.model.graph.initializer}
    if any(p not in free_inits for p in params):
        return None
    for p in params:  # a new head is drawn at random: use the same values as the fixed graph
        free_inits[p].CopyFrom(fixed_inits[p])
    fixed_m, free_m = copy.deepcopy(traced.model), copy.deepcopy(free.model)
    dynamic_batch(fixed_m, traced.inputs + traced.outputs)  # the example may fix the batch
    dynamic_batch(free_m, free.inputs + free.outputs)
    if not _same_outputs(fixed_m, free_m, traced.outputs[0], text, tokenizer):
        return None
    trained = moved({p: numpy_helper.to_array(fixed_inits[p]) for p in params},
                    traced.padding_rows)
    for m in (fixed_m, free_m):  # the same check at weights training could reach
        for t in m.graph.initializer:
            if t.name in trained:
                t.CopyFrom(numpy_helper.from_array(trained[t.name], t.name))
    if not _same_outputs(fixed_m, free_m, traced.outputs[0], text, tokenizer):
        return None
    model = copy.deepcopy(free.model)
    rename_differing(model, fixed_inits)
    dynamic_batch(model, free.inputs + free.outputs)
    params_as_inputs(model, params)
    if split_lookups(model, set(free.inputs), weights) != lookups:
        return None
    return model


def rename_differing(model: onnx.ModelProto, fixed: dict[str, onnx.TensorProto],
                     prefix: str = PREFIX) -> None:
    """Frozen tensors are stored once by name (``weights.bin``): a tensor of this graph whose
    name the fixed graphs use for other values (a constant the trace folded differently), or
    do not use, gets a name of its own (``prefix`` + name)."""
    rename = {}
    for t in model.graph.initializer:
        other = fixed.get(t.name)
        if other is None or not np.array_equal(numpy_helper.to_array(other),
                                               numpy_helper.to_array(t)):
            rename[t.name] = prefix + t.name
    for t in model.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _encodings(text: TextSpec, tokenizer: Path) -> dict[str, np.ndarray] | None:
    """The tokenizer's encodings of a few sentences, padded to the trained length."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
    except Exception:  # noqa: BLE001
        return None
    pad = tok.token_to_id("[PAD]")
    tok.no_padding()
    tok.enable_truncation(max_length=text.seq_len)
    n, length = len(_SENTENCES), text.seq_len
    ids = np.full((n, length), 0 if pad is None else pad, np.int64)
    types = np.zeros((n, length), np.int64)
    mask = np.zeros((n, length), np.int64)
    for i, enc in enumerate(tok.encode_batch(_SENTENCES)):
        k = min(len(enc.ids), length - 1)  # keep at least one padded position
        ids[i, :k], types[i, :k], mask[i, :k] = enc.ids[:k], enc.type_ids[:k], 1
    out = {text.ids_input: ids, text.mask_input: mask}
    if text.type_ids_input:
        out[text.type_ids_input] = types
    return out


def _same_outputs(fixed: onnx.ModelProto, free: onnx.ModelProto, output: str, text: TextSpec,
                  tokenizer: Path) -> bool:
    """Whether the free graph on unpadded text gives the fixed graph's outputs on padded text."""
    feeds = _encodings(text, tokenizer)
    if feeds is None:
        return False
    try:

        def run(sess, x: dict[str, np.ndarray]) -> np.ndarray:
            want = {i.name: np.dtype(_np(i.type)) for i in sess.get_inputs()}
            return sess.run([output],
                            {k: v.astype(want[k]) for k, v in x.items()})[0]

        padded = run(ort_session(fixed), feeds)
        keep = int(feeds[text.mask_input].sum(1).max())
        free_sess = ort_session(free)
        trimmed = run(free_sess, {k: np.ascontiguousarray(v[:, :keep]) for k, v in feeds.items()})
        # the model must really take other lengths: a second, shorter one
        short = {k: np.ascontiguousarray(v[:1, :max(2, keep // 3)]) for k, v in feeds.items()}
        run(free_sess, short)
    except Exception:  # noqa: BLE001 - a graph onnxruntime cannot run keeps the fixed one
        return False
    scale = 1.0 + float(np.abs(padded).max())
    return padded.shape == trimmed.shape and float(np.abs(padded - trimmed).max()) <= 1e-4 * scale


def moved(values: dict[str, np.ndarray], keep_rows: dict[str, int] | None = None,
          seed: int = 0) -> dict[str, np.ndarray]:
    """``values`` (trainable parameters) moved at random by their own spread (at least 0.1):
    the padding checks also run here, as training will move the weights. A model that ignores
    its padding only at its initial weights (a zero-initialised gate on an unmasked mean)
    passes at those and fails here. ``keep_rows``: a lookup table's padding row (torch's
    ``padding_idx``), which training never moves (its gradient is zero), stays."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in values.items():
        if np.issubdtype(v.dtype, np.floating):
            spread = max(float(np.std(v, dtype=np.float64)) if v.size else 0.0, 0.1)
            new = (v + spread * rng.standard_normal(v.shape)).astype(v.dtype)
            row = (keep_rows or {}).get(k)
            if row is not None and v.ndim >= 1 and -v.shape[0] <= row < v.shape[0]:
                new[row] = v[row]
            v = new
        out[k] = v
    return out


def ort_session(model: onnx.ModelProto):
    """A quiet CPU onnxruntime session of ``model`` (the exporter's checks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failing check run is an answer, not an error
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _np(type_str: str) -> str:
    return {"tensor(int64)": "int64", "tensor(int32)": "int32"}.get(type_str, "float32")
