"""The aarch64 tier (tests/arm64/tier.py) from pytest: ``pytest -m arm64``.

Not in the default tier (pyproject's addopts deselects the ``arm64`` marker): it builds a Debian
arm64 root and aarch64 wheels once (needs root, qemu-user-static and debootstrap, which the tier
installs with apt-get when it runs as root) and runs the device side under qemu-user.
``make test-arm64`` runs the same script directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TIER = Path(__file__).resolve().parent / "arm64" / "tier.py"


@pytest.mark.arm64
def test_arm64_tier() -> None:
    p = subprocess.run([sys.executable, str(TIER)], capture_output=True, text=True,
                       timeout=3600, check=False)
    summary = p.stdout[p.stdout.rfind("==== aarch64 tier summary"):]
    assert p.returncode == 0, (summary or p.stdout[-4000:]) + p.stderr[-2000:]
