"""ONNX Runtime on-device training baseline (onnxruntime-training-cpu 1.19.2, its own venv).

Runs in the torch-free venv made by ``benchmarks.peers`` (onnxruntime-training-cpu==1.19.2,
onnx==1.17.0, numpy, tokenizers). Two commands, each its own process:

* ``--artifacts CFG OUT`` (not measured): the bundle's ``infer.onnx`` with the initial trainable
  parameters re-attached as initializers and the frozen weights embedded -> ``generate_artifacts``
  (CrossEntropyLoss, AdamW, requires_grad = the bundle's trainable params, frozen = every other
  float initializer, the logits as an extra output for held-out accuracy).
* ``CFG OUT`` (measured): CheckpointState + Module + Optimizer training loop, then evaluation.

``onnxruntime/training/__init__.py`` imports torch (through ``training.optim``), so
``onnxruntime.training`` is registered as a bare namespace first and only its ``artifacts``,
``onnxblock`` and ``api`` submodules are loaded: they do not need torch.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import numpy as np

from .common import Order, evaluate, load_dataset, summarize, vmrss, worker_main


def _training():
    import onnxruntime

    if "onnxruntime.training" not in sys.modules:
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = pkg
    from onnxruntime.training import api, artifacts, onnxblock

    return artifacts, onnxblock, api


def bn_inference_form(model, trainable: set[str]) -> int:
    """Rewrite every BatchNormalization as ``(x - mean) * (1/sqrt(var + eps)) * scale + B`` in
    standard ops. ORT-training's gradient builder turns BatchNormalization into training-mode
    ``BatchNormInternal`` (batch statistics), while the bundle, PyTorch ``eval()`` and
    instant-runtime use the running statistics; this keeps the function the same."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    nodes, count = [], 0
    for n in g.node:
        if n.op_type != "BatchNormalization" or len(n.output) != 1 or not (
                n.input[3] in inits and n.input[4] in inits):
            nodes.append(n)
            continue
        count += 1
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        x, scale, bias, mean, var = n.input
        tail = [1] * (ranks.get(x, 4) - 2)
        pre = f"bnfix{count}"
        mean_v = numpy_helper.to_array(inits[mean]).astype(np.float32)
        inv_v = 1.0 / np.sqrt(numpy_helper.to_array(inits[var]).astype(np.float32) + eps)
        new_inits = {f"{pre}.mean": mean_v.reshape(-1, *tail),
                     f"{pre}.inv_std": inv_v.reshape(-1, *tail).astype(np.float32),
                     f"{pre}.axes": np.arange(1, 1 + len(tail), dtype=np.int64)}
        for name, v in new_inits.items():
            g.initializer.append(numpy_helper.from_array(v, name))

        def shaped(t: str, tag: str, pre: str = pre, tail: list = tail) -> str:
            if t in inits and t not in trainable:
                name = f"{pre}.{tag}"
                g.initializer.append(numpy_helper.from_array(
                    numpy_helper.to_array(inits[t]).astype(np.float32).reshape(-1, *tail), name))
                return name
            nodes.append(helper.make_node("Unsqueeze", [t, f"{pre}.axes"], [f"{pre}.{tag}"]))
            return f"{pre}.{tag}"

        s_r, b_r = shaped(scale, "scale"), shaped(bias, "bias")
        nodes.extend([helper.make_node("Sub", [x, f"{pre}.mean"], [f"{pre}.c"]),
                  helper.make_node("Mul", [f"{pre}.c", f"{pre}.inv_std"], [f"{pre}.n"]),
                  helper.make_node("Mul", [f"{pre}.n", s_r], [f"{pre}.s"]),
                  helper.make_node("Add", [f"{pre}.s", b_r], [n.output[0]])])
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return count


def artifacts(cfg: dict) -> dict:
    import json

    import onnx
    from onnx import numpy_helper

    art, onnxblock, _ = _training()
    bdir = Path(cfg["bundle"])
    manifest = json.loads((bdir / "manifest.json").read_text())
    model = onnx.load(str(bdir / manifest["graphs"]["infer"]["forward"]), load_external_data=True)
    from runtime.bundle import open_bundle
    from runtime.export_model import restore_lookups

    restore_lookups(open_bundle(bdir, verify=False), model, onnx)  # the Gathers of token ids
    g = model.graph
    with np.load(bdir / "params.npz") as z:
        params = {p["name"]: np.asarray(z[p["name"]], np.float32) for p in manifest["params"]}
    keep = [i for i in g.input if i.name not in params]
    del g.input[:]
    g.input.extend(keep)
    for name, v in params.items():
        g.initializer.append(numpy_helper.from_array(v, name))
    n_bn = bn_inference_form(model, set(params))
    n_ln = 0
    for node in g.node:  # ORT's LayerNormalizationGrad reads the optional Mean / InvStdDev outputs
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}.mean", f"{node.output[0]}.inv_std"])
            n_ln += 1
    frozen = [t.name for t in g.initializer
              if t.name not in params and t.data_type == onnx.TensorProto.FLOAT and len(t.dims)]
    out = Path(cfg["artifacts"])
    out.mkdir(parents=True, exist_ok=True)
    if model.ir_version > 9:
        model.ir_version = 9  # ORT-training 1.19 reads IR <= 10; the bundle is opset 17 / IR 8
    art.generate_artifacts(
        model, requires_grad=list(params), frozen_params=frozen,
        loss=art.LossType.CrossEntropyLoss,
        optimizer=onnxblock.optim.AdamW(betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=cfg["weight_decay"]),
        artifact_directory=str(out), additional_output_names=[manifest["output"]])
    return {"files": sorted(p.name for p in out.iterdir()), "frozen": len(frozen),
            "trainable": len(params), "bn_rewritten": n_bn, "ln_outputs_added": n_ln, "ir_version": int(model.ir_version),
            "opset": [(o.domain, o.version) for o in model.opset_import]}


def run(cfg: dict) -> dict:
    import onnxruntime as ort

    _, _, api = _training()
    bundle, data = load_dataset(cfg)
    art = Path(cfg["artifacts"])
    so = ort.SessionOptions()
    if cfg.get("threads"):
        so.intra_op_num_threads = cfg["threads"]
    state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
    module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"),
                        device="cpu", session_options=so)
    opt = api.Optimizer(str(art / "optimizer_model.onnx"), module)
    opt.set_learning_rate(cfg["lr"])
    names = module.input_names()
    order = Order(len(data), min(cfg["batch"], len(data)), cfg["seed"])

    def feeds(x: dict, y: np.ndarray) -> list:
        d = dict(x)
        label = [n for n in names if n not in d]
        if len(label) != 1:
            raise SystemExit(f"unexpected training inputs {names}")
        d[label[0]] = np.ascontiguousarray(y, np.int64)
        return [np.ascontiguousarray(d[n]) for n in names]

    idle = vmrss()
    losses, times = [], []
    module.train()
    for _ in range(cfg["steps"]):
        x, y = data.take(order.next())
        args = feeds(x, y)
        t0 = time.perf_counter()
        outs = module(*args)
        opt.step()
        module.lazy_reset_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(np.asarray(outs[0] if isinstance(outs, list | tuple) else outs)))
    res = summarize(losses, times, cfg["warmup"])
    res["idle_rss"] = idle
    if data.test is not None:
        module.eval()

        def predict(x):
            n = len(next(iter(x.values())))
            return module(*feeds(x, np.zeros(n, np.int64)))[1]

        res["test_loss"], res["test_acc"] = evaluate(predict, data.test, cfg["eval_batch"])
    res["ort_version"] = ort.__version__
    return res


if __name__ == "__main__":
    if sys.argv[1] == "--artifacts":
        sys.argv.pop(1)
        sys.exit(worker_main(artifacts))
    sys.exit(worker_main(run))
