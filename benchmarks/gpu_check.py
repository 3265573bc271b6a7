"""The CUDA path, end to end, where an NVIDIA GPU and onnxruntime-gpu are.

For each case (a bundle, its data, a mode) it trains the same steps from the same seed and data
order on the CPU and on CUDA and checks that the losses agree; on CUDA it also checks a run under
``--budget`` (host peak measured from outside: VmHWM polled by this process), a resume from a
checkpoint against the uninterrupted run, and ``eval`` on both devices. It prints step times, the
host peak and the GPU memory in use (nvidia-smi), and writes every figure to ``--json``.

    python -m benchmarks.gpu_check --bundles DIR [--steps 20] [--json FILE]

``DIR`` holds exported bundles named as the cases below (``mlp-i``: ``export --model mlp
--instant-exclude 4``; ``cnn``; ``token-mlp``); a missing one is exported where torch is
installed, else skipped. Exits non-zero on any mismatch or failure. ``--device-name cpu``
runs the whole script with the CPU standing in for CUDA (to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.seqdata import make_sequences

CASES = [  # (bundle, data, mode, batch)
    ("mlp-i", "digits", "instant", 32),
    ("mlp-i", "digits", "vanilla", 32),
    ("cnn", "digits", "instant", 32),
    ("token-mlp", "seq", "instant", 64),
    ("token-mlp", "seq", "vanilla", 64),
]
EXPORT = {"mlp-i": ["--model", "mlp", "--instant-exclude", "4"], "cnn": ["--model", "cnn"],
          "token-mlp": ["--model", "token-mlp"]}
LOSS_TOL = 1e-3


def gpu_used_mib() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return -1


def vm_hwm(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(args: list[str], watch_gpu: bool) -> dict:
    """``python -m runtime ARGS``: exit code, last stderr line, host peak polled from outside
    every 5 ms, the most GPU memory seen in use above the idle figure, wall seconds."""
    idle = gpu_used_mib() if watch_gpu else -1
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "runtime", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    peak = [0]
    gpu = [idle]
    done = threading.Event()

    def poll_gpu() -> None:
        while not done.is_set():
            gpu.append(gpu_used_mib())
            time.sleep(0.1)

    watcher = threading.Thread(target=poll_gpu, daemon=True)
    if watch_gpu:
        watcher.start()
    while p.poll() is None:
        peak[0] = max(peak[0], vm_hwm(p.pid))
        time.sleep(0.005)
    out, err = p.communicate()
    done.set()
    if watch_gpu:
        watcher.join()
    return {"rc": p.returncode, "err": (err.strip().splitlines() or [""])[-1], "stdout": out,
            "peak": peak[0], "gpu_mib": max(gpu) - idle if idle >= 0 else -1,
            "wall_s": time.monotonic() - t0}


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r
            and r.get("kind", "step") == "step"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budgets", default="400MB,1GB,1500MB")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device-name", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    gpu = a.device_name
    bundles = Path(a.bundles)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout
    except OSError:
        smi = ""
    print("GPU:", smi.strip() or "(no nvidia-smi)")
    x, y = make_sequences(512)
    xt, yt = make_sequences(256, seed=1)
    np.savez(work / "seq.npz", x=x, y=y, x_test=xt, y_test=yt)
    report, failures = [], []
    for name, data, mode, batch in CASES:
        bundle = bundles / name
        if not (bundle / "manifest.json").exists():
            r = subprocess.run([sys.executable, "-m", "runtime", "export", *EXPORT[name],
                                "--out", str(bundle)], capture_output=True, text=True)
            if r.returncode:
                print(f"{name}: skipped (no bundle, export failed: {r.stderr.strip()[-200:]})")
                continue
        dpath = str(work / "seq.npz") if data == "seq" else data
        common = ["--data", dpath, "--batch", str(batch), "--mode", mode, "--seed", "0",
                  "--no-progress", "--threads", "4"]
        case = f"{name}/{mode}"
        res = {}
        for tag, dev in (("cpu", "cpu"), ("gpu", gpu)):
            out = work / f"{name}-{mode}-{tag}"
            r = run(["train", str(bundle), *common, "--steps", str(a.steps), "--device", dev,
                     "--checkpoint-every", str(a.steps // 2), "--out", str(out)], tag == "gpu")
            if r["rc"]:
                failures.append(f"{case} {dev}: exit {r['rc']}: {r['err']}")
                break
            s = json.loads((out / "summary.json").read_text())
            res[tag] = {**r, "losses": losses(out), "median_ms": s["median_step_s"] * 1e3,
                        "test_acc": s.get("test_acc"), "out": out}
        if len(res) < 2:
            continue
        rep = work / f"{name}-{mode}-repeat"  # the GPU's own run-to-run spread
        rr = run(["train", str(bundle), *common, "--steps", str(a.steps), "--device", gpu,
                  "--checkpoint-every", "0", "--out", str(rep)], False)
        if rr["rc"] == 0:
            again = losses(rep)
            res["gpu"]["repeat_diff"] = max(abs(again[k] - v) for k, v in
                                            res["gpu"]["losses"].items() if k in again)
        common_steps = sorted(set(res["cpu"]["losses"]) & set(res["gpu"]["losses"]))
        diff = max(abs(res["cpu"]["losses"][k] - res["gpu"]["losses"][k]) for k in common_steps)
        row = {"case": case, "steps": len(common_steps), "max_loss_diff": diff,
               "gpu_repeat_diff": res["gpu"].get("repeat_diff"),
               **{f"{t}_{k}": res[t][k] for t in ("cpu", "gpu")
                  for k in ("median_ms", "peak", "gpu_mib", "test_acc", "wall_s")}}
        if len(common_steps) < a.steps or diff > LOSS_TOL:
            failures.append(f"{case}: losses differ by {diff:.2e} over {len(common_steps)} steps")
        # resume: stopped half-way on the GPU, then resumed, it gives the uninterrupted losses
        rout = work / f"{name}-{mode}-resume"
        half = a.steps // 2
        r1 = run(["train", str(bundle), *common, "--steps", str(half), "--device", gpu,
                  "--checkpoint-every", str(half), "--out", str(rout)], False)
        r2 = run(["train", str(bundle), *common, "--steps", str(a.steps), "--device", gpu,
                  "--checkpoint-every", str(half), "--out", str(rout), "--resume"], False) \
            if r1["rc"] == 0 else r1
        if r2["rc"]:
            failures.append(f"{case} resume on {gpu}: exit {r2['rc']}: {r2['err']}")
        else:
            after = losses(rout)
            later = [k for k in res["gpu"]["losses"] if k > half and k in after]
            row["resume_max_loss_diff"] = max(
                abs(after[k] - res["gpu"]["losses"][k]) for k in later) if later else None
            if not later or row["resume_max_loss_diff"] > LOSS_TOL:
                failures.append(f"{case} resume on {gpu}: losses after the resume differ "
                                f"({row['resume_max_loss_diff']}, {len(later)} steps)")
        # eval on both devices from the GPU run's weights: the same figures
        ev = {}
        for dev in ("cpu", gpu):
            ev[dev] = run(["eval", str(bundle), "--data", dpath, "--weights",
                           str(res["gpu"]["out"]), "--device", dev], False)
            if ev[dev]["rc"]:
                failures.append(f"{case} eval {dev}: exit {ev[dev]['rc']}: {ev[dev]['err']}")
        row["eval_cpu"], row["eval_gpu"] = (ev[d]["stdout"].strip().splitlines()[-1:]
                                            for d in ("cpu", gpu))
        # under budgets on the GPU: refused in one line, or the host peak stays inside
        row["budgets"] = []
        for budget in a.budgets.split(","):
            bout = work / f"{name}-{mode}-budget-{budget}"
            rb = run(["train", str(bundle), *common, "--steps", str(a.steps), "--device", gpu,
                      "--budget", budget, "--checkpoint-every", "0", "--out", str(bout)],
                     gpu == "cuda")
            row["budgets"].append({"budget": budget, "rc": rb["rc"], "peak": rb["peak"],
                                   "gpu_mib": rb["gpu_mib"], "err": rb["err"]})
            if rb["rc"] not in (0, 2) or (rb["rc"] and not rb["err"].startswith("error: ")):
                failures.append(f"{case} --budget {budget} on {gpu}: exit {rb['rc']}: "
                                f"{rb['err']}")
            elif rb["rc"] == 0 and rb["peak"] > parse_mb(budget):
                failures.append(f"{case} --budget {budget} on {gpu}: host peak "
                                f"{rb['peak'] / 1e6:.1f} MB over the budget")
        report.append(row)
        budgets = "; ".join(
            f"--budget {r['budget']}: exit {r['rc']}, host peak {r['peak'] / 1e6:.0f} MB, GPU "
            f"{r['gpu_mib']} MiB" + (f" ({r['err'][:90]}...)" if r["rc"] else "")
            for r in row["budgets"])
        print(f"{case}: {len(common_steps)} steps, max |loss cpu - loss {gpu}| {diff:.2e} "
              f"({gpu} run to run {row['gpu_repeat_diff']}, after a resume "
              f"{row.get('resume_max_loss_diff')}); median step cpu {row['cpu_median_ms']:.1f} "
              f"ms, {gpu} {row['gpu_median_ms']:.1f} ms; host peak cpu "
              f"{row['cpu_peak'] / 1e6:.0f} MB, {gpu} {row['gpu_peak'] / 1e6:.0f} MB; GPU memory "
              f"{row['gpu_gpu_mib']} MiB; held-out acc cpu {row['cpu_test_acc']:.3f}, {gpu} "
              f"{row['gpu_test_acc']:.3f}; eval cpu {row['eval_cpu']} / {gpu} {row['eval_gpu']}"
              f"\n    on {gpu}: {budgets}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": report, "failures": failures}, indent=1,
                                           default=str))
    for f in failures:
        print("FAIL:", f)
    print("command: python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]))
    return 1 if failures or not report else 0


def parse_mb(text: str) -> int:
    from devices import parse_size

    return parse_size(text)


if __name__ == "__main__":
    sys.exit(main())
