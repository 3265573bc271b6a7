"""A new classifier on a model's output (``export --head CLASSES --pool mean|cls|none``), and
what the runtime needs to feed the model raw data (text: the tokenizer; images: size and
normalisation), recorded in the manifest.

The head is appended to the ONNX graph as standard ops: pooling over the token axis (mean over
the tokens the ``attention_mask`` input marks, or over all tokens when there is no mask; the
first token for ``cls``), then ``Gemm`` with a new weight and bias, initialised as PyTorch's
``nn.Linear`` (uniform ±1/√C). The head is always trainable and never compressed.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract import ImageSpec, TextSpec
from contract.manifest import IMAGE_STD_MIN, MAX_NUMBER

from .graph import ExportError, Shapes
from .tracing import Traced

__all__ = ["POOLS", "add_head", "image_spec", "text_spec"]

POOLS = ("mean", "cls", "none")


def _free_prefix(g: onnx.GraphProto) -> str:
    """``head``, or ``new_head``, ``new_head2``, ... where the model has a ``head`` of its own
    (timm's classifiers are named so): the new tensors and nodes never take a name it uses."""
    used = {t.name for t in g.initializer} | {i.name for i in g.input} | {
        x for n in g.node for x in (*n.output, n.name)}
    taken = {u.lstrip("/").replace("/", ".").split(".")[0] for u in used}
    return next(p for p in ("head", "new_head", *(f"new_head{i}" for i in range(2, 10**6)))
                if p not in taken)


def _mask_input(traced: Traced, shapes: Shapes) -> str | None:
    for name in traced.inputs:
        dt = shapes.dtype.get(name)
        if "mask" in name.lower() and dt in (TensorProto.INT64, TensorProto.INT32,
                                             TensorProto.FLOAT, TensorProto.BOOL):
            return name
    return None


def add_head(traced: Traced, classes: int, pool: str, padding_mask: str | None = None,
             seed: int = 0) -> str:
    """Append pooling and a ``classes``-way linear classifier to the traced model's output;
    returns the new output's name (the graph now ends in it). ``padding_mask``: an input that
    marks the padding with 1 (export/padding.py ``mask_marks_padding``); ``--pool mean`` then
    averages where it is 0, else where the ``*mask*`` input is 1.

    Raises:
        ExportError: a bad class count or pooling, or an output whose shape does not fit.
    """
    if classes < 1:  # (one output: a regressor or a binary classifier, export_bundle's check)
        raise ExportError(f"--head {classes}: a head needs at least 1 output")
    if pool not in POOLS:
        raise ExportError(f"--pool '{pool}' is unknown; choose {', '.join(POOLS)}")
    g = traced.model.graph
    out = traced.outputs[0]
    shapes = Shapes(traced.model)
    prefix = _free_prefix(g)
    dims = shapes.of(out)
    if pool == "none":
        if len(dims) != 2:
            raise ExportError(f"output '{out}' has shape {dims}; --pool none needs [N, C] "
                              "(use --pool mean or cls for a [N, L, C] output)")
        pooled = out
    else:
        if len(dims) != 3:  # (an outside probe: minilm-l6 --head 61 was told about --pool)
            default = " (the default)" if pool == "mean" else ""
            raise ExportError(
                f"output '{out}' has shape {dims}; --pool {pool}{default} needs [N, L, C] token "
                "features: " + ("an [N, C] output takes --pool none, and one that is already a "
                                f"classifier's ({dims[-1]} outputs) keeps its classes: for "
                                "another count, export a model that returns its features "
                                "(README: your own model) with --head" if len(dims) == 2 else
                                "pool a feature map to [N, C] in the model (e.g. "
                                "AdaptiveAvgPool2d(1) and flatten) and pass --pool none"))
        pooled = _pool(g, traced, shapes, out, pool, prefix, padding_mask)
    width = dims[-1]
    if not isinstance(width, int):
        raise ExportError(f"output '{out}' has a symbolic width {width}; export with static "
                          "shapes except the batch dimension")
    if classes * (width + 1) * 4 > 2**31:  # (a session 45 probe: --head 99999999999 was "out of
        raise ExportError(  # memory ... give a --budget", which export has none of)
            f"--head {classes}: a head of {classes:,} outputs over {width} features takes "
            f"{classes * (width + 1) * 4 / 1e9:,.0f} GB of weights, more than 2 GB, which no "
            "classifier's head needs; pass the number of classes")
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(width)
    w = rng.uniform(-bound, bound, (classes, width)).astype(np.float32)
    b = rng.uniform(-bound, bound, classes).astype(np.float32)
    weight, bias = f"{prefix}.weight", f"{prefix}.bias"
    g.initializer.extend([numpy_helper.from_array(w, weight), numpy_helper.from_array(b, bias)])
    logits = f"{prefix}/logits"
    g.node.append(helper.make_node("Gemm", [pooled, weight, bias], [logits],
                                   name=f"/{prefix}/Gemm", transB=1))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes]))
    traced.outputs = [logits]
    traced.torch_names[weight] = (weight, False)
    traced.torch_names[bias] = (bias, False)
    return logits


def _pool(g: onnx.GraphProto, traced: Traced, shapes: Shapes, out: str, pool: str,
          prefix: str, padding_mask: str | None) -> str:
    def const(name: str, value, dtype=np.int64) -> str:
        name = f"{prefix}/{name}"
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        output = f"{prefix}/{output}"
        g.node.append(helper.make_node(op, inputs, [output], name=f"/{output}", **attrs))
        return output

    if pool == "cls":
        return node("Gather", [out, const("zero", 0)], "cls", axis=1)
    mask = _mask_input(traced, shapes)
    if mask is None:
        return node("ReduceMean", [out], "mean", axes=[1], keepdims=0) if \
            _opset(traced) < 18 else node("ReduceMean", [out, const("axis1", [1])],
                                          "mean", keepdims=0)
    m = node("Cast", [mask], "mask_f", to=TensorProto.FLOAT)
    if mask == padding_mask:  # 1 marks the padding: average where it is 0
        m = node("Sub", [const("one", 1.0, np.float32), m], "real_f")
    m3 = node("Unsqueeze", [m, const("axis2", [2])], "mask3")
    summed = node("ReduceSum", [node("Mul", [out, m3], "masked"),
                                const("axis1s", [1])], "sum", keepdims=0)
    count = node("ReduceSum", [m3, const("axis1c", [1])], "count", keepdims=0)
    count = node("Max", [count, const("eps", [1e-9], np.float32)], "count_safe")
    return node("Div", [summed, count], "mean")


def _opset(traced: Traced) -> int:
    return next(o.version for o in traced.model.opset_import if o.domain in ("", "ai.onnx"))


def _check_tokenizer(path: Path, json_text: str, ids: str, rows: int | None,
                     first_token: bool = False) -> None:
    """The runtime must be able to read the tokenizer, and every id it can give must index the
    model's embedding table (checked here, where re-exporting is the way out, not at the
    first training step); ``first_token`` (``--pool cls``): it must pad on the right."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(json_text)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises Exception
        raise ExportError(f"--tokenizer '{path}' cannot be read by the tokenizers library "
                          f"({str(exc).splitlines()[0][:160]}); pass the tokenizer.json saved "
                          "with the model") from None
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if rows is not None and vocab > rows:
        raise ExportError(f"--tokenizer '{path}' has {vocab} tokens but the model's input "
                          f"'{ids}' indexes a table of {rows} rows (ids {rows} and up would fail "
                          "at training); pass the model's own tokenizer")
    if first_token and (tok.padding or {}).get("direction") == "left":
        raise ExportError(f"--pool cls reads each text's first position, but --tokenizer "
                          f"'{path}' pads on the left: a short text's first position is "
                          "padding; use --pool mean, or a tokenizer that pads on the right")


def text_spec(traced: Traced, shapes: Shapes, tokenizer: Path | None, out: Path,
              id_rows: dict[str, int] | None = None, first_token: bool = False
              ) -> TextSpec | None:
    """Copy the tokenizer into the bundle and record which inputs it fills (by name: ``*ids*``,
    ``*mask*``, ``*type*``; else the first integer input is the ids). ``first_token``: a new
    head pools the first position (``--pool cls``).

    Raises:
        ExportError: the file is missing, or the model has no integer [N, L] input.
    """
    if tokenizer is None:
        return None
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise ExportError(f"--tokenizer '{tokenizer}' not found (a tokenizer.json of the "
                          "Hugging Face tokenizers library)")
    ints = [n for n in traced.inputs if shapes.dtype.get(n) in (TensorProto.INT64,
                                                                TensorProto.INT32)]
    two_d = [n for n in ints if len(shapes.of(n)) == 2 and isinstance(shapes.of(n)[1], int)]
    if not two_d:
        raise ExportError("--tokenizer needs a model with integer token inputs [N, L] of a static "
                          f"length L; inputs: {', '.join(traced.inputs)} (for an ONNX file, "
                          "fix L with --input-shape 8,64:int64;8,64:int64)")
    ids = next((n for n in two_d if "ids" in n.lower() and "type" not in n.lower()), two_d[0])
    mask = next((n for n in two_d if "mask" in n.lower()), None)
    types = next((n for n in two_d if "type" in n.lower()), None)
    others = [n for n in traced.inputs if n not in (ids, mask, types)]
    typed = [n for n in others if any(k in n.lower() for k in ("ids", "mask", "type"))]
    if typed:  # named as the tokenizer's, but a float or bool mask, or not [N, L] (a reviewer)
        raise ExportError(f"--tokenizer fills integer [N, L] inputs (L fixed); input(s) "
                          f"{', '.join(typed)} are not: give the model int64 token inputs "
                          "(a bool or float mask made inside it), or leave out --tokenizer "
                          "and train from an .npz with one array per input")
    if others:  # (a probe's `valid` mask exported, then `train` refused it: text gives none)
        raise ExportError(f"--tokenizer fills the inputs named *ids* (token ids), *mask* "
                          f"(attention mask, 1 on real tokens) and *type* (token types); "
                          f"input(s) {', '.join(others)} match none: rename them (e.g. "
                          "attention_mask), or leave out --tokenizer and train from an .npz "
                          "with one array per input")
    try:
        json_text = tokenizer.read_text(encoding="utf-8")
        import json

        json.loads(json_text)
    except (OSError, ValueError) as exc:
        raise ExportError(f"--tokenizer '{tokenizer}' is not a tokenizer.json "
                          f"({type(exc).__name__})") from None
    _check_tokenizer(tokenizer, json_text, ids, (id_rows or {}).get(ids), first_token)
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    return TextSpec("tokenizer.json", int(shapes.of(ids)[1]), ids, mask, types)


def image_spec(traced: Traced, shapes: Shapes, mean: list[float] | None,
               std: list[float] | None) -> ImageSpec | None:
    """For a model with one float [N, C, H, W] input (C = 1 or 3), or [N, H, W] (grey): the
    size and normalisation the runtime applies to image files (pixels / 255, resized,
    ``(x - mean) / std``). ``--image-mean``/``--image-std`` for any other model are an error."""
    dims = shapes.of(traced.inputs[0]) if len(traced.inputs) == 1 else []
    name = traced.inputs[0] if traced.inputs else ""
    if len(dims) == 3 and (mean is not None or std is not None  # [N, H, W]: one grey channel
                           or not _read_as_sequence(traced, name, shapes)):
        dims = [dims[0], 1, *dims[1:]]
    if (len(dims) != 4 or shapes.dtype.get(name) != TensorProto.FLOAT
            or not all(isinstance(d, int) for d in dims[1:]) or dims[1] not in (1, 3)):
        if mean is not None or std is not None:
            raise ExportError("--image-mean/--image-std apply to a model whose one input is a "
                              "float image, [N, 1 or 3, H, W] or [N, H, W] with a fixed size; "
                              "this model has none: leave them out")
        return None
    c = int(dims[1])
    for flag, vals, positive in (("--image-mean", mean, False), ("--image-std", std, True)):
        if vals is None:
            continue
        if len(vals) not in (1, c):
            raise ExportError(f"{flag} gives {len(vals)} values; the model's image input has {c} "
                              "channel(s): give 1 or one per channel")
        lo = IMAGE_STD_MIN if positive else -MAX_NUMBER  # (the manifest's bound: 2**53)
        if not all(math.isfinite(v) and lo <= v <= MAX_NUMBER for v in vals):
            raise ExportError(f"{flag} {','.join(map(str, vals))} is out of range: values must be "
                              + (f"positive numbers from {lo:g} to 2**53 (1/std scales every "
                                 "pixel)" if positive else "finite numbers from -2**53 to 2**53"))
    return ImageSpec(name, c, int(dims[2]), int(dims[3]), list(mean or [0.0]),
                     list(std or [1.0]))


def _read_as_sequence(traced: Traced, name: str, shapes: Shapes) -> bool:
    """Whether the model reads its [N, A, B] input as A channels of a sequence: a Conv1d takes it
    directly (session 39 probe: a Conv1d sensor model got image preprocessing from
    export-model). A Linear, a norm or a recurrent layer over its rows may be reading an image
    row by row (an LSTM over MNIST rows): those keep the image input, as --image-mean or
    --image-std given does for any model."""
    return any(name in node.input and node.op_type == "Conv" and len(node.input) > 1
               and len(shapes.of(node.input[1])) == 3 for node in traced.model.graph.node)
