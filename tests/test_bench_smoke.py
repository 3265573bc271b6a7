"""Smoke test of the peer benchmark harness (``benchmarks/peers``): quick mode on the tiny cnn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_cnn(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--quick", "--workloads", "cnn",
                        "--steps", "6", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (out / "results.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("| system")}
    for system in ("pytorch", "ir-vanilla", "ir-instant", "ir-instant@128MB", "forward"):
        assert system in rows, md
        assert "| ok" in rows[system], rows[system]
    # ORT-training runs only where its venv exists (x86_64); otherwise a clear skipped row
    assert "ort-training" in rows
    assert "| ok" in rows["ort-training"] or "skipped" in rows["ort-training"]
    assert "init check: max|Δlogits|" in md
    assert (out / "results.json").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "chart.png").stat().st_size > 0


def test_profile_step_rows_per_graph(mlp_bundle):
    """benchmarks/profile_step.py: one row per graph the run used, with runs counted from the
    profiler (3 steps of 2 micro-batches: 6 forward and 6 backward runs of the INSTANT graphs)."""
    p = subprocess.run([sys.executable, "-m", "benchmarks.profile_step", str(mlp_bundle),
                        "--data", "digits", "--micro-batch", "16", "--batch", "32", "--steps",
                        "3", "--threads", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {ln.split("|")[1].strip(): ln.split("|")[2:-1] for ln in p.stdout.splitlines()
            if ln.startswith("| ") and not ln.startswith("| graph")}
    assert set(rows) >= {"instant.forward.onnx", "instant.backward.onnx", "infer.onnx"}, p.stdout
    assert int(rows["instant.forward.onnx"][0]) == int(rows["instant.backward.onnx"][0]) == 6
    assert float(rows["instant.backward.onnx"][1]) > 0
    assert rows["infer.onnx"][2].strip() == "run"
    assert "median step" in p.stdout
