"""Write a training bundle: standard-op ONNX graphs, weights and a manifest.

Layout of a bundle directory (``contract.FORMAT_VERSION``; the manifest's schema is
``contract/manifest.py``)::

    manifest.json              what the runtime needs: inputs, labels, params, graphs, layers
    weights.bin                frozen weights as ONNX external data (memory-mapped by onnxruntime)
    params.npz                 initial values of the trainable parameters
    infer.onnx                 forward only (model outputs), trainable params as inputs
    vanilla.{forward,backward}.onnx   exact backward
    instant.{forward,backward}.onnx   INSTANT compressed backward (bases are inputs)
    calib.{forward,backward}.onnx     exact pass emitting Gram matrices (first calibration)
    recal.{forward,backward}.onnx     INSTANT step that also emits Gram matrices (recalibration)

Why one module (~550 lines): ``export_bundle`` runs the export's steps in order on one traced
model, its shapes, index bounds, layers and notes; its graph helpers are the ones it calls.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from contract import (
    FORMAT,
    FORMAT_VERSION,
    FileEntry,
    GraphFiles,
    GraphIO,
    InstantSettings,
    InstantSpec,
    LayerInfo,
    Lookup,
    Manifest,
    ParamSpec,
    PrefixSpec,
    TensorSpec,
    WeightEntry,
    file_sha256,
    manifest_json,
    names,
)
from contract.schema import load as load_typed

from .autodiff import build_training_graphs
from .batch_rows import check_rows_kept, mixes_rows
from .fold_frozen import fold_frozen_batchnorm
from .grad_stops import check_gradient_stops
from .graph import ExportError, Shapes, forward_flops, lowest_ir_version, reads
from .layers import (
    CompressedLayer,
    find_compressible_layers,
    mask_padding,
    share_activation_bases,
)
from .losses import append_loss
from .model_inputs import examples as _examples
from .onnx_import import padding_rows_note
from .shape_fold import annotate_measured_shapes, check_free_batch
from .tracing import load_model
from .trainable import (
    buffer_note,
    check_derived,
    fresh_norms_note,
    mask_like,
    select_trainable,
    selected_by,
)

__all__ = ["export_bundle", "select_trainable"]

MIN_ORT = "1.17"
_EXTERNAL_MIN_BYTES = 1024
LOOKUP_MIN_BYTES = 1 << 20  # frozen embedding tables this large are read by the runtime


def _params_as_inputs(model: onnx.ModelProto, params: list[str]) -> dict[str, np.ndarray]:
    g = model.graph
    values = {}
    keep = []
    for init in g.initializer:
        if init.name in params:
            arr = numpy_helper.to_array(init).astype(np.float32)
            values[init.name] = arr
            g.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT,
                                                         list(arr.shape)))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    return values


def _dynamic_batch(model: onnx.ModelProto, names: list[str]) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in names and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            d.ClearField("dim_value")
            d.dim_param = "N"


def _prune_unused_inputs(model: onnx.ModelProto, keep: set[str]) -> None:
    used = {i for n in model.graph.node for i in reads(n)}
    inputs = [vi for vi in model.graph.input if vi.name in used or vi.name in keep]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _add_basis_inputs(model: onnx.ModelProto, layers: list[CompressedLayer]) -> None:
    shared: set[str] = set()
    for ly in layers:
        if ly.p_input not in shared:  # one input for the layers that share a basis
            shared.add(ly.p_input)
            model.graph.input.append(helper.make_tensor_value_info(
                ly.p_input, TensorProto.FLOAT, [f"rank_x.{ly.name}", ly.x_dim]))
        model.graph.input.append(helper.make_tensor_value_info(
            ly.q_input, TensorProto.FLOAT, [f"rank_g.{ly.name}", ly.g_dim]))



def _index_bounds(model: onnx.ModelProto, inputs: list[str]) -> dict[str, int]:
    """Integer inputs that index an embedding table (``Gather`` axis 0 of an initializer, maybe
    through a ``Cast``): the smallest table's rows."""
    rows = {i.name: int(i.dims[0]) for i in model.graph.initializer if len(i.dims) >= 1}
    origin = {i: i for i in inputs}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
    out: dict[str, int] = {}
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (node.op_type == "Gather" and axis == 0 and len(node.input) > 1
                and node.input[1] in origin and node.input[0] in rows):
            src = origin[node.input[1]]
            out[src] = min(out.get(src, rows[node.input[0]]), rows[node.input[0]])
    return out


def _split_lookups(model: onnx.ModelProto, data_inputs: set[str],
                   weights: _WeightFile) -> dict[str, dict]:
    """Take large frozen embedding lookups out of the graph: the runtime reads the rows.

    A ``Gather`` (axis 0) of a frozen table of at least ``LOOKUP_MIN_BYTES`` by a data input
    (token ids) becomes a graph input of the same name; the table goes to ``weights.bin`` and
    the runtime fills the input with ``pread`` of the rows the batch uses. Through a memory map
    the same lookup would fault in far more than those rows: the kernel maps 64 KB around each
    fault, which for MiniLM's 47 MB word-embedding table and a batch of 1,024 random tokens is
    nearly the whole table (measured 71 MB of ``weights.bin`` resident instead of 28).
    Returns {graph input: {"table", "indices"}} for the manifest.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ins = {vi.name: vi for vi in g.input}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    lookups: dict[str, dict] = {}
    keep = []
    for n in g.node:
        table = inits.get(n.input[0]) if n.op_type == "Gather" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        big = table is not None and int(np.prod(table.dims)) * 4 >= LOOKUP_MIN_BYTES
        if not (big and axis == 0 and table.data_type == TensorProto.FLOAT
                and n.input[1] in data_inputs and n.input[1] in ins):
            keep.append(n)
            continue
        ids = [d.dim_param or d.dim_value for d in ins[n.input[1]].type.tensor_type.shape.dim]
        g.input.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT,
                                                     ids + list(table.dims[1:])))
        weights.add(table)
        uses[table.name] -= 1
        lookups[n.output[0]] = {"table": table.name, "indices": n.input[1]}
    del g.node[:]
    g.node.extend(keep)
    gone = {t for t, k in uses.items() if k == 0 and t in inits}
    rest = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(rest)
    return lookups


class _WeightFile:
    """Frozen initializers shared by all graphs, stored once in ``weights.bin``."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offsets: dict[str, tuple[int, int]] = {}
        self.tensors: dict[str, dict] = {}  # name -> offset, length, shape, dtype (manifest)
        self.size = 0

    def add(self, t: onnx.TensorProto, raw: bytes | None = None) -> tuple[int, int]:
        """Store ``t`` once (page-aligned: onnxruntime can memory-map it); (offset, length)."""
        if t.name not in self.offsets:
            raw = numpy_helper.to_array(t).tobytes() if raw is None else raw
            pad = (-self.size) % 4096
            self.chunks.append(b"\0" * pad)
            self.size += pad
            self.offsets[t.name] = (self.size, len(raw))
            self.tensors[t.name] = {"offset": self.size, "length": len(raw),
                                    "shape": list(t.dims), "dtype": _np_dtype(t.data_type)}
            self.chunks.append(raw)
            self.size += len(raw)
        return self.offsets[t.name]

    def array(self, name: str) -> np.ndarray:
        """A stored tensor's values (a copy of its bytes)."""
        t = self.tensors[name]
        off = 0
        for c in self.chunks:
            if off <= t["offset"] < off + len(c):
                raw = c[t["offset"] - off:t["offset"] - off + t["length"]]
                return np.frombuffer(raw, np.dtype(t["dtype"])).reshape(t["shape"])
            off += len(c)
        raise KeyError(name)

    def externalize(self, model: onnx.ModelProto) -> list[str]:
        """Move ``model``'s large initializers to weights.bin; returns their names."""
        names = []
        for t in model.graph.initializer:
            if t.data_type != TensorProto.FLOAT:  # weights; index and shape constants (an
                continue                          # unrolled GRU's 128 split sizes) stay inline
            raw = numpy_helper.to_array(t).tobytes()
            if len(raw) < _EXTERNAL_MIN_BYTES:
                continue
            off, length = self.add(t, raw)
            for f in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)
            t.raw_data = raw  # set_external_data refuses a tensor without raw_data
            external_data_helper.set_external_data(t, "weights.bin", offset=off, length=length)
            t.ClearField("raw_data")
            names.append(t.name)
        return names

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            for c in self.chunks:
                f.write(c)


def export_bundle(model: str, out: str | Path, **options) -> Path:
    """Export ``model`` to a training bundle in ``out`` (:func:`_export_bundle`); an ONNX file
    whose shapes ONNX cannot infer and that onnxruntime cannot load either is refused with
    onnxruntime's reason (a session 44 probe: a Gather of float indices was told to pass
    --input-shape, which it had).

    Raises:
        ExportError: unknown model, unsupported op or option (one-line message).
    """
    try:
        return _export_bundle(model, out, **options)
    except ExportError as exc:
        if "unknown after ONNX shape inference" not in str(exc) or \
                not str(model).endswith(".onnx"):
            raise
        import onnxruntime as ort

        from contract.errors import ort_message

        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4
            ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as bad:  # noqa: BLE001 - onnxruntime raises several types
            raise ExportError(f"onnxruntime cannot load '{model}' either: "
                              f"{ort_message(bad, 300)}; the file is not a valid ONNX model: "
                              "export the model to ONNX again") from None
        raise


def _export_bundle(model: str, out: str | Path, *, input_shape: str | None = None,
                  npz: str | None = None, trainable: str = "all", loss: str = "cross_entropy",
                  instant_exclude: list[str] | None = None,
                  settings: InstantSettings | None = None, output: str | None = None,
                  head: int | None = None, pool: str | None = None,
                  tokenizer: str | Path | None = None, image_mean: list[float] | None = None,
                  image_std: list[float] | None = None,
                  class_names: list[str] | None = None, saved_int8: bool = False,
                  split: bool = True, lengths: list[int] | None = None,
                  class_axis: str = "auto",
                  notes: list[str] | None = None) -> Path:
    """Export ``model`` to a training bundle in ``out``; returns the bundle path.

    ``settings`` are the INSTANT defaults recorded in the bundle (ε, oversampling, calibration
    schedule); None: ``contract.InstantSettings()``. ``output`` picks one of several model
    outputs; ``head`` appends a new ``head``-class classifier after ``pool``ing it
    (``export/heads.py``; mean, cls or none, default mean); ``tokenizer`` (a tokenizer.json) is copied into the bundle for text
    models (automatic for the built-in text models); ``image_mean``/``image_std`` record how
    image files are normalised for an image model.
    ``split`` (default True): a text model whose frozen prefix takes any length gets it as a
    graph of its own, run without padding (``export/prefix.py``); False keeps the training
    graphs whole (for comparisons).
    ``lengths``: for a text model that takes any length, the shorter token lengths the training
    graphs are also built at (``export/lengths.py``); None: L/2 and 3L/4; [] none.
    ``notes``: where given, gets a line per thing the user should know about the bundle (the
    torch parameters that have no tensor of their own in the graph, so stay frozen).

    Raises:
        ExportError: unknown model, unsupported op or option (one-line message).
    """
    from .heads import add_head, image_spec, text_spec
    from .models import BUILTIN_MODELS

    out = Path(out)
    settings = settings or InstantSettings()
    example, example_labels, example_names = _examples(input_shape, npz)
    # a built-in model gets a head of as many classes as --classes names (session 34 probe:
    # minilm-l6 was 2 classes only, and --head 10 on it classified its 2 logits)
    traced = load_model(model, example, output, example_names,
                        len(class_names) if class_names and head is None
                        and model in BUILTIN_MODELS and loss == "cross_entropy" else None)
    check_free_batch(traced)
    head_params, inverted = [], None  # the new classifier's weight and bias
    if head is not None:
        pool = pool or "mean"
        if pool == "mean":
            from .padding import mask_marks_padding

            inverted = mask_marks_padding(traced, Shapes(traced.model), _index_bounds(
                traced.model, traced.inputs), _dynamic_batch)
            if inverted is not None and notes is not None:
                notes.append(f"note: input '{inverted}' marks the padding with 1 (checked: the "
                             "outputs at the other positions ignore those tokens); --pool mean "
                             "averages the tokens where it is 0")
        if head == 1 and loss == "cross_entropy":
            raise ExportError("--head 1: a classifier needs at least 2 classes; a head of one "
                              "output is a regressor (--loss mse) or a binary one (--loss bce)")
        prefix = add_head(traced, head, pool, inverted).split("/")[0]
        head_params = [f"{prefix}.weight", f"{prefix}.bias"]
    elif pool is not None:
        raise ExportError(f"--pool {pool} applies to a new classifier: pass --head CLASSES too, "
                          "or leave --pool out")
    builtin = BUILTIN_MODELS.get(model)
    if tokenizer is None and builtin is not None and builtin.tokenizer is not None:
        tokenizer = builtin.tokenizer()
    if builtin is not None and class_names is None:
        class_names = builtin.class_names
    params = select_trainable(traced, trainable)
    check_derived(traced, params)
    check_gradient_stops(traced, params)
    frozen = [p for p in traced.unmapped if selected_by(traced, trainable, p)]
    if notes is not None:
        notes.extend(traced.notes)
    if frozen and notes is not None:
        shown = ", ".join(frozen[:6]) + (" …" if len(frozen) > 6 else "")
        notes.append(f"note: {len(frozen)} torch parameters have no tensor of their own in the "
                     f"exported graph and stay frozen ({shown}): the forward does not use them, "
                     "or torch's exporter folded them into a computed constant")
    masks = mask_like(traced.model, params) if not traced.from_torch else []
    if masks and notes is not None:
        notes.append(f"note: {', '.join(masks[:4])}{' …' if len(masks) > 4 else ''} hold(s) only "
                     "0s and 1s and multiply another trainable tensor: a mask (a buffer in "
                     "torch), which an .onnx file cannot tell from a weight; it trains unless "
                     "left out: pass --trainable naming the weights only")
    for said in ((buffer_note(traced.model, params),
                  padding_rows_note(traced.padding_rows, params)) if not traced.from_torch else ()):
        if said and notes is not None:
            notes.append(said)
    if notes is not None and (said := fresh_norms_note(traced.model)):
        notes.append(said)
    params += [p for p in head_params if p not in params]
    opset = next(o.version for o in traced.model.opset_import if o.domain in ("", "ai.onnx"))
    output = traced.outputs[0]

    bounds = _index_bounds(traced.model, traced.inputs)
    base = copy.deepcopy(traced.model)
    lowest_ir_version(base)  # every bundle graph takes its IR version from here
    _dynamic_batch(base, traced.inputs + traced.outputs)
    # an ONNX file's computed Reshape target (TorchScript's x.reshape(x.shape[0], -1, C)) loses
    # the shape once the example's batch is freed: a Linear over those tokens was left exact
    # without a word (an outside probe); measured as load_model measures a traced model's
    annotate_measured_shapes(base, traced.inputs)
    initial = _params_as_inputs(base, params)
    fold_frozen_batchnorm(base)  # (after: only frozen weights are initializers now)
    weights = _WeightFile()
    lookups = _split_lookups(base, set(traced.inputs), weights)
    infer = copy.deepcopy(base)
    fwd = copy.deepcopy(base)
    loss_spec = append_loss(fwd, output, loss, Shapes(fwd), labels=example_labels,
                            class_axis=class_axis, notes=notes)
    shapes = Shapes(fwd)
    torch_names = {p: traced.torch_names.get(p, (p, False))[0] for p in params}
    layers = find_compressible_layers(fwd, shapes, set(params), torch_names, instant_exclude,
                                      notes)

    out.mkdir(parents=True, exist_ok=True)
    in_shapes0 = Shapes(traced.model)
    text = text_spec(traced, in_shapes0, Path(tokenizer) if tokenizer else None, out,
                     id_rows=bounds, first_token=head is not None and pool == "cls")
    if text is not None and text.mask_input is not None:
        from .padding import tokenizer_mask_inverted

        flipped = inverted or tokenizer_mask_inverted(traced, in_shapes0, bounds, _dynamic_batch)
        if flipped == text.mask_input:
            raise ExportError(
                f"input '{flipped}' marks the padding with 1 (checked: the outputs ignore the "
                "tokens it marks 1), but --tokenizer fills it with an attention mask, 1 on real "
                "tokens: training would attend to the padding alone; give the model an "
                f"attention_mask input ({flipped} = attention_mask == 0 inside), or leave out "
                "--tokenizer and train from an .npz holding your own mask")
    prefix = None
    pinned: dict[str, int] = {}  # input -> the token length its symbolic axis 1 trains at
    if text is not None:
        from .any_length import any_length_infer

        free = any_length_infer(traced, text, params, lookups,
                                (head, pool, inverted) if head is not None else None,
                                out / text.tokenizer, weights, _split_lookups, _params_as_inputs,
                                _dynamic_batch)
        if free is not None:
            infer, text = free, dataclasses.replace(text, any_length=True)
            if split:
                from .prefix import split_prefix

                prefix = split_prefix(fwd, free, params, initial, lookups, weights.array, text,
                                      out / text.tokenizer, loss_spec, output,
                                      traced.padding_rows)
    if text is not None and (image_mean is not None or image_std is not None):
        raise ExportError("--image-mean/--image-std apply to image models; this is a text "
                          "model: leave them out")
    image = image_spec(traced, in_shapes0, image_mean, image_std) if text is None else None
    if class_names is not None and loss_spec.kind != "cross_entropy":
        raise ExportError(f"--classes names the classes of a classifier trained with "
                          f"cross-entropy; this model trains with --loss {loss_spec.kind} "
                          "(targets, not class ids): leave --classes out")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise ExportError("class names repeat a name; give each class its own name")
    if class_names is not None and len(class_names) != loss_spec.num_classes:
        raise ExportError(f"{len(class_names)} class names for a model with "
                          f"{loss_spec.num_classes} classes: name {loss_spec.num_classes}, or "
                          f"export a model of {len(class_names)} classes (--head "
                          f"{len(class_names)} on a model that returns its features)")
    data_inputs = set(traced.inputs) | {names.LABELS}
    graphs: dict[str, GraphFiles] = {}
    io: dict[str, GraphIO] = {}
    modes = ["vanilla"] + (["instant", "calib", "recal"] if layers else [])
    for ly in layers if saved_int8 else []:  # the runtime plans x̂ at this many bytes
        ly.x_itemsize = 1 if ly.int8_x_ok() else 4
    share_activation_bases(layers)
    graph_weights: dict[str, list[str]] = {}
    shorter = []
    any_len = text is not None and text.any_length and text.mask_input is not None
    if any_len:
        from .lengths import shorter_graphs

        mask_padding(layers, text.mask_input, text.seq_len,
                     prefix.forward if prefix is not None else fwd)
        share_activation_bases(layers)  # the masks are part of what a shared basis reads

        shorter = shorter_graphs(
            traced, text, lengths, head=(head, pool, inverted) if head is not None else None,
            params=params, loss=loss, loss_spec=loss_spec, layers=layers, prefix=prefix,
            full_forward=prefix.forward if prefix is not None else fwd, initial=initial,
            lookups=lookups, weights=weights, tokenizer=out / text.tokenizer,
            torch_names=torch_names, exclude=instant_exclude,
            steps={"dynamic_batch": _dynamic_batch, "params_as_inputs": _params_as_inputs,
                   "split_lookups": _split_lookups, "append_loss": append_loss})
        text = dataclasses.replace(text, lengths=[lg.length for lg in shorter])
    elif lengths and notes is not None:  # (session 29 probe: left out without a word)
        notes.append(f"note: --lengths {','.join(map(str, lengths))} left out: shorter graphs "
                     "are built for a text model found to take any token length; not this one")
    if layers and not any_len:  # no tokenizer, or a model the tokenizer check left fixed-length
        from .padding import mask_checked, padding_mask, pinned_lengths

        found = padding_mask(traced, in_shapes0, bounds, _dynamic_batch, params)
        pinned.update(pinned_lengths(traced, in_shapes0, layers, found, _dynamic_batch))
        if found is not None and mask_checked(traced, in_shapes0, bounds, _dynamic_batch,
                                              found, layers, params, fwd, notes):
            share_activation_bases(layers)
    check_rows_kept(traced, in_shapes0, bounds, _dynamic_batch)
    mixes = mixes_rows(traced, in_shapes0, bounds, _dynamic_batch, notes, params)
    runs = [(mode, mode, prefix.forward if prefix is not None else fwd, layers, "")
            for mode in modes]
    runs += [(f"{mode}@{lg.length}", mode, lg.forward, lg.layers, f".len{lg.length}")
             for lg in shorter for mode in modes if mode in names.TRAINING_MODES]
    for key, mode, forward, mode_layers, tag in runs:
        src = copy.deepcopy(forward)
        if mode in ("instant", "recal"):
            _add_basis_inputs(src, mode_layers)
        tg = build_training_graphs(src, names.LOSS, params, mode, mode_layers, opset,
                                   compress_saved=saved_int8, padding_rows=traced.padding_rows)
        files = {}
        for part, m in (("forward", tg.forward), ("backward", tg.backward)):
            _prune_unused_inputs(m, data_inputs if part == "forward" else set())
            name = f"{mode}{tag}.{part}.onnx"
            graph_weights[name] = weights.externalize(m)
            onnx.save(m, str(out / name))
            files[part] = name
        graphs[key] = GraphFiles(**files)
        io[key] = GraphIO(
            forward_inputs=[i.name for i in tg.forward.graph.input],
            forward_outputs=[o.name for o in tg.forward.graph.output],
            backward_inputs=[i.name for i in tg.backward.graph.input],
            saved=tg.saved, grads=tg.grads,
            grad_acc={p: f"{names.GRAD_ACC}{p}" for p in tg.grads},
            loss_scale=names.LOSS_SCALE if mode != "calib" else None,
            fwd_grams=tg.fwd_grams, bwd_grams=tg.bwd_grams)
    if prefix is not None:
        prefix_name = f"{names.PREFIX}.onnx"
        graph_weights[prefix_name] = weights.externalize(prefix.graph)
        onnx.save(prefix.graph, str(out / prefix_name))
        graphs[names.PREFIX] = GraphFiles(forward=prefix_name)
    infer_name = f"{names.INFER}.onnx"
    graph_weights[infer_name] = weights.externalize(infer)
    onnx.save(infer, str(out / infer_name))
    graphs[names.INFER] = GraphFiles(forward=infer_name)
    weights.write(out / names.WEIGHTS_FILE)
    np.savez(out / names.PARAMS_FILE, **initial)
    from .optim_graphs import OPTIMIZER_GRAPHS

    optimizers = {}
    for opt, make in OPTIMIZER_GRAPHS.items():
        optimizers[opt] = f"optim.{opt}.onnx"
        onnx.save(make(opset), str(out / optimizers[opt]))

    in_shapes = Shapes(base)
    files = {f.name: FileEntry(bytes=f.stat().st_size, sha256=file_sha256(f))
             for f in sorted(out.iterdir())
             if f.is_file() and f.name != names.MANIFEST_FILE and not f.name.startswith(".")}
    manifest = Manifest(
        format=FORMAT, format_version=FORMAT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"), source=traced.source, opset=opset,
        ir_version=int(base.ir_version), min_onnxruntime=MIN_ORT,
        inputs=[TensorSpec(n, ["N"] + ([pinned[n]] + list(in_shapes.of(n)[2:]) if n in pinned
                                       else list(in_shapes.of(n)[1:])),
                           _np_dtype(in_shapes.dtype[n]), bounds.get(n, 0))
                for n in traced.inputs],
        output=output, loss=loss_spec,
        params=[ParamSpec(p, list(initial[p].shape), torch_names[p],
                          traced.torch_names.get(p, (p, False))[1],
                          traced.torch_shapes.get(torch_names[p], [])) for p in params],
        trainable=trainable, frozen_bytes=weights.size,
        # Frozen tensors in weights.bin, and which graph uses which: the runtime maps the file
        # once and hands the same buffers to every session (no per-session copy or mapping).
        weights={k: WeightEntry(**v) for k, v in weights.tensors.items()},
        graph_weights=graph_weights, graphs=graphs, io=io,
        lookups={k: Lookup(**v) for k, v in lookups.items()},
        instant=InstantSpec([load_typed(LayerInfo, ly.to_json(), "layer") for ly in layers],
                            settings, saved_int8=bool(saved_int8 and layers)),
        files=files, class_names=class_names, text=text, image=image, optimizers=optimizers,
        flops=dict(zip(("forward", "trainable_forward"), forward_flops(fwd, shapes, set(params)),
                       strict=True)),
        prefix=PrefixSpec(prefix.axes, prefix.bytes_per_sample) if prefix is not None else None,
        mixes_rows=mixes)
    text = manifest_json(manifest)
    load_typed(Manifest, json.loads(text), str(out / names.MANIFEST_FILE))  # what the runtime reads
    (out / names.MANIFEST_FILE).write_text(text)
    return out


def _np_dtype(t: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(t))
