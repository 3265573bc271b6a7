"""Forward-only reference: the bundle's ``infer.onnx`` (initial params fed as inputs) on the same
batch, plain onnxruntime, default session options. Median of ``fwd_repeats`` runs after 2
warm-ups. ``python -m benchmarks.peers.infer_worker CFG OUT``."""

from __future__ import annotations

import statistics
import sys
import time

from .common import Order, infer_feeds, load_dataset, vmrss, worker_main


def run(cfg: dict) -> dict:
    import onnxruntime as ort

    bundle, data = load_dataset(cfg)
    so = ort.SessionOptions()
    if cfg.get("threads"):
        so.intra_op_num_threads = cfg["threads"]
    sess = ort.InferenceSession(str(bundle.path / "infer.onnx"), so,
                                providers=["CPUExecutionProvider"])
    x, _ = data.take(Order(len(data), min(cfg["batch"], len(data)), cfg["seed"]).next())
    feeds = infer_feeds(bundle, x)
    out = [bundle.output]
    idle = vmrss()
    times = []
    for i in range(cfg.get("fwd_repeats", 10) + 2):
        t0 = time.perf_counter()
        sess.run(out, feeds)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"median_step_s": statistics.median(times), "idle_rss": idle,
            "ort_version": ort.__version__}


if __name__ == "__main__":
    sys.exit(worker_main(run))
