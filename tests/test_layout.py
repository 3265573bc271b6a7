"""Repository hygiene the architecture relies on: no module shadows the standard library, the
two sides do not import each other, no machine-specific paths, long modules say why."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "export", "runtime", "devices")


def _modules(pkg: str) -> list[Path]:
    return sorted((REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_module_shadows_the_standard_library(pkg):
    # a module named like a stdlib one (e.g. runtime/tokenize.py) replaces it for any script run
    # from inside the package folder
    bad = [str(p.relative_to(REPO)) for p in _modules(pkg)
           if p.stem in sys.stdlib_module_names and p.stem != "__init__"]
    assert not bad, bad


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_export_and_runtime_do_not_import_each_other():
    """The contract is the only shared code; the CLI's lazy call into ``export`` (workstation
    commands) is the one allowed crossing."""
    for p in _modules("export"):
        assert "runtime" not in _imports(p), p
    for p in _modules("runtime"):
        if p.name in ("cli.py", "demo.py"):
            continue
        assert "export" not in _imports(p), p
    for p in _modules("contract"):
        assert not _imports(p) & {"torch", "onnx", "onnxruntime", "export", "runtime"}, p


def test_no_absolute_machine_paths():
    pattern = re.compile(r"/(work|home|root|Users|tmp/pytest)[/\w.-]*")
    files = [p for pkg in (*PACKAGES, "tests", "benchmarks", "docs") for p in (REPO / pkg).rglob("*")
             if p.suffix in (".py", ".md", ".toml") and p.is_file() and ".cache" not in p.parts]
    files += [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    hits = []
    for p in files:
        if p.name == "test_layout.py":
            continue
        for m in pattern.finditer(p.read_text(errors="replace")):
            hits.append(f"{p.relative_to(REPO)}: {m.group(0)}")
    assert not hits, hits


def test_long_modules_state_their_reason():
    """No module over ~500 lines without a reason stated at its top."""
    for pkg in PACKAGES:
        for p in _modules(pkg):
            lines = p.read_text().splitlines()
            if len(lines) > 520:
                head = "\n".join(lines[:40]).lower()
                assert "why one module" in head, f"{p.relative_to(REPO)}: {len(lines)} lines"
