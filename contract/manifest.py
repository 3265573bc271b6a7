"""The bundle manifest: one typed schema, written by ``export/`` and read by ``runtime/``.

A bundle is a folder of plain files listed in ``manifest.json`` with their size and SHA-256. The
runtime treats a bundle as untrusted data: :func:`read_manifest` validates every field's type and
range once, when the bundle is opened, and every file name the manifest uses must be a plain name
inside the bundle folder that is listed in ``files`` (see ``contract/files.py`` for how files are
then opened and checked). The format version lives here and only here.

Why one module (~590 lines): the document types, their ranges, the cross-field rules and the
reading that enforces them (numbers bounded before any field is converted) are one contract that
the exporter writes and the runtime trusts; split, a rule could be added on one side only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import names
from .errors import ManifestError
from .schema import check, dump, load

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGE_STD_MIN",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_VALUES",
    "FileEntry",
    "GraphFiles",
    "GraphIO",
    "ImageSpec",
    "InstantSettings",
    "InstantSpec",
    "LayerInfo",
    "LossSpec",
    "Lookup",
    "Manifest",
    "ParamSpec",
    "PrefixSpec",
    "TensorSpec",
    "TextSpec",
    "WeightEntry",
    "manifest_json",
    "read_manifest",
]

FORMAT = "instant-runtime-bundle"
FORMAT_VERSION = 5
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few hundred KB; refuse absurd files up front
MAX_MANIFEST_VALUES = 1_000_000
MAX_ROWS_2D = 1 << 16  # rows a sample of a 2-D Linear input ([L·N, C]: L positions)  # (commas and brackets): ~60 MB parsed at most
# every number in a manifest (byte counts and offsets, FLOPs included) lies within +-MAX_NUMBER:
# exact as a float64, so no arithmetic on it overflows or rounds; tensor dimensions and counts
# are at most MAX_DIM, and shapes have at most MAX_RANK axes
MAX_NUMBER = 1 << 53
MAX_DIM = (1 << 31) - 1
MAX_RANK = 32
_MAX_MESSAGE = 600  # a longer error message is cut in the middle (no value is echoed in full)

DType = Literal["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"]
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "int64": 8, "int32": 4, "int8": 1,
            "uint8": 1, "bool": 1}
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _bad_dims(shape: list[int | str], allow_symbolic: bool = True) -> str | None:
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} axes, more than {MAX_RANK}"
    for i, d in enumerate(shape):
        if isinstance(d, int) and not 1 <= d <= MAX_DIM:
            return f"shape[{i}] must be from 1 to {MAX_DIM}, got {d}"
        if isinstance(d, str) and (not allow_symbolic or not d):
            return f"shape[{i}] must be a positive integer, got {d!r}"
    return None


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or the labels: name, shape (ints, or a symbolic name such as ``N``), dtype."""

    name: str = field(metadata=check(nonempty=True))
    shape: list[int | str] = field(metadata=check(nonempty=True))
    dtype: DType = "float32"
    # integer ids that index an embedding table of this many rows (0: not an index): the data
    # is checked to hold 0 .. index_bound - 1 (onnxruntime's Gather takes a negative id as
    # counting from the end)
    index_bound: int = field(default=0, metadata=check(ge=0, le=MAX_DIM))

    def validate(self) -> tuple[str, str] | None:
        bad = _bad_dims(self.shape)
        return ("shape", bad) if bad else None

    @property
    def sample_shape(self) -> list[int | str]:
        return self.shape[1:]


@dataclass(frozen=True)
class LossSpec:
    # bce: binary cross-entropy on logits, a target in [0, 1] per output element (multi-label)
    kind: Literal["cross_entropy", "mse", "bce"]
    labels: TensorSpec
    num_classes: int | None = field(default=None, metadata=check(ge=2, le=1 << 24))
    # the output's class axis is 1 ([N, classes, d1, ...]: torch's dense-prediction layout,
    # labels [N, d1, ...]) instead of the last one ([N, classes] or [N, L, classes])
    classes_first: bool = False
    # bce on a model whose output is a Sigmoid's probabilities: the loss reads the Sigmoid's
    # input (the logits) and an output element says yes at >= 0.5 (at a logit > 0 otherwise);
    # cross_entropy on a Softmax's probabilities: the loss reads its input, and a held-out
    # loss is -log p[y] of the output (a second softmax over probabilities: a session 44 probe)
    probabilities: bool = field(default=False, metadata={"omit_default": True})

    def validate(self) -> tuple[str, str] | None:
        if self.probabilities and self.kind == "mse":
            return "probabilities", "only a bce or cross_entropy loss reads a Sigmoid's or " \
                "Softmax's input"
        if self.classes_first and (self.kind != "cross_entropy" or len(self.labels.shape) < 2):
            return "classes_first", "a class axis 1 needs cross_entropy labels [N, d1, ...]"
        if self.kind == "cross_entropy" and self.num_classes is None:
            return "num_classes", "cross_entropy needs num_classes"
        if self.kind == "cross_entropy" and self.labels.dtype != "int64":
            return "labels.dtype", f"cross_entropy labels are int64, got {self.labels.dtype}"
        if self.kind != "cross_entropy" and self.num_classes is not None:
            return "num_classes", f"{self.kind} has no classes (a cross_entropy loss has them)"
        if self.kind != "cross_entropy" and not self.labels.dtype.startswith("float"):
            return "labels.dtype", f"{self.kind} labels are float32, got {self.labels.dtype}"
        return None


@dataclass(frozen=True)
class ParamSpec:
    """A trainable tensor: a graph input of every training graph, initial value in params.npz."""

    name: str = field(metadata=check(nonempty=True))
    shape: list[int]
    torch_name: str = ""
    transposed: bool = False
    # the parameter's shape in torch where the graph holds it reshaped (GroupNorm's affine
    # weights as [C, 1, 1]); empty: ``shape`` (transposed where ``transposed``)
    torch_shape: list[int] = field(default_factory=list)

    def validate(self) -> tuple[str, str] | None:
        bad = _bad_dims(list(self.shape), allow_symbolic=False)
        if bad:
            return "shape", bad
        if self.torch_shape and (_bad_dims(list(self.torch_shape), allow_symbolic=False)
                                 or math.prod(self.torch_shape) != math.prod(self.shape)):
            return "torch_shape", f"{self.torch_shape} does not hold the {self.shape} values"
        return None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class WeightEntry:
    """A frozen tensor stored raw in ``weights.bin`` at ``offset`` (``length`` bytes)."""

    offset: int = field(metadata=check(ge=0))
    length: int = field(metadata=check(ge=0))
    shape: list[int]
    dtype: DType

    def validate(self) -> tuple[str, str] | None:
        bad = _bad_dims(list(self.shape), allow_symbolic=False)
        if bad:
            return "shape", bad
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        if n != self.length:
            return "length", f"{self.length} bytes do not hold a {self.dtype} {self.shape} ({n})"
        return None


@dataclass(frozen=True)
class GraphFiles:
    forward: str = field(metadata=check(filename=True))
    backward: str | None = field(default=None, metadata=check(filename=True))


@dataclass(frozen=True)
class GraphIO:
    """How the runtime drives one mode's forward/backward pair."""

    forward_inputs: list[str]
    forward_outputs: list[str]
    backward_inputs: list[str]
    saved: list[str]
    grads: dict[str, str]  # param -> backward output (grad.<param>)
    grad_acc: dict[str, str]  # param -> backward input (grad_acc.<param>)
    loss_scale: str | None  # backward input of the seed dL/dloss (None: calib)
    fwd_grams: dict[str, str]  # layer -> calib forward output
    bwd_grams: dict[str, str]  # layer -> calib backward output

    def validate(self) -> tuple[str, str] | None:
        if names.LOSS not in self.forward_outputs:
            return "forward_outputs", f"must include '{names.LOSS}'"
        if set(self.grads) != set(self.grad_acc):
            return "grad_acc", "must name the same parameters as grads"
        for s in self.saved:
            if s not in self.forward_outputs:
                return "saved", f"saved tensor '{s}' is not a forward output"
        return None


@dataclass(frozen=True)
class Lookup:
    """A graph input the runtime fills with rows of a frozen table (an embedding ``Gather``)."""

    table: str
    indices: str


@dataclass(frozen=True)
class LayerInfo:
    """A trainable Linear / 1x1 Conv whose backward INSTANT compresses (see export/autodiff.py)."""

    name: str = field(metadata=check(nonempty=True))
    kind: Literal["linear", "conv1x1"]
    node: str
    x: str
    y: str
    weight: str
    weight_layout: Literal["in_out", "out_in"]
    tokens: int = field(metadata=check(ge=1, le=MAX_DIM))
    cx: int = field(metadata=check(ge=1, le=MAX_DIM))
    cy: int = field(metadata=check(ge=1, le=MAX_DIM))
    x_axis: Literal["token", "channel"]
    g_axis: Literal["token", "channel"]
    rank3: bool
    p_input: str
    q_input: str
    x_dim: int = field(metadata=check(ge=1, le=MAX_DIM))
    g_dim: int = field(metadata=check(ge=1, le=MAX_DIM))
    # bytes per element of the compressed activation x̂ the instant graphs save: 4 (float32) or
    # 1 (int8 with a float32 scale per rank direction and sample: ``export --saved-int8``)
    x_itemsize: Literal[1, 4] = 4
    # the instant graphs run the exact input gradient g·W when the gradient basis Q has full
    # rank (g_dim rows): the runtime then picks full rank wherever a compressed Ry would cost
    # more than the exact product (runtime/ranks.py). Bundles from before this say False.
    gx_exact_at_full: bool = False
    # the [N, L] mask input whose zero positions (padding) the instant, calib and recal graphs
    # zero in x before projecting it and before its Gram: a text model that ignores its padding
    # (export/any_length.py) gives them no gradient. Empty: no mask.
    token_mask: str = ""
    # x is [L, N, C] (sequence first, as torch's MultiheadAttention runs its in_proj): the
    # INSTANT graphs transpose it (and its gradients) to [N, L, C]
    seq_first: bool = False
    # x is [N, *positions, C] with several position axes (channels-last [N, H, W, C]): the
    # INSTANT graphs view it as [N, tokens, C]
    flat: bool = False

    def validate(self) -> tuple[str, str] | None:
        want_x = self.tokens if self.x_axis == "token" else self.cx
        want_g = self.tokens if self.g_axis == "token" else self.cy
        if self.x_dim != want_x:
            return "x_dim", f"must be {want_x} for the {self.x_axis} axis, got {self.x_dim}"
        if self.g_dim != want_g:
            return "g_dim", f"must be {want_g} for the {self.g_axis} axis, got {self.g_dim}"
        # a 2-D input: its rows are samples ([N, C]: 1 a sample) or positions of samples
        # ([L·N, C]: L, counted at export); either way only its channel axis can be projected
        if self.kind == "linear" and not self.rank3 and "token" in (self.x_axis, self.g_axis):
            return "x_axis", f"a linear layer on a 2-D input uses the channel axis, got " \
                             f"{self.x_axis}/{self.g_axis}"
        if self.kind == "linear" and not self.rank3 and self.tokens > MAX_ROWS_2D:
            return "tokens", f"a linear layer on a 2-D input has at most {MAX_ROWS_2D} rows a " \
                             f"sample, got {self.tokens}"
        return None


@dataclass(frozen=True)
class InstantSettings:
    """INSTANT defaults (the one source: exporter, CLI and runtime read them from here).

    ε = 0.95 and calibration every 50 steps are the paper's settings for BERT fine-tuning
    (``oversample`` p = 0 is its vision setting, text uses 7). The paper calibrates over 5
    batches; 2 here: the first calibration costs about one step per batch, and 1, 2 or 5 batches
    gave the same accuracy within seed noise (benchmarks/quality.py, tests/test_training.py).
    """

    energy: float = field(default=0.95, metadata=check(gt=0.0, le=1.0))
    oversample: int = field(default=0, metadata=check(ge=0, le=4096))
    calib_every: int = field(default=50, metadata=check(ge=0))
    calib_batches: int = field(default=2, metadata=check(ge=1, le=10_000))


@dataclass(frozen=True)
class InstantSpec:
    layers: list[LayerInfo]
    settings: InstantSettings
    # the instant graphs save GELU inputs, softmax outputs, attention operands and the compressed
    # activations x̂ as int8 (each layer's ``x_itemsize`` says how its x̂ is stored)
    saved_int8: bool = False


@dataclass(frozen=True)
class FileEntry:
    bytes: int = field(metadata=check(ge=0))
    sha256: str

    def validate(self) -> tuple[str, str] | None:
        return None if _SHA.match(self.sha256) else ("sha256", "must be 64 lowercase hex digits")


@dataclass(frozen=True)
class TextSpec:
    """A text model: the tokenizer file in the bundle and the inputs it fills."""

    tokenizer: str = field(metadata=check(filename=True))
    seq_len: int = field(metadata=check(ge=2, le=1 << 20))
    ids_input: str
    mask_input: str | None = None
    type_ids_input: str | None = None
    # infer.onnx takes any length up to seq_len: evaluation drops a batch's trailing padding
    # (export/any_length.py); False: every batch is padded to seq_len
    any_length: bool = False
    # shorter token lengths the training graphs were also traced at (export/lengths.py): graphs
    # ``{mode}@{length}`` for vanilla/instant; a micro-batch whose rows all fit one runs there
    lengths: list[int] = field(default_factory=list)

    def validate(self) -> tuple[str, str] | None:
        if any(n < 1 for n in self.lengths) or self.lengths != sorted(set(self.lengths)):
            return "lengths", "must be distinct positive lengths in increasing order"
        if self.lengths and self.lengths[-1] >= self.seq_len:
            return "lengths", f"must be shorter than the trained length {self.seq_len}"
        if self.lengths and not (self.any_length and self.mask_input):
            return "lengths", "need a model that takes any length and masks its padding"
        return None

    @property
    def token_inputs(self) -> list[str]:
        """The inputs with a token axis (axis 1): ids, mask and type ids, those the model has."""
        return [n for n in (self.ids_input, self.mask_input, self.type_ids_input) if n]


@dataclass(frozen=True)
class PrefixSpec:
    """The frozen part of the forward as a graph of its own (``graphs.prefix``, forward only):
    the model's inputs -> ``outputs``, which the training graphs take as inputs. It takes any
    token length where ``text.any_length``: the runtime runs it on a micro-batch without its
    trailing padding and pads each output back to the trained length with zeros along its
    token axis (-1: the tensor has none). See export/prefix.py."""

    outputs: dict[str, int]
    # the outputs' bytes per sample at the trained length (the runtime's memory planning)
    bytes_per_sample: int = field(default=0, metadata=check(ge=0, le=1 << 34))

    def validate(self) -> tuple[str, str] | None:
        if not self.outputs:
            return "outputs", "must name at least one tensor"
        if any(a == 0 or a < -1 or a > 16 for a in self.outputs.values()):
            return "outputs", "token axes are -1 (none) or 1..16 (axis 0 is the batch)"
        return None


# the smallest std an image input takes: 1/std scales every pixel (1e-45 made each inf or NaN)
IMAGE_STD_MIN = 1e-6


@dataclass(frozen=True)
class ImageSpec:
    """An image model's input as the export recorded it: pixels in [0, 1] (after /255) are
    resized to ``height`` × ``width`` and normalised ``(x - mean) / std`` per channel."""

    input: str
    channels: int = field(metadata=check(ge=1, le=4))
    height: int = field(metadata=check(ge=1, le=1 << 15))
    width: int = field(metadata=check(ge=1, le=1 << 15))
    mean: list[float]
    std: list[float]

    def validate(self) -> tuple[str, str] | None:
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):
            return "mean", f"mean and std need 1 or {self.channels} values"
        if any(s < IMAGE_STD_MIN for s in self.std):
            return "std", f"must be at least {IMAGE_STD_MIN:g}"
        return None


@dataclass(frozen=True)
class Manifest:
    format: Literal["instant-runtime-bundle"]
    format_version: int
    created: str
    source: str
    opset: int = field(metadata=check(ge=7, le=100))
    ir_version: int = field(metadata=check(ge=3, le=100))
    min_onnxruntime: str
    inputs: list[TensorSpec] = field(metadata=check(nonempty=True))
    output: str = field(metadata=check(nonempty=True))
    loss: LossSpec
    params: list[ParamSpec] = field(metadata=check(nonempty=True))
    trainable: str
    frozen_bytes: int = field(metadata=check(ge=0))
    weights: dict[str, WeightEntry]
    graph_weights: dict[str, list[str]]
    graphs: dict[str, GraphFiles]
    io: dict[str, GraphIO]
    lookups: dict[str, Lookup]
    instant: InstantSpec
    files: dict[str, FileEntry] = field(metadata=check(nonempty=True))
    class_names: list[str] | None = None  # class id -> name, when the export or data gave them
    text: TextSpec | None = None
    image: ImageSpec | None = None
    # optimizer name -> its step as an ONNX graph (the device-resident step, --device cuda)
    optimizers: dict[str, str] = field(default_factory=dict)
    # per sample: "forward" FLOPs of the MatMul/Gemm/Conv nodes, "trainable_forward" the part
    # that depends on trainable parameters (plan's step-time estimate with a profile's GFLOP/s)
    flops: dict[str, int] = field(default_factory=dict)
    prefix: PrefixSpec | None = None
    # the model's output for a row depends on the batch's other rows (export/batch_rows.py):
    # trained on whole batches only
    mixes_rows: bool = field(default=False, metadata={"omit_default": True})

    # ------------------------------------------------------------------ cross-field checks
    def validate(self) -> tuple[str, str] | None:  # noqa: C901 - one list of rules
        from .schema import is_safe_filename

        for fname in self.files:
            if not is_safe_filename(fname):
                return "files", f"'{fname}' is not a plain file name inside the bundle folder"
        if names.INFER not in self.graphs or "vanilla" not in self.graphs:
            return "graphs", "must have 'infer' and 'vanilla' graphs"
        forward_only = (names.INFER, names.PREFIX)
        lengths = self.text.lengths if self.text is not None else []
        for mode, g in self.graphs.items():
            base, at, length = mode.partition("@")
            if at and (base not in names.TRAINING_MODES or base not in self.graphs
                       or not length.isdigit() or int(length) not in lengths):
                return "graphs", (f"'{mode}' is not a training mode at one of the text's "
                                  "lengths")
            if not at and mode not in forward_only and mode not in names.MODES:
                return "graphs", f"unknown mode '{mode}'; modes: {', '.join(names.MODES)}"
            if (mode in forward_only) != (g.backward is None):
                return f"graphs.{mode}", ("infer and prefix have no backward graph; the other "
                                          "modes have one")
            for part in (g.forward, g.backward):
                if part is not None and part not in self.files:
                    return f"graphs.{mode}", f"graph file '{part}' is not listed in files"
        if (self.prefix is None) != (names.PREFIX not in self.graphs):
            return "prefix", "a prefix graph and the prefix description come together"
        for length in lengths:
            for mode in names.TRAINING_MODES:
                if mode in self.graphs and f"{mode}@{length}" not in self.graphs:
                    return "graphs", f"no '{mode}@{length}' graphs for length {length}"
        if self.prefix is not None:
            taken = ({p.name for p in self.params} | {names.LABELS} | set(self.lookups)
                     | {i.name for i in self.inputs})
            clash = sorted(set(self.prefix.outputs) & taken)
            if clash:
                return "prefix.outputs", (f"'{clash[0]}' is a model input, label, lookup or "
                                          "parameter, not a prefix output")
            for mode in self.training_graphs:
                io = self.io.get(mode)
                missing = [t for t in self.prefix.outputs if io and t not in io.forward_inputs]
                if missing:
                    return f"io.{mode}", f"the forward does not take the prefix's '{missing[0]}'"
        if set(self.io) != set(self.training_graphs):
            return "io", "must describe exactly the training graphs' modes"
        if names.PARAMS_FILE not in self.files:
            return "files", f"must list {names.PARAMS_FILE}"
        values = sum(math.prod(p.shape) for p in self.params)  # (plain .npy members, at least
        held = self.files[names.PARAMS_FILE].bytes  # 2 bytes a value: compressed are refused)
        if 2 * values > held:  # (session 40 probe: `plan` advised an 18 EB budget for them)
            return "params", (f"their shapes hold {values} values, more than "
                              f"{names.PARAMS_FILE}'s {held} bytes can hold")
        if self.weights:
            wb = self.files.get(names.WEIGHTS_FILE)
            if wb is None:
                return "files", f"must list {names.WEIGHTS_FILE} (the manifest has weights)"
            for k, w in self.weights.items():
                if w.offset + w.length > wb.bytes:
                    return f"weights.{k}", (f"bytes {w.offset}..{w.offset + w.length} lie "
                                            f"outside {names.WEIGHTS_FILE} ({wb.bytes} bytes)")
        graph_files = {g for gf in self.graphs.values() for g in (gf.forward, gf.backward) if g}
        for gname, ws in self.graph_weights.items():
            if gname not in graph_files:
                return "graph_weights", f"'{gname}' is not one of the bundle's graphs"
            for w in ws:
                if w not in self.weights:
                    return f"graph_weights.{gname}", f"weight '{w}' is not in weights"
        input_names = {s.name for s in self.inputs}
        for out, lk in self.lookups.items():
            if lk.table not in self.weights:
                return f"lookups.{out}", f"table '{lk.table}' is not in weights"
            if lk.indices not in input_names:
                return f"lookups.{out}", f"indices '{lk.indices}' is not a model input"
        if len({p.name for p in self.params}) != len(self.params):
            return "params", "parameter names must be unique"
        layer_names = [ly.name for ly in self.layers]
        if len(set(layer_names)) != len(layer_names):
            return "instant.layers", "layer names must be unique"
        for mode, io in self.io.items():  # a calibration's Grams: one per layer, by its name
            for key, prefix, grams in (("fwd_grams", names.GRAM_X, io.fwd_grams),
                                       ("bwd_grams", names.GRAM_G, io.bwd_grams)):
                for layer, out in grams.items():
                    if layer not in layer_names or out != prefix + layer:
                        return f"io.{mode}.{key}", (f"'{layer}': '{out}' is not the Gram "
                                                    f"'{prefix}<layer>' of one of instant.layers")
                if key == "fwd_grams" and any(o not in io.forward_outputs
                                              for o in grams.values()):
                    return f"io.{mode}.{key}", "every Gram must be a forward output"
                if (io.fwd_grams or io.bwd_grams) and len(grams) != len(layer_names):
                    return f"io.{mode}.{key}", ("a calibration graph gives every one of "
                                                "instant.layers its Gram")
        shapes = {p.name: list(p.shape) for p in self.params}
        for i, ly in enumerate(self.layers):
            shape = shapes.get(ly.weight)
            want = [ly.cy, ly.cx] if ly.weight_layout == "out_in" else [ly.cx, ly.cy]
            if shape is None or shape[:2] != want or math.prod(shape[2:]) != 1:
                return f"instant.layers[{i}]", (f"cx {ly.cx} and cy {ly.cy} do not match the "
                                                f"shape of its weight '{ly.weight}' in params")
        for k, v in self.flops.items():
            if v < 0:
                return f"flops.{k}", f"must be >= 0, got {v}"
        if self.loss.kind == "cross_entropy" and self.class_names is not None and \
                len(self.class_names) != self.loss.num_classes:
            return "class_names", (f"{len(self.class_names)} names for "
                                   f"{self.loss.num_classes} classes")
        seen: set[str] = set()  # (session 38 probe: ["a", "a", "b"] trained; export refuses it)
        for name in self.class_names or ():
            if name in seen:
                return "class_names", f"repeats the name '{name[:40]}'"
            seen.add(name)
        if self.text is not None:
            if self.text.tokenizer not in self.files:
                return "text.tokenizer", f"'{self.text.tokenizer}' is not listed in files"
            if not self.text.tokenizer.endswith(".json") or self.text.tokenizer in (
                    names.WEIGHTS_FILE, names.PARAMS_FILE, *self.optimizers.values()):
                # (session 38 probe: weights.bin named as the tokenizer, 83 MB read as text)
                return "text.tokenizer", (f"'{self.text.tokenizer}' is no tokenizer .json file "
                                          "of the bundle")
            for n in (self.text.ids_input, self.text.mask_input, self.text.type_ids_input):
                if n is not None and n not in input_names:
                    return "text", f"'{n}' is not a model input"
        if self.image is not None and self.image.input not in input_names:
            return "image.input", f"'{self.image.input}' is not a model input"
        for opt, fname in self.optimizers.items():
            if opt not in ("adamw", "sgd") or fname not in self.files:
                return f"optimizers.{opt}", f"unknown optimizer or unlisted file '{fname}'"
        return None

    # ------------------------------------------------------------------ convenience
    @property
    def modes(self) -> list[str]:
        """Training-graph modes in the bundle (``vanilla``, and ``instant``/``calib``)."""
        return [m for m in self.training_graphs if "@" not in m]

    @property
    def training_graphs(self) -> list[str]:
        """Every forward/backward pair: the modes, and ``{mode}@{length}`` at shorter lengths."""
        return [m for m in self.graphs if m not in (names.INFER, names.PREFIX)]

    @property
    def layers(self) -> list[LayerInfo]:
        return self.instant.layers

    def input(self, name: str) -> TensorSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(name)


def manifest_json(m: Manifest) -> str:
    """The manifest as the JSON text written to ``manifest.json``."""
    return json.dumps(dump(m), indent=1)


class _BigNumber(str):
    """A JSON number too long to convert (its digits, kept as text)."""


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list) -> dict:
    """A JSON object; one naming a key twice is refused (session 46 probe: the last of two
    "output" values won silently, and the run failed later in onnxruntime)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(f"the key {key[:60]!r} appears twice in one object")
        out[key] = value
    return out


def _parse_int(text: str) -> int | _BigNumber:
    # Python refuses int() of more than 4300 digits with a ValueError; anything past 30 digits
    # is out of range anyway: kept as text for _check_numbers to name its field
    return _BigNumber(text) if len(text) > 30 else int(text)


def _show(value: object) -> str:
    text = str(value) if isinstance(value, _BigNumber) else repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


def _check_numbers(raw: object, path: Path) -> None:
    """Every number in the parsed manifest is finite and within +-MAX_NUMBER (see there).

    Raises:
        ManifestError: naming the first number out of range and its field.
    """
    def bad(value: object) -> bool:
        return isinstance(value, _BigNumber) or (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and not (math.isfinite(value) and abs(value) <= MAX_NUMBER))

    # values alone on the stack (a path per value cost ~90 bytes of RSS a manifest byte: a
    # 10 MB manifest of empty lists took the process to 936 MB); the path only for the error
    stack: list[object] = [raw]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):  # pushed last to first: the first bad field is named
            stack.extend(reversed(value.values()))
        elif isinstance(value, list):
            stack.extend(reversed(value))
        elif bad(value):
            stack.clear()
            where: list[tuple[object, tuple]] = [(raw, ())]
            while where:
                v, at = where.pop()
                if isinstance(v, dict):
                    where.extend((x, (*at, f".{k}")) for k, x in reversed(v.items()))
                elif isinstance(v, list):
                    where.extend((v[i], (*at, f"[{i}]")) for i in reversed(range(len(v))))
                elif v is value:
                    break
            name = "".join(at).lstrip(".") or "(document)"
            raise ManifestError(f"{path}: field '{name}': expected a finite number from "
                                f"-2**53 to 2**53, got {_show(value)}; re-export the bundle")


def _clip(message: str) -> str:
    """A message of at most _MAX_MESSAGE characters: a long value in it is cut in the middle."""
    if len(message) <= _MAX_MESSAGE:
        return message
    tail = _MAX_MESSAGE // 4
    return f"{message[:_MAX_MESSAGE - tail - 5]} ... {message[-tail:]}"


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``manifest.json``.

    Raises:
        ManifestError: unreadable, not JSON, another format or version, a number out of range
            (see ``MAX_NUMBER``) or any field that breaks the schema (the message names the
            field and shows at most the start and end of a long value).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path} has {size} bytes, more than a manifest can have "
                                f"({MAX_MANIFEST_BYTES}); it is not a bundle manifest")
        data = path.read_bytes()
        # a bound on the values before they are parsed: each costs 30-60 bytes parsed (a 64 MB
        # manifest of empty lists would take 5 GB); MiniLM's has ~4,000
        values = data.count(b",") + data.count(b"[") + data.count(b"{")
        if values > MAX_MANIFEST_VALUES:
            raise ManifestError(f"{path} holds over {values:,} JSON values, more than a "
                                f"manifest can have ({MAX_MANIFEST_VALUES:,}); it is not a "
                                "bundle manifest: re-export the bundle")
        raw = json.loads(data.decode("utf-8"), parse_int=_parse_int,
                         object_pairs_hook=_no_repeated_keys)
        del data
    except _RepeatedKey as exc:
        raise ManifestError(f"{path} is corrupt: {exc}; re-export the bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path} is unreadable or corrupt ({type(exc).__name__}: "
                            f"{str(exc)[:120]}); re-export the bundle") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an instant-runtime bundle manifest (no "
                            f"\"format\": \"{FORMAT}\"); pass a folder made by "
                            "`instant-runtime export`")
    _check_numbers(raw, path)
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ManifestError(_clip(f"{path}: field 'format_version': expected an integer, got "
                                  f"{version!r} ({type(version).__name__}); re-export the "
                                  "bundle"))
    if version != FORMAT_VERSION:
        raise ManifestError(f"bundle '{path.parent}' has format version {version}; this "
                            f"runtime reads version {FORMAT_VERSION}. Re-export it with the "
                            "matching exporter")
    try:
        return load(Manifest, raw, str(path))
    except ManifestError as exc:
        raise ManifestError(_clip(str(exc))) from None
