"""Helpers shared by the benchmark harnesses (``benchmarks/peers``, ``benchmarks/real_models.py``):
running a command in a fresh process, the cache of exported bundles, the machine description and
Markdown tables. Harness side only (stdlib): the workers that run in the torch-free ORT-training
venv import ``benchmarks.peers.common`` instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["ROOT", "BUNDLE_CACHE", "log", "last_line", "run_cmd", "ensure_bundle", "exporter_hash",
           "cpu_description", "dist_version", "fmt", "md_table"]

ROOT = Path(__file__).resolve().parents[1]
# Exported bundles, keyed by model and --trainable (shared by every harness: export is slow).
BUNDLE_CACHE = ROOT / "results" / "tmp" / "bench-work" / "bundles"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    """The most telling line of a failed process's output: its last error line, else its last."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error:") or "Error" in ln or "error" in ln]
    return (err or lines or ["no output"])[-1][:300]


def run_cmd(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None
            ) -> tuple[bool, str]:
    """Run ``cmd`` from the repository root; (True, stdout) or (False, one-line reason)."""
    try:
        p = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if p.returncode != 0:
        return False, f"exit {p.returncode}: {last_line(p.stderr or p.stdout)}"
    return True, p.stdout


def exporter_hash() -> str:
    """SHA-256 of the exporter's sources (``export/**/*.py`` and the bundle contract): a cached
    bundle made by other code is exported again."""
    h = hashlib.sha256()
    for f in sorted([*(ROOT / "export").rglob("*.py"), *(ROOT / "contract").glob("*.py")]):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def ensure_bundle(model: str, trainable: str, timeout: float, fresh: bool = False,
                  cache: Path = BUNDLE_CACHE, extra: tuple[str, ...] = ()) -> Path:
    """``instant-runtime export --model MODEL --trainable TRAINABLE`` into the cache; exported
    again when ``fresh`` or when the exporter's sources changed since (``<bundle>.stamp``).

    Raises:
        RuntimeError: the export failed (the message names the reason).
    """
    path = cache / f"{model}-{trainable.replace(':', '')}{''.join(extra).replace('-', '')}"
    stamp = path.with_name(path.name + ".stamp")
    want = exporter_hash()
    if (not fresh and (path / "manifest.json").is_file() and stamp.is_file()
            and stamp.read_text().strip() == want):
        return path
    shutil.rmtree(path, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    log(f"[{model}] exporting bundle {path}")
    ok, msg = run_cmd([sys.executable, "-m", "runtime", "export", "--model", model,
                       "--trainable", trainable, *extra, "--out", str(path)], timeout)
    if not ok:
        raise RuntimeError(f"export failed: {msg}")
    stamp.write_text(want + "\n")
    return path


def cpu_description() -> str:
    """CPU model name, architecture and core count, e.g. ``Intel(R) Xeon(R) … (x86_64), 2 cores``."""
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), name)
    return f"{name} ({platform.machine()}), {os.cpu_count()} cores"


def dist_version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    """``format(v * scale, spec)``, or an en dash for a missing value."""
    return "–" if v is None else format(v * scale, spec)


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]],
             align: str | None = None) -> list[str]:
    """Lines of a Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default:
    the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} does not match {len(header)} columns")
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
