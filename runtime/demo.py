"""`make demo`: export a built-in model, fine-tune it on real data, print what happened.

The export step runs in its own process (it imports torch, as a workstation would); training
runs in a torch-free process, as on the device.
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


def main() -> int:
    out = Path("runs/demo")
    bundle = out / "cnn"
    _run("export", "--model", "cnn", "--out", str(bundle))
    _run("plan", str(bundle), "--data", "digits")
    for mode in ("vanilla", "instant"):
        _run("train", str(bundle), "--data", "digits", "--steps", "500", "--batch", "32",
             "--lr", "3e-3", "--mode", mode, "--oversample", "7", "--calib-every", "20",
             "--threads", "2", "--out", str(out / f"run-{mode}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
