"""Runs under the emulated aarch64 Python: prints one JSON line of facts about its environment.

    qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 tests/arm64/inside.py SITE PROJECT
"""

from __future__ import annotations

import json
import os
import platform
import sys

ELF_MACHINES = {183: "aarch64", 62: "x86_64", 40: "arm", 3: "i386"}


def elf_machine(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return "not ELF"
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), f"e_machine {head[18:20]!r}")


def import_error(name: str) -> str:
    try:
        __import__(name)
    except ImportError as exc:
        return type(exc).__name__
    return "imported"


def main() -> int:
    site, project = sys.argv[1], sys.argv[2]
    facts = {"machine": platform.machine(), "python": platform.python_version(),
             "executable": sys.executable}
    facts["torch"] = import_error("torch")
    facts["sklearn"] = import_error("sklearn")
    import numpy
    import onnxruntime as ort

    facts["numpy"] = numpy.__version__
    facts["onnxruntime"] = ort.__version__
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    so = next(f for f in sorted(os.listdir(capi))
             if f.startswith("onnxruntime_pybind11_state") and f.endswith(".so"))
    facts["ort_so"] = so
    facts["ort_elf"] = elf_machine(os.path.join(capi, so))
    sos = [os.path.join(d, f) for d in (os.path.join(os.path.dirname(numpy.__file__), c)
                                       for c in ("_core", "core")) if os.path.isdir(d)
           for f in sorted(os.listdir(d)) if f.startswith("_multiarray_umath") and f.endswith(".so")]
    facts["numpy_elf"] = elf_machine(sos[0]) if sos else "no _multiarray_umath*.so found"
    facts["ort_providers"] = ort.get_available_providers()

    import runtime.cli  # noqa: F401  the device side, as `python -m runtime` loads it
    import runtime.data
    import runtime.run
    import runtime.trainer  # noqa: F401
    from devices import detect_profile

    facts["heavy_modules"] = sorted(m for m in sys.modules
                                    if m.split(".")[0] in ("torch", "onnx", "sklearn"))
    facts["profile"] = detect_profile().name
    # Every import must come from the arm64 root (stdlib), the aarch64 site or the project
    # copy; sys.path[0] is this script's folder (or the working directory under -m).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    allowed = tuple(os.path.join(p, "") for p in (root, site, project))
    facts["foreign_path"] = [p for p in sys.path[1:] if not os.path.join(p, "").startswith(allowed)]
    facts["root"] = root
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
