"""`make demo` (pretrained all-MiniLM-L6-v2 fine-tuned on movie-review sentiment under a 256 MB
budget) and `make demo-cnn` (built-in CNN on real digits, vanilla vs INSTANT).

About the MiniLM run:

Export (a workstation step: it imports torch) runs in its own process; training runs in a
torch-free process under ``--budget 256MB``, as it would on the device: last 2 encoder layers +
a new classifier head trainable, INSTANT on all 12 Linear layers of those blocks, Rotten
Tomatoes snippets tokenised on the device. It prints held-out accuracy before and after, the
per-layer ranks, and the predicted and measured peak memory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["main"]


def _run(*args: str) -> None:
    cmd = [sys.executable, "-m", "runtime", *args]
    print("$ instant-runtime " + " ".join(args), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(rc)


def cnn() -> int:
    out = Path("runs/demo")
    bundle = out / "cnn"
    _run("export", "--model", "cnn", "--out", str(bundle), "--overwrite")
    _run("plan", str(bundle), "--data", "digits")
    for mode in ("vanilla", "instant"):
        _run("train", str(bundle), "--data", "digits", "--steps", "500", "--batch", "32",
             "--lr", "3e-3", "--mode", mode, "--threads", "2", "--overwrite",
             "--out", str(out / f"run-{mode}"))
    return 0


def minilm() -> int:
    out = Path("runs/demo")
    bundle = out / "minilm-l6"
    _run("export", "--model", "minilm-l6", "--trainable", "last:3", "--out", str(bundle),
         "--overwrite")
    _run("train", str(bundle), "--data", "rotten-tomatoes", "--budget", "256MB",
         "--steps", "80", "--batch", "32", "--optimizer", "sgd", "--lr", "0.05",
         "--threads", "2", "--overwrite", "--out", str(out / "run"))
    return 0


def main(argv: list[str] | None = None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["minilm"]
    return cnn() if which[0] == "cnn" else minilm()


if __name__ == "__main__":
    sys.exit(main())
