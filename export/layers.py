"""Which layers INSTANT compresses: every trainable Linear (Gemm / MatMul with a 2-D weight) and
1x1 Conv, found in the forward graph, with the axis each basis acts on.

Layer names come from the weight's PyTorch name (``layer4.attention.query``). Where the weight is
anonymous (third-party ONNX files name folded weights ``onnx::MatMul_470``), the name comes from
the node, whose name keeps the module path (``/encoder/layer.0/attention/self/query/MatMul`` ->
``encoder.layer.0.attention.self.query``), so ``--trainable`` globs and INSTANT work the same on
both.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import onnx
from onnx import helper

from contract import names

from .graph import ExportError, Shapes

__all__ = ["CompressedLayer", "find_compressible_layers", "is_anonymous", "mask_padding",
           "module_path", "share_activation_bases", "vector_layers_kept_exact",
           "vector_layers_note"]

_ANON = re.compile(r"^(onnx::|_?val_|initializer|Constant|const)|^[0-9]+$")


def is_anonymous(name: str) -> bool:
    """True for exporter-made tensor names that carry no module path (``onnx::MatMul_470``)."""
    return bool(_ANON.match(name))


def module_path(node_name: str, collapse: bool = True) -> str | None:
    """``/encoder/layer.0/attention/self/query/MatMul`` -> ``encoder.layer.0.attention.self.query``
    (the node's op name dropped); None when the node name has no path.

    TorchScript names a container's child after the container (``/mlp/mlp.0/MatMul`` for
    ``mlp = nn.Sequential(...)``): a part that extends the one before it replaces it, giving
    torch's ``mlp.0`` rather than ``mlp.mlp.0``."""
    parts = [p for p in node_name.strip("/").split("/") if p]
    if len(parts) < 2:
        return None
    path: list[str] = []
    for part in parts[:-1]:
        if collapse and path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def node_module_path(node: onnx.NodeProto) -> str | None:
    """The module a node belongs to: from its name (TorchScript: ``/encoder/fc/MatMul``) or,
    for torch's dynamo exporter, whose nodes are named ``node_MatMul_3``, from its
    ``pkg.torch.onnx.name_scopes`` metadata (``['', 'enc', 'enc.1', 'linear']`` -> ``enc.1``)."""
    path = module_path(node.name)
    if path:
        return path
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = re.findall(r"'([^']*)'", p.value)
            mods = [x for x in scopes[:-1] if x]
            return mods[-1] if mods else None
    return None


@dataclass
class CompressedLayer:
    """A trainable Linear / 1x1 Conv whose backward INSTANT compresses.

    The per-sample activation is a matrix whose two last axes are ``(L, C)`` for a Linear
    (channels last) and ``(C, L)`` for a 1x1 Conv (channels first, spatial positions flattened).
    ``x_axis``/``g_axis`` say which of the two a basis projects: ``token`` (L) or ``channel`` (C),
    chosen as in the paper (token when L <= C); 2-D activations (L = 1) always use ``channel``.
    """

    name: str
    kind: str  # "linear" | "conv1x1"
    node: str
    x: str
    y: str
    weight: str
    weight_layout: str  # "in_out" (MatMul B, [Cx, Cy]) | "out_in" (Gemm transB / Conv, [Cy, Cx])
    tokens: int
    cx: int
    cy: int
    x_axis: str
    g_axis: str
    rank3: bool = True  # False for a 2-D [N, C] activation
    p_input: str = ""
    q_input: str = ""
    # 4: x̂ saved in float32; 1: in int8 with a float32 scale per sample and rank direction
    # (``export --saved-int8``, where :meth:`int8_x_ok`)
    x_itemsize: int = 4
    # the instant graphs run the exact input gradient g·W where Q has full rank
    # (``rules/linear.py: full_rank``); bundles from before this say False
    gx_exact_at_full: bool = True
    # a [N, L] mask input of a text model that ignores its padding: its zero positions enter
    # no gradient, so x is zeroed there before the projection and the Gram (``rules/linear.py``)
    token_mask: str = ""
    # a Linear over [L, N, C] (sequence first): the INSTANT graphs view it as [N, L, C]
    seq_first: bool = False
    # a Linear over [N, *positions, C] with several position axes (channels-last feature maps:
    # ConvNeXt's and Swin's pointwise MLPs on [N, H, W, C]): the INSTANT graphs view it as
    # [N, T, C], T the product of the position axes (``tokens``)
    flat: bool = False

    def __post_init__(self) -> None:
        self.p_input = self.p_input or names.basis_p(self.name)
        self.q_input = self.q_input or names.basis_q(self.name)

    @property
    def x_dim(self) -> int:
        return self.tokens if self.x_axis == "token" else self.cx

    @property
    def g_dim(self) -> int:
        return self.tokens if self.g_axis == "token" else self.cy

    def int8_x_ok(self) -> bool:
        """Whether x̂ can be stored in int8 with per-sample scales: each of its rank directions
        spans at least 16 elements of one sample (a 2-D [N, C] activation has no such axis)."""
        n = self.cx if self.x_axis == "token" else self.tokens
        return (self.rank3 or self.kind == "conv1x1") and n >= 16

    def to_json(self) -> dict:
        d = asdict(self)
        d["x_dim"], d["g_dim"] = self.x_dim, self.g_dim
        return d


def _axis_mode(tokens: int, channels: int, rank3: bool) -> str:
    if not rank3:
        return "channel"
    return "token" if tokens <= channels else "channel"


def _head_node(model: onnx.ModelProto, trainable: set[str], made_by: dict) -> str | None:
    """The classifier head: the last node (graph order) that multiplies by a weight, trained
    or frozen, whether or not INSTANT can compress it (a Gemm with transA cannot, and then
    no other layer is left out in its place). A frozen head (``--trainable`` naming body layers
    only) is no candidate, so no trained layer is left out in its place (a probe's only trained
    token layer stayed exact, with no note). ``made_by``: tensor -> the node that outputs it."""
    weights = set(trainable) | {t.name for t in model.graph.initializer if len(t.dims) >= 2}

    def weight(name: str) -> bool:  # a weight, or one reshaped/cast/transposed from it
        for _ in range(8):
            if name in weights:
                return True
            n = made_by.get(name)
            if n is None or n.op_type not in ("Transpose", "Identity", "Cast", "Reshape",
                                              "Unsqueeze", "Squeeze", "Flatten"):
                return False
            name = n.input[0]
        return False

    head = None
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") and \
                any(weight(i) for i in node.input):
            head = node.name
    return head


def find_compressible_layers(model: onnx.ModelProto, shapes: Shapes, trainable: set[str],
                             param_names: dict[str, str], exclude: Iterable[str] | None = None,
                             notes: list[str] | None = None) -> list[CompressedLayer]:
    """Every trainable Linear (Gemm/MatMul with a 2-D weight) and 1x1 Conv, in graph order.

    ``exclude`` holds globs on layer names; ``None`` excludes the classifier head (the last such
    layer before the loss), as the paper does, and the layers over one vector per sample whose
    Grams outweigh what compressing them saves (:func:`vector_layers_kept_exact`; a note in
    ``notes`` names them).
    """
    found: list[CompressedLayer] = []
    taken: set[str] = set()
    made_by = {o: n for n in model.graph.node for o in n.output}
    other: list[str] = []  # trainable channel-mixing weights INSTANT's rules do not cover
    symbolic: list[tuple[str, list]] = []  # ... that they would, at a fixed length or size
    for node in model.graph.node:
        layer = _as_layer(node, shapes, trainable, param_names, made_by)
        why = _not_covered(node, shapes, trainable, made_by) if layer is None else None
        if why:
            other.append(f"{layer_name(why[1], node.name, param_names)} ({why[0]})")
        free = _symbolic_extent(node, shapes, trainable, made_by) if layer is None else None
        if free:
            symbolic.append((layer_name(free[0], node.name, param_names), free[1]))
        if layer is not None and not layer.rank3 and shapes.of(layer.x)[:1] != ["N"]:
            rows = _rows_per_sample(made_by, shapes, layer.x, layer.cx)
            if rows:  # [L·N, C] rows (MultiheadAttention's out_proj, x.view(-1, C)): L a sample
                layer.tokens = rows
        if layer is not None:
            base, k = layer.name, 1
            while layer.name in taken:  # one weight used by two nodes: distinct layer names
                k += 1
                layer.name = f"{base}#{k}"
            taken.add(layer.name)
            layer.p_input, layer.q_input = names.basis_p(layer.name), names.basis_q(layer.name)
            found.append(layer)
    if other and notes is not None:  # (a session-27 probe's grouped conv and einsum: silent)
        notes.append(f"note: {len(other)} trainable layer(s) train exactly, outside INSTANT's "
                     f"rules (a Linear x·W or an ungrouped, unstrided 1x1 conv): "
                     + ", ".join(other[:4]) + (", ..." if len(other) > 4 else ""))
    if symbolic and notes is not None:  # (session 39 probe: an ONNX file with a symbolic
        # sequence length exported with 0 INSTANT layers and no word)
        shown = ", ".join(f"{n} (input {d})" for n, d in symbolic[:4])
        notes.append(f"note: {len(symbolic)} trainable layer(s) run over a length the model "
                     f"leaves symbolic and train exactly (INSTANT needs it fixed): {shown}"
                     f"{', ...' if len(symbolic) > 4 else ''}; export with --input-shape "
                     "(batch first, e.g. 8,128:int64 for token ids) or --npz to fix it")
    if exclude is None:
        head = None
        if found and found[-1].node == _head_node(model, trainable, made_by):
            head, found = found[-1].name, found[:-1]
        # one vector per sample: a 2-D input whose rows are the batch (a GPT-2-style Linear
        # over x.view(-1, C) has N·L rows, tokens in all but shape, and stays compressed)
        exact = vector_layers_kept_exact([ly for ly in found if shapes.of(ly.x)[:1] == ["N"]])
        if exact and notes is not None:
            notes.append(vector_layers_note(exact, head))
        return [ly for ly in found if ly not in exact]
    pats = list(exclude)
    unmatched = [p for p in pats if not any(fnmatch.fnmatch(ly.name, p) for ly in found)]
    if unmatched:  # a typo would leave the layer compressed without a word
        known = [ly.name for ly in found]
        raise ExportError(f"--instant-exclude '{unmatched[0]}' matches no Linear or 1x1-conv "
                          "layer of this model ("
                          + (", ".join(known[:6]) + (", ..." if len(known) > 6 else "")
                             if known else "it has none")
                          + "); check the name, or leave the pattern out")
    return [ly for ly in found if not any(fnmatch.fnmatch(ly.name, p) for p in pats)]


def _not_covered(node, shapes: Shapes, trainable, made_by: dict) -> tuple[str, str] | None:
    """(why, its weight) for a node that mixes channels with a trainable weight and is not an
    INSTANT layer (a grouped or strided 1x1 conv, an Einsum, a weight on the left of a MatMul or
    Gemm, a Gemm with transA, a weight that reaches a MatMul through a Transpose or Reshape, a
    weight of other than 2 axes); None for other nodes (a kxk conv is exact by the method, not
    worth a note)."""
    ins = list(node.input)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Einsum":
        w = next((i for i in ins if i in trainable), None)
        return None if w is None else ("an Einsum", w)
    if node.op_type in ("MatMul", "Gemm") and len(ins) >= 2:
        if ins[0] in trainable and ins[1] not in trainable:
            return "a weight on the left, W·x", ins[0]
        if node.op_type == "Gemm" and ins[1] in trainable and attrs.get("transA", 0):
            return "a Gemm with transA=1", ins[1]
        via = made_by.get(ins[1])  # (session 34 probe: weights stored [out, in], transposed
        if via is not None and via.op_type in ("Transpose", "Reshape") \
                and via.input[0] in trainable:  # in the graph: silent; session 46: reshaped)
            return f"a weight through a {via.op_type} node", via.input[0]
        axes = len(shapes.of(ins[1]) or [])
        if ins[1] in trainable and axes != 2:  # (session 46 probe)
            return f"a {axes}-axis weight; the rule takes 2-D ones", ins[1]
        return None
    if node.op_type != "Conv" or len(ins) < 2 or ins[1] not in trainable:
        return None
    ws = shapes.of(ins[1])
    if len(ws) < 3 or any(d != 1 for d in ws[2:]):
        return None
    why = (f"a 1x1 conv in {attrs['group']} groups" if attrs.get("group", 1) != 1 else
           "a padded 1x1 conv" if any(v != 0 for v in attrs.get("pads", [])) else
           "a strided 1x1 conv" if any(v != 1 for v in attrs.get("strides", [])) else None)
    return None if why is None else (why, ins[1])


def _symbolic_extent(node, shapes: Shapes, trainable, made_by: dict) -> tuple[str, list] | None:
    """(weight, input shape) of a Linear over tokens that INSTANT would compress but for a
    symbolic length in its input; None otherwise."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Gemm", "MatMul") and len(node.input) >= 2:
        w = _tied(node.input[1], made_by)
        xs, ws = shapes.of(node.input[0]) or [], shapes.of(w) or []
        if w in trainable and len(ws) == 2 and len(xs) >= 3 and not attrs.get("transA", 0) \
                and sum(not isinstance(d, int) for d in xs[:-1]) > 1:
            return w, list(xs)
    return None  # (a conv over a symbolic size is refused at export: "spatial dims must be
    # static")


def _rows_per_sample(made_by: dict, shapes: Shapes, x: str, width: int) -> int | None:
    """Rows a sample gives a 2-D ``x`` of ``width`` columns that a Reshape (or Flatten) made
    from a tensor whose one free dimension is the batch: e.g. ``[L, N, C]`` viewed as
    ``[L·N, C]`` gives L (shape inference names the rows only 'unk', and the layer was counted
    as one row a sample: its memory, FLOPs and Gram bound L times low). None where not so."""
    node = made_by.get(x)
    if node is None or node.op_type not in ("Reshape", "Flatten"):
        return None
    src = shapes.of(node.input[0])
    free = [d for d in src or [] if not isinstance(d, int)]  # the batch (in training graphs
    if len(free) != 1:  # only it is free), as "N" or a name shape inference gave it
        return None
    per = math.prod(d for d in src if isinstance(d, int))
    return per // width if width and per % width == 0 and per // width > 1 else None


def layer_name(weight: str, node_name: str, param_names: dict[str, str]) -> str:
    """The layer's name: the weight's torch name without ``.weight``, or the node's module path
    when the weight is anonymous."""
    name = param_names.get(weight, weight)
    if is_anonymous(name):
        path = module_path(node_name)
        if path:
            return path
    for suffix in (".weight", "_weight"):  # nn.MultiheadAttention's in_proj_weight
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _as_layer(node, shapes: Shapes, trainable, param_names,
              made_by: dict | None = None) -> CompressedLayer | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Gemm", "MatMul"):
        if len(node.input) < 2:
            return None
        x, w = node.input[0], _tied(node.input[1], made_by or {})
        if w not in trainable:
            return None
        ws = shapes.of(w)
        xs = shapes.of(x)
        if len(ws) != 2 or len(xs) < 2 or attrs.get("transA", 0):
            return None
        out_in = node.op_type == "Gemm" and attrs.get("transB", 0) == 1
        cy, cx = (ws[0], ws[1]) if out_in else (ws[1], ws[0])
        rank3 = len(xs) >= 3
        flat = len(xs) > 3  # [N, H, W, C]: its positions flattened to [N, H·W, C]
        if flat and not all(isinstance(d, int) for d in xs[1:-1]):
            return None
        # [L, N, C]: sequence first (torch's MultiheadAttention runs its in_proj so)
        seq_first = len(xs) == 3 and isinstance(xs[0], int) and not isinstance(xs[1], int)
        tokens = (math.prod(xs[1:-1]) if flat else xs[0] if seq_first else xs[1]) \
            if rank3 else 1
        if not all(isinstance(v, int) for v in (cx, cy, tokens)):
            return None
        return CompressedLayer(
            name=layer_name(w, node.name, param_names), kind="linear", node=node.name, x=x,
            y=node.output[0], weight=w, weight_layout="out_in" if out_in else "in_out",
            tokens=tokens, cx=cx, cy=cy, rank3=rank3, seq_first=seq_first, flat=flat,
            x_axis=_axis_mode(tokens, cx, rank3), g_axis=_axis_mode(tokens, cy, rank3))
    if node.op_type == "Conv" and node.input[1] in trainable:
        w = node.input[1]
        ws = shapes.of(w)
        xs = shapes.of(node.input[0])
        # a pointwise Conv of any spatial rank (Conv1d, Conv2d, Conv3d): a Linear over channels
        one = (len(ws) in (3, 4, 5) and all(d == 1 for d in ws[2:]) and len(xs) == len(ws)
               and attrs.get("group", 1) == 1
               and all(s == 1 for s in attrs.get("strides", []))
               and all(p == 0 for p in attrs.get("pads", []))
               and all(isinstance(d, int) for d in xs[1:]))
        if not one:
            return None
        tokens = math.prod(int(d) for d in xs[2:])
        cy, cx = int(ws[0]), int(ws[1])
        return CompressedLayer(
            name=layer_name(w, node.name, param_names), kind="conv1x1", node=node.name,
            x=node.input[0], y=node.output[0], weight=w, weight_layout="out_in", tokens=tokens,
            cx=cx, cy=cy, x_axis=_axis_mode(tokens, cx, True), g_axis=_axis_mode(tokens, cy, True))
    return None


def _tied(name: str, made_by: dict) -> str:
    """The weight that ``name`` is an Identity copy of (a weight applied again: torch writes a
    later use of a shared Linear, ALBERT's layers or a loop over one module, as a copy that
    the export ties back with an Identity), else ``name``. The layer is then compressed at each
    use under the weight's name: its rule's g_W goes to the copy and reaches the weight through
    the Identity (session 34 probe: only the first use was compressed, without a note)."""
    node = made_by.get(name)
    return node.input[0] if node is not None and node.op_type == "Identity" else name


def mask_padding(layers: list[CompressedLayer], mask: str, length: int,
                 forward: onnx.ModelProto) -> int:
    """Give every Linear over the token axis ([N, L, C], L = ``length``) the padding mask input
    ``mask`` of a model that ignores its padding (checked by export/any_length.py with a
    tokenizer, export/padding.py without): padded positions enter no gradient, and the INSTANT
    graphs zero them in x before its projection and its Gram, and in the input gradient
    (rules/linear.py). The projection then spends its rank on the real tokens only
    (docs/method.md "Padded positions"). Returns how many layers got it."""
    if mask not in {i.name for i in forward.graph.input}:
        return 0
    count = 0
    for ly in over_tokens(layers, length):
        ly.token_mask = mask
        count += 1
    return count


def over_tokens(layers: list[CompressedLayer], length: int) -> list[CompressedLayer]:
    """The Linears of ``layers`` over a token axis of ``length`` ([N, L, C]): those a padding
    mask of that length can apply to."""
    return [ly for ly in layers if ly.kind == "linear" and ly.rank3 and not ly.seq_first
            and not ly.flat and ly.tokens == length]


def share_activation_bases(layers: list[CompressedLayer]) -> None:
    """Layers that read the same activation the same way (an attention block's query, key and
    value; a gated MLP's gate and up projections) share one activation basis P: the instant
    graphs then save x̂ = P·x once for all of them (rules/linear.py), and the runtime gives them
    one activation rank (runtime/ranks.py). Their Grams of x are the same matrix, so each keeps
    the basis it would have had alone; only the memory and the forward projection are shared.
    Idempotent; the first layer's basis name is the group's."""
    first: dict[tuple, CompressedLayer] = {}
    for ly in layers:
        key = (ly.x, ly.kind, ly.x_axis, ly.tokens, ly.cx, ly.rank3, ly.x_itemsize,
               ly.token_mask, ly.seq_first, ly.flat)
        lead = first.setdefault(key, ly)
        ly.p_input = lead.p_input if lead is not ly else names.basis_p(ly.name)


# A calibration holds each INSTANT layer's two Grams (float64 accumulators plus onnxruntime's
# float32 outputs: 12 bytes an entry) to save at most the layer's input (4 bytes a value) per
# sample. Layers over one vector per sample that need more than this many samples in a
# micro-batch to break even train exactly by default.
VECTOR_EXACT_SAMPLES = 256


def _gram_bytes(ly: CompressedLayer) -> int:
    return 12 * (ly.x_dim ** 2 + ly.g_dim ** 2)


def vector_layers_kept_exact(layers: list[CompressedLayer]) -> list[CompressedLayer]:
    """The Linears over one vector per sample ([N, C]: an MLP's) that an export leaves exact by
    default: their Grams (D×D) cost more memory than projecting one vector per sample saves
    until a micro-batch of over ``VECTOR_EXACT_SAMPLES`` samples (any layer wider than ~86),
    and with few rows per calibration their bases fit one batch: a residual MLP on digits lost
    2.7 points to exact training at 2-9x its time (session-20 probe, 5 seeds).
    docs/method.md "One vector per sample"."""
    return [ly for ly in layers if ly.kind == "linear" and not ly.rank3
            and _gram_bytes(ly) > VECTOR_EXACT_SAMPLES * 4 * ly.cx]


def vector_layers_note(exact: list[CompressedLayer], head: str | None = None) -> str:
    """The export's note on the layers :func:`vector_layers_kept_exact` left exact (``head``:
    the classifier head the default leaves exact too, which the way back names)."""
    grams = sum(_gram_bytes(ly) for ly in exact)
    saved = sum(4 * ly.cx for ly in exact)
    names_ = ", ".join(ly.name for ly in exact[:4]) + (", ..." if len(exact) > 4 else "")
    return (f"note: {len(exact)} layer(s) read one vector per sample ({names_}) and train "
            f"exactly: INSTANT would hold {grams / 1e6:.1f} MB of Grams in a calibration to "
            f"save at most {saved / 1e3:.1f} KB of activations per sample (it pays on layers "
            "over tokens or pixels); to compress them anyway, export with --instant-exclude "
            + (f"'{head}' (this model's head: only it stays exact)" if head else "none"))
