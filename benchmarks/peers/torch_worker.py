"""PyTorch eager baseline: the same model (export.models factory), the bundle's initial weights,
the same trainable subset, data order, batch and AdamW hyper-parameters; exact autograd backward.

Run by ``benchmarks.peers`` in its own process: ``python -m benchmarks.peers.torch_worker CFG OUT``.
Also ``--verify``: max |logits(torch) - logits(infer.onnx)| on the first batch (not timed).
"""

from __future__ import annotations

import sys
import time
import types

import numpy as np

from .common import ROOT, Order, evaluate, infer_feeds, load_dataset, summarize, vmrss, worker_main


def _import_models():
    """``export.models`` without ``export/__init__`` (it imports onnx and the exporter: a PyTorch
    user would import only torch and the model definition)."""
    if "export" not in sys.modules:
        pkg = types.ModuleType("export")
        pkg.__path__ = [str(ROOT / "export")]
        sys.modules["export"] = pkg
        graph = types.ModuleType("export.graph")

        class ExportError(Exception):
            pass

        graph.ExportError = ExportError
        sys.modules["export.graph"] = graph
    from export.models import BUILTIN_MODELS

    return BUILTIN_MODELS


def build_model(cfg: dict, bundle):
    """The torch model with the bundle's initial trainable weights; only those require grad."""
    import torch

    torch.manual_seed(cfg.get("seed", 0))
    model = _import_models()[cfg["model"]].factory()
    model.eval()  # as exported: BatchNorm on running statistics, no dropout
    with np.load(bundle.path / "params.npz") as z:
        state = {}
        for p in bundle.params:
            v = np.array(z[p.name], dtype=np.float32)
            state[p.torch_name or p.name] = torch.from_numpy(
                np.ascontiguousarray(v.T if p.transposed else v))
    names = dict(model.named_parameters())
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise SystemExit(f"bundle parameters not in the torch model: {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            names[k].copy_(v)
    for k, p in names.items():
        p.requires_grad_(k in state)
    return model, [names[k] for k in state]


def _tensors(bundle, x: dict) -> list:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(x[s.name])) for s in bundle.inputs]


def run(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    bundle, data = load_dataset(cfg)
    model, params = build_model(cfg, bundle)
    if cfg.get("optimizer", "adamw") == "sgd":  # as the runtime's: momentum 0.9, no decay
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=cfg["weight_decay"])
    order = Order(len(data), min(cfg["batch"], len(data)), cfg["seed"])
    idle = vmrss()
    losses, times = [], []
    text = bundle.manifest.text
    for _ in range(cfg["steps"]):
        x, y = data.take(order.next())
        if cfg.get("trim_padding") and text is not None and text.mask_input in x:
            # what a PyTorch user's collator does (pad each batch to its longest text only)
            keep = int(np.flatnonzero(x[text.mask_input].any(0)).max()) + 1
            x = {k: np.ascontiguousarray(v[:, :keep]) if k in text.token_inputs else v
                 for k, v in x.items()}
        inputs, labels = _tensors(bundle, x), torch.from_numpy(y)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(*inputs), labels)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    res = summarize(losses, times, cfg["warmup"])
    res["idle_rss"] = idle
    if data.test is not None:
        with torch.no_grad():
            res["test_loss"], res["test_acc"] = evaluate(
                lambda x: model(*_tensors(bundle, x)).numpy(), data.test, cfg["eval_batch"])
    res["threads"] = torch.get_num_threads()
    return res


def verify(cfg: dict) -> dict:
    """Same initial function: torch logits vs the bundle's infer.onnx on the first batch."""
    import onnxruntime as ort
    import torch

    bundle, data = load_dataset(cfg)
    model, _ = build_model(cfg, bundle)
    x, _ = data.take(Order(len(data), min(cfg["batch"], len(data)), cfg["seed"]).next())
    with torch.no_grad():
        ref = model(*_tensors(bundle, x)).numpy()
    sess = ort.InferenceSession(str(bundle.path / "infer.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = infer_feeds(bundle, x)
    got = sess.run([bundle.output], feeds)[0]
    diff = float(np.abs(got - ref).max())
    return {"max_abs_diff": diff, "scale": float(np.abs(ref).max())}


if __name__ == "__main__":
    if sys.argv[1] == "--verify":
        sys.argv.pop(1)
        sys.exit(worker_main(verify))
    sys.exit(worker_main(run))
