"""Calibration's decompositions with numpy's BLAS on one thread against its default pool.

A calibration's only BLAS work is the ``eigh`` / ``qr`` of its Gram matrices, between
onnxruntime's passes (runtime/calibrate.py: ``one_blas_thread``). This times
``calibrate.decompose`` on Grams of the widths our workloads have (64 tokens; 256, 384, 1024 and
1536 channels) with BLAS limited to one thread and with OpenBLAS's default (a thread a core),
on a quiet machine and beside one busy process (a spinning child, as a budget probe's parent
polling beside it, a second job, or an app on the device). Then the whole INSTANT ``plan`` of a
small encoder (2 transformer layers of width 256, 64 tokens; its probes calibrate 6 times) both
ways, each its own process (for the default pool, a wrapper removes the runtime's limit).

    python -m benchmarks.blas_threads [--repeats 3] [--no-plan]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (64, 256, 384, 1024, 1536)


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _time_decompose(n: int, one: bool, repeats: int) -> float:
    from threadpoolctl import threadpool_limits

    import runtime.calibrate as cal

    rng = np.random.default_rng(n)
    x = rng.standard_normal((4 * n, n))
    gram = x.T @ x
    fn = cal.decompose if one else cal.decompose.__wrapped__
    best = []
    for _ in range(repeats):
        with threadpool_limits(limits=None if one else os.cpu_count(), user_api="blas"):
            t = time.perf_counter()
            fn(gram, 1.0 / (4 * n))
            best.append(time.perf_counter() - t)
    return float(np.median(best))


def _table(repeats: int, busy: bool) -> list[str]:
    stop = mp.Event()
    child = None
    if busy:
        child = mp.Process(target=_spin, args=(stop,), daemon=True)
        child.start()
        time.sleep(0.2)
    try:
        rows = []
        for n in WIDTHS:
            a = _time_decompose(n, True, repeats)
            b = _time_decompose(n, False, repeats)
            rows.append(f"| {n} | {'beside 1 busy process' if busy else 'no process of ours beside'} | "
                        f"{a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.1f} |")
        return rows
    finally:
        if child is not None:
            stop.set()
            child.join()


_PLAN = """
import sys, runtime.calibrate as cal
if sys.argv.pop(1) == "default":
    cal.decompose = cal.decompose.__wrapped__
    cal.Spectrum.columns = cal.Spectrum.columns.__wrapped__
from runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _plan_seconds(bundle: Path, data: Path, how: str) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PLAN, how, "plan", str(bundle), "--data",
                        str(data), "--batch", "32", "--budget", "2GB", "--threads", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"plan failed: {r.stderr[-500:]}")
    return time.perf_counter() - t


def _encoder(tmp: Path) -> tuple[Path, Path]:
    model = tmp / "enc.py"
    model.write_text(
        "import torch\n"
        "class Enc(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.inp = torch.nn.Linear(64, 256)\n"
        "        layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0,\n"
        "                                                 batch_first=True)\n"
        "        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)\n"
        "        self.head = torch.nn.Linear(256, 10)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.enc(self.inp(x)).mean(1))\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return Enc()\n")
    bundle = tmp / "enc"
    r = subprocess.run([sys.executable, "-m", "runtime", "export", "--model", f"{model}:make",
                        "--input-shape", "8,64,64", "--out", str(bundle)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"export failed: {r.stderr[-500:]}")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 64, 64)).astype(np.float32)
    data = tmp / "seq.npz"
    np.savez(data, x=x, y=(x[:, :, 0].mean(1) > 0).astype(np.int64) + 2 * (x[:, 0, 1] > 0))
    return bundle, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-plan", action="store_true")
    a = ap.parse_args()
    print(f"command: python -m benchmarks.blas_threads --repeats {a.repeats}"
          + (" --no-plan" if a.no_plan else "") + f"  ({os.cpu_count()} cores)")
    print("| Gram width | machine | one BLAS thread (ms) | default pool (ms) | default / one |")
    print("|---:|---|---:|---:|---:|")
    for busy in (False, True):
        for row in _table(a.repeats, busy):
            print(row, flush=True)
    if a.no_plan:
        return
    with tempfile.TemporaryDirectory() as tmp:
        bundle, data = _encoder(Path(tmp))
        times = {how: [] for how in ("one", "default")}
        for _ in range(a.repeats):
            for how in times:
                times[how].append(_plan_seconds(bundle, data, how))
        for how, ts in times.items():
            print(f"INSTANT plan of the encoder (process included), BLAS {how}: median "
                  f"{np.median(ts):.1f} s ({', '.join(f'{t:.1f}' for t in ts)})")


if __name__ == "__main__":
    main()
