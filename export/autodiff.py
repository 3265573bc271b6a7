"""ONNX-level reverse-mode autodiff: gradient rules from a registry, then named rewrite passes.

``build_training_graphs`` takes a forward graph that already ends in a scalar loss and produces a
*pair* of graphs (docs/memory.md: separate sessions make memory deterministic):

* the forward graph, extended with extra outputs: every forward tensor the backward needs
  ("saved tensors"), compressed activations in ``instant`` mode, and Gram matrices in ``calib``
  mode;
* the backward graph, whose inputs are those saved tensors plus what the runtime feeds anyway
  (trainable parameters, the batch, INSTANT bases), and whose outputs are the parameter gradients
  (and the output-gradient Gram matrices in ``calib`` mode).

Three stages, each with one job:

1. differentiation hints (``export/passes``, phase ``hint``): e.g. the GELU fusion tells the
   differentiator to treat torch's five-op erf GELU as one ``Gelu``;
2. gradient rules (``export/rules``): one pure function per op that emits that op's backward and
   nothing else, looked up in a :class:`Registry` passed in (no import-order dependence);
3. backward passes (``export/passes``, phase ``backward``): memory rewrites of the whole draft
   (bit-packed masks, half-batch masking, ...), in a listed order, each preserving gradients.

Modes: ``vanilla`` (exact backward), ``instant`` (compressed rules for the layers in ``layers``),
``calib`` (exact backward with no parameter gradients, emitting per-layer Gram matrices: the
first calibration, before any bases exist), ``recal`` (the ``instant`` step that also emits the
Gram matrices of the full activations and output gradients: later calibrations run inside
training steps, docs/method.md).

Why one module (~660 lines): the rule registry, the context the rules see and the reverse
sweep that calls them share one contract (which outputs a rule covers, what it may save, where
its nodes go); split, each part would import the others' internals.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from contract import names

from .const_fold import graph_constants
from .graph import NARROW_FLOATS, Builder, ExportError, Shapes, reads
from .layers import CompressedLayer

__all__ = [
    "Draft",
    "GradContext",
    "Registry",
    "Rule",
    "RuleSet",
    "TrainingGraphs",
    "build_training_graphs",
]

MODES = names.MODES

Rule = Callable[["GradContext", onnx.NodeProto, list], list]


class RuleSet:
    """The rules of one module, registered with ``@rules.gradient("Op")``; a duplicate raises."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rules: dict[str, Rule] = {}

    def gradient(self, *ops: str, outputs: int | None = 1) -> Callable[[Rule], Rule]:
        """Register ``fn`` for ``ops``; it differentiates their first ``outputs`` outputs
        (None: all). A float output past those that the model reads on the way to the loss is
        an ``ExportError`` at export: its gradient would be dropped (LayerNormalization's
        Mean and SoftmaxCrossEntropyLoss's log_prob were, before their rules took them)."""
        def register(fn: Rule) -> Rule:
            for op in ops:
                if op in self.rules:
                    raise ValueError(f"gradient rule for op '{op}' registered twice in "
                                     f"{self.name} ({self.rules[op].__name__} and {fn.__name__})")
                self.rules[op] = fn
            fn.grad_outputs = outputs
            return fn

        return register



# integer-quantized arithmetic (dynamic or QOperator quantization): no gradient passes it
_QUANTIZED_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                            "QLinearMatMul", "QLinearConv", "QuantizeLinear",
                            "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
                            "QLinearAdd", "QLinearMul"})
# piecewise-constant ops: their rules pass no gradient (zero almost everywhere)
_ZERO_GRADIENT = frozenset({"Sign", "Floor", "Ceil", "Round"})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})


def _stops_after(g: onnx.GraphProto, p: str, stopped: list[onnx.NodeProto]) -> list[str]:
    """The zero-gradient nodes of ``stopped`` that read ``p`` (through the nodes after it),
    named: one forward walk over the graph (its nodes in topological order)."""
    reach = {p}
    for n in g.node:
        if any(i in reach for i in n.input):
            reach.update(n.output)
    return [f"{n.op_type} node '{n.name}'" for n in stopped
            if any(i in reach for i in n.input)]


def _check_outputs_covered(ctx, node: onnx.NodeProto, rule: Rule, gouts: list) -> None:
    """Raises ``ExportError`` where a float output of ``node`` past those ``rule`` covers
    (``RuleSet.gradient``'s ``outputs``) carries a gradient."""
    covered = getattr(rule, "grad_outputs", 1)
    if covered is None:
        return
    for i in range(covered, len(gouts)):
        if gouts[i] is not None and ctx.shapes.is_float(node.output[i]):
            raise ExportError(
                f"node '{node.name}' ({node.op_type}): the model reads its output {i} "
                f"('{node.output[i]}') on the way to the loss, and the gradient rule of "
                f"{node.op_type} covers its first {covered} output(s) only; freeze the layers "
                "up to this node (--trainable), or add the rule in export/rules/")


class Registry:
    """Op type -> gradient rule, built from explicit rule sets. A second rule for an op raises."""

    def __init__(self, sets: Iterable[RuleSet] = ()) -> None:
        self._rules: dict[str, tuple[Rule, str]] = {}
        for s in sets:
            for op, fn in s.rules.items():
                self.add(op, fn, s.name)

    def add(self, op: str, fn: Rule, origin: str = "?") -> None:
        if op in self._rules:
            raise ValueError(f"gradient rule for op '{op}' registered twice "
                             f"({self._rules[op][1]} and {origin})")
        self._rules[op] = (fn, origin)

    def get(self, op: str) -> Rule | None:
        hit = self._rules.get(op)
        return hit[0] if hit else None

    def ops(self) -> list[str]:
        return sorted(self._rules)

    def __contains__(self, op: str) -> bool:
        return op in self._rules


class GradContext:
    """What a gradient rule may use: the two builders, shapes, constants and the layer being
    compressed. Rules only append nodes; they never inspect or rewrite other rules' nodes."""

    def __init__(self, shapes: Shapes, mode: str, fwd: Builder, bwd: Builder,
                 requires_grad: set[str], params: set[str], param_grads: bool,
                 layers: dict[str, CompressedLayer], constants: dict[str, np.ndarray],
                 compress_saved: bool = False, opset: int = 17,
                 padding_rows: dict[str, int] | None = None) -> None:
        self.shapes = shapes
        # embedding table -> the row whose lookups carry no gradient (nn.Embedding's
        # padding_idx; rules/shape.py: gather_grad)
        self.padding_rows = padding_rows or {}
        self.mode = mode
        # the compressed variants of the rules that save activations (int8 with per-row
        # scales, ``rules/common.py: saved``): instant mode only, when the export asks for it
        self.compress_saved = compress_saved and mode in ("instant", "recal")
        self.opset = opset
        self.saved_cache: dict[str, str] = {}
        # forward tensors built once for the layers that share an activation basis (the same x
        # read the same way, export/layers.py: share_activation_bases): x̂ and its Gram
        self.shared_x: dict[tuple[str, str, str], str] = {}
        self.graph_inputs: set[str] = set()
        self.fwd = fwd
        self.bwd = bwd
        self._requires = requires_grad
        self._params = params
        self._param_grads = param_grads
        self._layers = layers
        self._shape_cache: dict[str, str] = {}
        self.constants = constants
        self.fwd_outputs: list[str] = []  # extra forward outputs (calibration Grams)
        self.bwd_outputs: list[str] = []  # extra backward outputs (calibration Grams)
        # If output -> the one batch-major tensor its branches read, where running the If on two
        # halves of that tensor's batch gives the two halves of its result (declared by the
        # rule that built it: passes/half_batch_mask.py splits such an If per half-batch)
        self.batch_separable: dict[str, str] = {}

    def constant_value(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise ExportError(f"tensor '{name}' must be a constant (initializer or Constant node)")
        return self.constants[name]

    def needs_grad(self, name: str) -> bool:
        if name not in self._requires:
            return False
        return self._param_grads or name not in self._params

    def layer(self, node: onnx.NodeProto) -> CompressedLayer | None:
        """The compressed layer computed by ``node`` (None in vanilla mode or for other nodes)."""
        if self.mode == "vanilla":
            return None
        return self._layers.get(node.name)

    def shape(self, name: str) -> str:
        """The runtime shape of forward tensor ``name``, usable in the backward.

        Static shapes become constants; a shape with a symbolic dim is taken by a ``Shape`` node in
        the forward graph (an int64 vector: the only thing saved, never the tensor itself).
        """
        dims = self.shapes.of(name)
        if all(isinstance(d, int) for d in dims):
            return self.bwd.ints(dims)
        if name not in self._shape_cache:
            self._shape_cache[name] = self.fwd.op("Shape", [name], hint="shape")
        return self._shape_cache[name]


@dataclass
class TrainingGraphs:
    forward: onnx.ModelProto
    backward: onnx.ModelProto
    saved: list[str] = field(default_factory=list)
    grads: dict[str, str] = field(default_factory=dict)  # param -> backward output name
    fwd_grams: dict[str, str] = field(default_factory=dict)  # layer -> forward output
    bwd_grams: dict[str, str] = field(default_factory=dict)  # layer -> backward output


class Draft:
    """The forward graph, its extra forward nodes and the backward nodes, between autodiff and
    the final split: what the backward passes rewrite.

    ``notes`` carries facts one pass leaves for a later one (documented by the pass that writes
    them), so no pass has to re-derive another's structure from node names.
    """

    def __init__(self, graph: onnx.GraphProto, shapes: Shapes, fwd: Builder, bwd: Builder,
                 mode: str, opset: int, ir_version: int,
                 extra_inputs: dict[str, onnx.ValueInfoProto]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.fwd = fwd
        self.bwd = bwd
        self.mode = mode
        self.opset = opset
        self.ir_version = ir_version
        self.extra_inputs = extra_inputs
        self.notes: dict[str, dict] = {}
        self.protected: set[str] = set()  # backward outputs (Grams, gradients): never removed

    # ---------------------------------------------------------------- structure queries
    def forward_produced(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in list(self.graph.node) + self.fwd.nodes for o in n.output if o}

    def graph_inputs(self) -> set[str]:
        return {i.name for i in self.graph.input} | {t.name for t in self.graph.initializer}

    def bwd_producers(self) -> dict[str, onnx.NodeProto]:
        """Each backward output's node, now (a pass over every node looks its inputs up here:
        :meth:`bwd_producer` scans the list, and per node that was quadratic — an LSTM over 100
        steps spent 50 s of its 61 s export there, over 400 steps more than 9 minutes)."""
        return {o: n for n in self.bwd.nodes for o in n.output if o}

    def bwd_producer(self, name: str) -> onnx.NodeProto | None:
        for n in self.bwd.nodes:
            if name in n.output:
                return n
        return None

    def bwd_consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.bwd.nodes if name in reads(n)]

    def bwd_constant(self, name: str) -> np.ndarray | None:
        for t in self.bwd.initializers:
            if t.name == name:
                return numpy_helper.to_array(t)
        return None

    def forward_order(self) -> dict[str, int]:
        """Position of each forward node (original graph order) by name."""
        return {n.name: i for i, n in enumerate(self.graph.node)}

    # ---------------------------------------------------------------- rewriting
    def fwd_op(self, anchor: str | None, op_type: str, inputs: Sequence[str], **kw) -> str:
        """Add a forward node placed right after forward node ``anchor`` (None: at the end)."""
        self.fwd.anchor = anchor
        return self.fwd.op(op_type, inputs, **kw)

    def replace_bwd(self, old: Sequence[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
        """Put ``new`` where the first of ``old`` stood and drop ``old`` (keeps topological order
        when ``new`` only reads what was available to the first old node)."""
        at = min(self.bwd.nodes.index(n) for n in old)
        for n in old:
            self.bwd.nodes.remove(n)
        self.bwd.nodes[at:at] = new

    def take_new_bwd(self, start: int) -> list[onnx.NodeProto]:
        """Detach the backward nodes appended since ``len(bwd.nodes) == start`` (to splice them
        elsewhere with :meth:`replace_bwd`)."""
        new = self.bwd.nodes[start:]
        del self.bwd.nodes[start:]
        return new

    def drop_dead_bwd(self) -> None:
        """Remove backward nodes whose outputs nobody reads (after a rewrite orphaned them)."""
        while True:
            used = {i for n in self.bwd.nodes for i in reads(n)} | self.protected
            dead = [n for n in self.bwd.nodes if not any(o in used for o in n.output if o)]
            if not dead:
                return
            for n in dead:
                self.bwd.nodes.remove(n)

    # ---------------------------------------------------------------- shapes of the draft
    def backward_shapes(self) -> Shapes:
        """ONNX shape inference over forward + extras + backward as one graph (for passes that
        need a backward tensor's rank or batch dimension)."""
        g = onnx.GraphProto()
        g.CopyFrom(self.graph)
        g.node.extend(self.fwd.nodes)
        g.node.extend(self.bwd.nodes)
        g.initializer.extend(self.fwd.initializers)
        g.initializer.extend(self.bwd.initializers)
        have = {i.name for i in g.input}
        g.input.extend(v for k, v in self.extra_inputs.items() if k not in have)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = self.ir_version
        return Shapes(m)


@dataclass(frozen=True)
class Pass:
    """A named graph rewrite. ``phase`` ``hint`` runs on the forward graph before differentiation
    and returns {node name: the node autodiff should differentiate instead}; ``backward`` runs on
    the :class:`Draft` after every rule and rewrites it in place."""

    name: str
    phase: str  # "hint" | "backward"
    run: Callable


def _reads(node: onnx.NodeProto) -> list[str]:
    """A node's inputs and the outer tensors its branches / bodies read (an If's branches read
    the data they pass on by name, not as inputs)."""
    out = list(node.input)
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            for n in sub.node:
                out.extend(_reads(n))
    return out


def _requires_grad(graph: onnx.GraphProto, shapes: Shapes, roots: set[str]) -> set[str]:
    req = set(roots)
    for node in graph.node:
        if any(i in req for i in _reads(node) if i):
            for o in node.output:
                if o and shapes.is_float(o):
                    req.add(o)
    return req


def build_training_graphs(fwd_model: onnx.ModelProto, loss: str, params: list[str],
                          mode: str, layers: list[CompressedLayer], opset: int,
                          registry: Registry | None = None,
                          passes: Sequence[Pass] | None = None,
                          compress_saved: bool = False,
                          padding_rows: dict[str, int] | None = None) -> TrainingGraphs:
    """Differentiate ``loss`` w.r.t. ``params`` and split into forward and backward graphs.

    ``registry`` defaults to every rule in ``export/rules``; ``passes`` to ``export.passes.PASSES``
    (pass ``[]`` for the plain rules, e.g. to test that a pass preserves gradients).

    Raises:
        ExportError: an op without a gradient rule (naming node, op and the supported ops).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if registry is None:
        from .rules import default_registry

        registry = default_registry()
    if passes is None:
        from .passes import PASSES

        passes = PASSES
    fwd_model = copy.deepcopy(fwd_model)  # rules may extend forward nodes (MaxPool indices)
    g = fwd_model.graph
    shapes = Shapes(fwd_model)
    param_set = set(params)
    fwd, bwd = Builder("fwd"), Builder("grad")
    by_node = {ly.node: ly for ly in layers} if mode != "vanilla" else {}
    ctx = GradContext(shapes, mode, fwd, bwd, _requires_grad(g, shapes, param_set), param_set,
                      param_grads=(mode != "calib"), layers=by_node, constants=graph_constants(g, opset),
                      compress_saved=compress_saved, opset=opset, padding_rows=padding_rows)
    ctx.graph_inputs = {i.name for i in g.input}

    substitute: dict[str, onnx.NodeProto] = {}
    for p in passes:
        if p.phase == "hint":
            substitute.update(p.run(g, ctx.constants))

    # The backward's seed dL/dloss is a graph input in the training modes: the runtime feeds each
    # micro-batch's share of the batch (m / n), so gradients arrive already weighted.
    seed = names.LOSS_SCALE if mode != "calib" else bwd.const(1.0)
    contrib: dict[str, list[str]] = {loss: [seed]}
    stopped: list[onnx.NodeProto] = []  # nodes whose rule passes no gradient to an input
    narrow: str | None = None
    for node in reversed(list(g.node)):
        node = substitute.get(node.name, node)
        if not any(o in contrib for o in node.output):
            continue
        if not any(ctx.needs_grad(i) for i in _reads(node) if i) and not (
                mode == "calib" and node.name in by_node):  # calib still wants its Grams
            continue
        narrow = narrow or _narrow_at(ctx, node)
        rule = registry.get(node.op_type)
        if rule is None and node.op_type in ("If", "Loop", "Scan"):
            raise ExportError(
                f"node '{node.name}' is an ONNX {node.op_type} (control flow that depends on "
                "the data) between a trainable parameter and the loss, and the backward does "
                "not differentiate control flow; freeze the layers up to and including it "
                "(--trainable), or write that part of the model without a data-dependent "
                "branch or loop")
        if rule is None and node.op_type in _QUANTIZED_OPS:  # (a session 44 probe: told
            raise ExportError(  # to freeze the layers; quantize_dynamic's file)
                f"node '{node.name}' is an ONNX {node.op_type}: the model was quantized "
                "(e.g. by onnxruntime's quantize_dynamic), and quantized integer arithmetic has "
                "no gradient; export the model before quantizing it")
        if rule is None and node.op_type in _RANDOM_OPS:  # (a session 45 probe's randn_like
            raise ExportError(  # was told to freeze layers or add a rule)
                f"node '{node.name}' is an ONNX {node.op_type}: the model draws random numbers "
                "in its forward (torch.randn_like, rand, bernoulli, ...), which a training "
                "bundle does not replay (its backward and a resumed run would see other draws); "
                "take the randomness out of the model (e.g. add the noise to the data), or "
                "freeze the layers up to and including it (--trainable)")
        if rule is None:
            raise ExportError(
                f"no gradient rule for op '{node.op_type}' at node '{node.name}'; supported: "
                f"{', '.join(registry.ops())}. Freeze the layers up to and including this node "
                "(--trainable) or add a rule in export/rules/")
        gouts = [_sum_grads(bwd, contrib.pop(o)) if o in contrib else None for o in node.output]
        _check_outputs_covered(ctx, node, rule, gouts)
        fwd.anchor = node.name
        try:
            gins = rule(ctx, node, gouts)
        except ExportError as exc:
            if "must be a constant" not in str(exc):
                raise
            raise ExportError(
                f"{exc} at {node.op_type} node '{node.name}', between a trainable parameter "
                "and the loss: its gradient needs that input fixed at export, but the graph "
                "computes it (a slice or shape read from a tensor, e.g. W[:, :6] of a "
                "parameter); write it with Python constants, freeze the layers up to that "
                "node (--trainable), or export the .onnx with constant folding on") from None
        if len(gins) != len(node.input):
            raise AssertionError(f"rule for {node.op_type} returned {len(gins)} grads "
                                 f"for {len(node.input)} inputs")
        for inp, gi in zip(node.input, gins, strict=True):
            if gi is not None and ctx.needs_grad(inp):
                contrib.setdefault(inp, []).append(gi)
            elif gi is None and ctx.needs_grad(inp) and node.op_type in _ZERO_GRADIENT:
                stopped.append(node)

    extra: dict[str, onnx.ValueInfoProto] = {}
    grads: dict[str, str] = {}
    if mode != "calib":
        extra[names.LOSS_SCALE] = helper.make_tensor_value_info(names.LOSS_SCALE,
                                                                onnx.TensorProto.FLOAT, [])
        for p in params:
            if p not in contrib:  # (a session 48 probe: "remove it from --trainable", not
                # given, where a Round between it and the loss passes no gradient)
                stops = _stops_after(g, p, stopped) if stopped else []
                why = "" if not stops else (
                    f": its gradient stops at {', '.join(stops[:3])}"
                    f"{' (and more)' if len(stops) > 3 else ''}, whose derivative is zero; "
                    "replace such an op by a differentiable one (e.g. a straight-through "
                    "estimator), or")
                raise ExportError(f"trainable parameter '{p}' does not reach the loss{why or ';'}"
                                  " leave it out of --trainable (all | last:N | globs of the "
                                  "parameters to train)")
            grads[p] = _sum_grads(bwd, contrib.pop(p))
    for ly in layers:
        if mode in ("instant", "recal"):
            for name, dim, rank in ((ly.p_input, ly.x_dim, "rank_x"),
                                    (ly.q_input, ly.g_dim, "rank_g")):
                extra.setdefault(name, helper.make_tensor_value_info(
                    name, onnx.TensorProto.FLOAT, [f"{rank}.{ly.name}", dim]))

    draft = Draft(g, shapes, fwd, bwd, mode, opset, int(fwd_model.ir_version), extra)
    draft.protected = set(grads.values()) | set(ctx.bwd_outputs)
    draft.notes["batch_separable"] = dict(ctx.batch_separable)
    for p in passes:
        if p.phase == "backward":
            p.run(draft)
    draft.drop_dead_bwd()

    # Accumulate in the graph: grad = acc + this micro-batch's gradient. The runtime binds the
    # output to the acc input's own buffer, so a step holds one gradient buffer per parameter, not
    # two, and each fresh gradient dies as soon as it is added.
    outs: dict[str, str] = {}
    made = {o: n for n in bwd.nodes for o in n.output}
    read = {i for n in bwd.nodes for i in reads(n)}
    for p, gp in grads.items():
        acc, out = f"{names.GRAD_ACC}{p}", f"{names.GRAD}{p}"
        dtype = shapes.dtype.get(p, onnx.TensorProto.FLOAT)
        extra[acc] = helper.make_tensor_value_info(acc, dtype, list(shapes.shape[p]))
        if not _scatter_into(made, read, gp, acc, out):
            bwd.nodes.append(helper.make_node("Add", [acc, gp], [out], name=f"grad_out_{p}"))
        outs[p] = out
    draft.protected = set(outs.values()) | set(ctx.bwd_outputs)
    draft.drop_dead_bwd()
    tg = _split(fwd_model, fwd, bwd, ctx, outs, opset, mode, extra)
    if narrow is not None:
        _check_narrow(tg, narrow)
    return tg


def _narrow_at(ctx: GradContext, node: onnx.NodeProto) -> str | None:
    """Where a node other than a Cast computes in float16/bfloat16/float64 between a trainable
    parameter and the loss: what to say if the graphs built for it do not load (None if not)."""
    if node.op_type == "Cast":
        return None
    for name in _reads(node):
        kind = name and NARROW_FLOATS.get(ctx.shapes.dtype.get(name, onnx.TensorProto.FLOAT))
        if kind and ctx.needs_grad(name):
            return (f"the model computes in {kind} between a trainable parameter and the loss "
                    f"(at node '{node.name}', {node.op_type}, and maybe others), and the backward "
                    "built for it in float32 does not load")
    return None


def _check_narrow(tg: TrainingGraphs, narrow: str) -> None:
    """The backward is built in float32: a rule whose backward mixes float32 constants with a
    float16 tensor (Relu's, Tanh's: ``.half()`` or autocast inside forward) makes graphs
    onnxruntime refuses, found at the first step after an export that said nothing (session 35
    probe). Loaded here where a node computes in another float type (a Mul or MatMul in
    float64 builds graphs that load and train: kept)."""
    from .any_length import ort_session

    for m in (tg.forward, tg.backward):
        try:
            ort_session(m)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal, named below
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ExportError(f"{narrow} (onnxruntime: {first}); export the model in float32 "
                              "(torch: model.float(), no .half() or autocast inside forward), "
                              "or freeze the layers up to and including that node "
                              "(--trainable)") from None


def _scatter_into(made: dict[str, onnx.NodeProto], read: set[str], gp: str, acc: str,
                  out: str) -> bool:
    """A gradient that is ScatterND(add) of rows into zeros (an embedding table's: the Gather
    rule) scatters them into the accumulator itself: ``out = ScatterND(acc, rows, g)``. Adding
    it to ``acc`` held two table-sized arena buffers in every backward pass, the zeros and the
    scattered copy (a 102 MB table: the step's arena 393 MB at micro-batch 32; session 28).
    ``made``: the backward's nodes by output, ``read``: the names its nodes read. Returns
    whether ``gp``'s node was rewritten (then nothing else may read ``gp``)."""
    node = made.get(gp)
    if node is None or node.op_type != "ScatterND" or next(
            (a.s for a in node.attribute if a.name == "reduction"), b"none") != b"add":
        return False
    base = made.get(node.input[0])
    if base is None or base.op_type != "ConstantOfShape" or any(
            a.name == "value" and numpy_helper.to_array(a.t).any() for a in base.attribute):
        return False  # (ConstantOfShape without a value makes float zeros)
    if gp in read:
        return False
    node.input[0] = acc
    node.output[0] = out
    return True


def _sum_grads(bwd: Builder, terms: list[str]) -> str:
    acc = terms[0]
    for t in terms[1:]:
        acc = bwd.op("Add", [acc, t], hint="gsum")
    return acc


def _split(fwd_model, fwd: Builder, bwd: Builder, ctx: GradContext,
           grads: dict[str, str], opset: int, mode: str,
           extra: dict[str, onnx.ValueInfoProto]) -> TrainingGraphs:
    g = fwd_model.graph
    produced_bwd = {o for n in bwd.nodes for o in n.output} | {i.name for i in bwd.initializers}
    fwd_inputs = {i.name: i for i in g.input}
    fwd_inits = {i.name: i for i in g.initializer}
    fwd_produced = {o for n in list(g.node) + fwd.nodes for o in n.output}

    bwd_inputs: list[onnx.ValueInfoProto] = []
    bwd_inits: list[onnx.TensorProto] = list(bwd.initializers)
    saved: list[str] = []
    seen: set[str] = set()
    for n in bwd.nodes:
        for name in reads(n):
            if not name or name in produced_bwd or name in seen:
                continue
            seen.add(name)
            if name in extra:
                bwd_inputs.append(extra[name])
            elif name in fwd_inputs:
                bwd_inputs.append(fwd_inputs[name])
            elif name in fwd_inits:
                bwd_inits.append(fwd_inits[name])
            elif name in fwd_produced:
                saved.append(name)
            else:
                raise AssertionError(f"backward reads unknown tensor {name!r}")

    fg = onnx.GraphProto()
    fg.CopyFrom(g)
    # Place each forward extra right after the node whose rule made it (docs/memory.md: a
    # compression node scheduled late keeps the full activation alive).
    extras: dict[str | None, list[onnx.NodeProto]] = {}
    for n, anchor in zip(fwd.nodes, fwd.anchors, strict=True):
        extras.setdefault(anchor, []).append(n)
    del fg.node[:]
    for n in g.node:
        fg.node.append(n)
        fg.node.extend(extras.pop(n.name, []))
    for rest in extras.values():
        fg.node.extend(rest)
    fg.initializer.extend(fwd.initializers)
    f_model = helper.make_model(fg, opset_imports=[helper.make_opsetid("", opset)],
                                producer_name="instant-runtime-export")
    f_model.ir_version = fwd_model.ir_version
    typed = Shapes(f_model)

    def vi(name: str) -> onnx.ValueInfoProto:
        dims = typed.shape.get(name)
        dtype = typed.dtype.get(name, onnx.TensorProto.FLOAT)
        return helper.make_tensor_value_info(
            name, dtype, None if dims is None else [d if d is not None else "?" for d in dims])

    saved_vi = [vi(s) for s in saved]
    already = {o.name for o in f_model.graph.output}
    f_model.graph.output.extend(v for v in saved_vi if v.name not in already)
    fwd_grams: dict[str, str] = {}
    for name in ctx.fwd_outputs:
        f_model.graph.output.append(vi(name))
        fwd_grams[name[len(names.GRAM_X):]] = name

    bg = helper.make_graph(bwd.nodes, f"{g.name or 'model'}_backward_{mode}",
                           bwd_inputs + saved_vi, [], initializer=bwd_inits)
    b_model = helper.make_model(bg, opset_imports=[helper.make_opsetid("", opset)],
                                producer_name="instant-runtime-export")
    b_model.ir_version = fwd_model.ir_version
    btyped = Shapes(b_model)
    bwd_grams: dict[str, str] = {}
    for out in list(grads.values()) + ctx.bwd_outputs:
        dims = btyped.shape.get(out)
        b_model.graph.output.append(helper.make_tensor_value_info(
            out, onnx.TensorProto.FLOAT,
            None if dims is None else [d if d is not None else "?" for d in dims]))
    for name in ctx.bwd_outputs:
        bwd_grams[name[len(names.GRAM_G):]] = name
    return TrainingGraphs(f_model, b_model, saved, grads, fwd_grams, bwd_grams)
