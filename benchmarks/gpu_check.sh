#!/usr/bin/env bash
# The CUDA path, end to end, on a machine with an NVIDIA GPU: 20 training steps on the CPU and on
# CUDA from the same bundle, seed and data order; the losses must agree to 1e-3. Prints the GPU,
# step times, peak RSS and the GPU memory onnxruntime used.
#
#   benchmarks/gpu_check.sh [BUNDLE]           # BUNDLE: an exported bundle (default: exports mlp)
#
# Needs onnxruntime-gpu: `pip install instant-runtime[cuda]`, or, with no network (the lent
# device machines), wheels in .whl/ (see the README, "GPU"). Exits non-zero on any mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
BUNDLE=${1:-}
WORK=$(mktemp -d)
if [ -z "$BUNDLE" ]; then
  BUNDLE=$WORK/mlp
  $PY -m runtime export --model mlp --instant-exclude 4 --out "$BUNDLE"  # hidden Linears INSTANT
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY - "$BUNDLE" "$WORK" <<'PYEOF'
import json, subprocess, sys, threading, time
bundle, work = sys.argv[1], sys.argv[2]
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("error: this onnxruntime has no CUDA provider; install onnxruntime-gpu")

def gpu_used():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return int(out.split()[0])
    except Exception:
        return -1

res = {}
for device in ("cpu", "cuda"):
    out = f"{work}/run-{device}"
    peak_gpu = [gpu_used()]
    stop = threading.Event()
    def watch():
        while not stop.is_set():
            peak_gpu.append(gpu_used()); time.sleep(0.2)
    t = threading.Thread(target=watch); t.start()
    r = subprocess.run([sys.executable, "-m", "runtime", "train", bundle, "--data", "digits",
                        "--steps", "20", "--batch", "32", "--mode", "instant", "--device", device,
                        "--checkpoint-every", "0", "--no-progress", "--out", out],
                       capture_output=True, text=True)
    stop.set(); t.join()
    if r.returncode:
        sys.exit(f"error: {device} run failed: {r.stderr.strip().splitlines()[-1:]}")
    s = json.load(open(f"{out}/summary.json"))
    losses = [json.loads(l)["loss"] for l in open(f"{out}/metrics.jsonl") if '"step"' in l]
    res[device] = (s, losses, max(peak_gpu) - peak_gpu[0])
    print(f"{device}: median step {s['median_step_s'] * 1e3:.1f} ms, peak RSS {s['peak_rss'] / 1e6:.1f} MB,"
          f" GPU memory used {res[device][2]} MiB, held-out accuracy {s['test_acc']:.3f}")
diff = max(abs(a - b) for a, b in zip(res["cpu"][1], res["cuda"][1]))
print(f"max |loss cpu - loss cuda| over 20 steps: {diff:.2e}")
sys.exit(0 if diff <= 1e-3 else "error: CPU and CUDA losses differ by more than 1e-3")
PYEOF
