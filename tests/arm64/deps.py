"""Shared helpers of the aarch64 tier: device requirements from pyproject.toml, target markers,
pip's cross-platform arguments.

Everything here runs on the host (x86_64) with the project venv's Python; nothing imports torch.
pip evaluates environment markers against the *host* interpreter even with ``--platform`` and
``--python-version``, so the markers of the device requirements are evaluated here, against the
target (aarch64, CPython X.Y), and pip receives plain requirements.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is a device dependency there
    import tomli as tomllib  # type: ignore[no-redef]

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ModuleNotFoundError:  # packaging comes with onnxruntime; pip vendors it as a fallback
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]

# The tier installs the device dependencies as pip resolves them from pyproject.toml (newest
# aarch64 wheels), onnxruntime included: under qemu-user 7.2, onnxruntime >= 1.28 crashed
# (SIGSEGV) at import only because the emulated process read the x86 host's /proc/cpuinfo; the
# tier gives the root an ARM one (tier.write_cpuinfo) and 1.32.0 imports and trains. ARM64_PINS
# (e.g. "onnxruntime==1.17.0 numpy<2") replaces the project's specifiers of those packages.

# Debian 12 (bookworm): Python 3.11, glibc 2.36, like Raspberry Pi OS 12.
SUITE = "bookworm"
PYTHON = "3.11"
GLIBC = (2, 36)

__all__ = ["GLIBC", "PYTHON", "REPO", "SUITE", "Marker", "Requirement",
           "canonicalize_name", "device_requirements", "pip_target_args", "platform_tags",
           "project_packages", "pyproject", "target_env"]


def pyproject(repo: Path = REPO) -> dict:
    with open(repo / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def project_packages(repo: Path = REPO) -> list[str]:
    """What ``[tool.setuptools] packages`` says, for messages: the list, or the ``find``
    patterns. (The tier installs the project with pip, which applies the real rules.)"""
    pkgs = pyproject(repo).get("tool", {}).get("setuptools", {}).get("packages")
    if isinstance(pkgs, dict):
        find = pkgs.get("find", {})
        return [f"find: {', '.join(find.get('include', ['*']))}"]
    return list(pkgs or ["(setuptools auto-discovery)"])


def target_env(python: str, machine: str = "aarch64") -> dict[str, str]:
    """Marker environment of CPython ``python`` (e.g. "3.12") on Linux/``machine``."""
    return {"python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": f"{python}.0", "platform_machine": machine,
            "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
            "platform_release": "", "platform_version": "", "extra": ""}


def device_requirements(python: str, pins: list[str] | tuple[str, ...] = (),
                        repo: Path = REPO) -> list[str]:
    """``[project] dependencies`` that apply to aarch64 CPython ``python``, markers dropped.

    ``pins``: requirements ("onnxruntime==1.17.0", "numpy<2") that replace the project's
    requirement of the same name; a pin of a package the project does not list is an error.
    """
    by_name = {canonicalize_name(Requirement(p).name): Requirement(p) for p in pins}
    out, seen = [], set()
    for line in pyproject(repo)["project"]["dependencies"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(target_env(python)):
            continue
        req.marker = None
        name = canonicalize_name(req.name)
        seen.add(name)
        out.append(str(by_name.get(name, req)))
    unknown = set(by_name) - seen
    if unknown:
        raise ValueError(f"pins for packages that are not device dependencies: {sorted(unknown)}")
    return out


def platform_tags(glibc: tuple[int, int] = GLIBC) -> list[str]:
    """Every manylinux aarch64 tag a pip running on glibc ``glibc`` accepts (2.17 is the
    oldest aarch64 manylinux); pip does not expand a single ``--platform`` to older tags."""
    major, minor = glibc
    return ["manylinux2014_aarch64"] + [f"manylinux_{major}_{m}_aarch64"
                                        for m in range(minor, 16, -1)]


def pip_target_args(python: str, glibc: tuple[int, int] = GLIBC) -> list[str]:
    args = []
    for tag in platform_tags(glibc):
        args += ["--platform", tag]
    return args + ["--python-version", python, "--implementation", "cp",
                   "--only-binary=:all:"]


if __name__ == "__main__":  # deps.py [PYTHON [PIN...]]: print the device requirements
    print("\n".join(device_requirements(sys.argv[1] if len(sys.argv) > 1 else PYTHON,
                                        sys.argv[2:])))
