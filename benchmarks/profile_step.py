"""Where a training step's time goes, graph by graph: onnxruntime's profiler on every session of
one ``instant-runtime train`` run (a fresh process), summed per graph and divided by the steps.

    python -m benchmarks.profile_step BUNDLE --data rotten-tomatoes --micro-batch 5 --mode instant
    python -m benchmarks.profile_step BUNDLE --data DATA --mode vanilla -- --optimizer sgd --lr 0.05

Prints one row per graph file (``instant.len32.backward.onnx`` is the INSTANT backward at 32
tokens): how many times it ran, its ``model_run`` time per step and its three costliest operator
types. The evaluations before and after training run the inference graph (``infer.onnx``): its
row is per run, not per step. Profiling adds its own overhead; compare rows of runs made the
same way, on a quiet machine.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import ROOT, cpu_description, md_table


def _child(out: str, argv: list[str]) -> int:
    """Run ``instant-runtime train`` with every session profiled into ``out/<graph file>_*``."""
    import onnxruntime as ort

    import runtime.trainer as trainer
    from runtime.cli import main

    current = {"graph": "unknown"}
    made: list = []
    plain_options = ort.SessionOptions

    class Profiled(plain_options):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(Path(out) / current["graph"])

    plain_make = trainer.make_session

    def make_session(bundle, mode, part, cfg, shared):
        current["graph"] = bundle.graph_file(mode, part)
        ort.SessionOptions = Profiled
        try:
            session = plain_make(bundle, mode, part, cfg, shared)
        finally:
            ort.SessionOptions = plain_options
        made.append(session)
        return session

    trainer.make_session = make_session
    atexit.register(lambda: [s.end_profiling() for s in made])
    return main(["train", *argv])


def summarise(folder: Path, steps: int) -> list[list[object]]:
    rows = []
    for f in sorted(folder.glob("*.json")):
        graph = f.name.rsplit("_", 3)[0]  # onnxruntime appends _date_time_ms.json
        runs, total, ops = 0, 0, collections.Counter()
        for e in json.loads(f.read_text()):
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs, total = runs + 1, total + e["dur"]
            elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                ops[e["args"]["op_name"]] += e["dur"]
        if not runs:
            continue
        per = runs if graph.startswith("infer") else steps
        top = ", ".join(f"{o} {v / 1e3 / per:.1f}" for o, v in ops.most_common(3))
        rows.append([graph, runs, f"{total / 1e3 / per:.1f}", "run" if per == runs else "step",
                     top])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="more `train` options go after --")
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", default="instant", choices=["instant", "vanilla"])
    ap.add_argument("--micro-batch", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = argv[cut + 1:]  # more `train` options, after --
    train = [a.bundle, "--data", a.data, "--mode", a.mode, "--micro-batch", str(a.micro_batch),
             "--batch", str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads),
             "--no-progress", "--checkpoint-every", "0", "--seed", "0", *a.extra]
    if a.child:
        return _child(a.child, [*train, "--out", str(Path(a.child) / "run")])
    with tempfile.TemporaryDirectory(prefix="profile_step.") as tmp:
        cmd = [sys.executable, "-m", "benchmarks.profile_step", "--child", tmp,
               *argv]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            print(r.stderr.strip()[-600:], file=sys.stderr)
            return r.returncode
        median = next((ln for ln in r.stdout.splitlines() if "median step" in ln), "")
        rows = summarise(Path(tmp), a.steps)
    print(f"command: python -m benchmarks.profile_step {' '.join(argv)}")
    print(f"machine: {cpu_description()}")
    print(f"train: {median.strip()}")
    print("\n".join(md_table(["graph", "runs", "model_run ms", "per", "costliest operators (ms)"],
                             rows, align="lrrll")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
