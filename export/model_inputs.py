"""What the export takes from the user before any tracing: ``--input-shape`` parsed into example
arrays, and the ``file.py:factory`` that builds the torch module (its errors one line each)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

from .graph import ExportError

__all__ = ["DTYPES", "example_arrays", "parse_input_shapes"]


DTYPES = ("float32", "float64", "float16", "int64", "int32", "bool")


EXAMPLE_MAX_BYTES = 4 << 30  # an example input larger than this is a typo, not a model


def parse_input_shapes(text: str) -> list[tuple[tuple[int, ...], str]]:
    """``32,1,8,8`` or ``8,64:int64;8,64:int64`` (one shape per model input, batch first, with
    an optional dtype, default float32)."""
    shapes = []
    for part in text.split(";"):
        dims_text, _, dtype = part.partition(":")
        dtype = dtype.strip() or "float32"
        if dtype not in DTYPES:
            raise ExportError(f"invalid --input-shape '{text}': unknown dtype '{dtype}'; "
                              f"use one of {', '.join(DTYPES)}")
        try:
            dims = tuple(int(d) for d in dims_text.split(",") if d.strip())
        except ValueError:
            raise ExportError(f"invalid --input-shape '{text}': expected comma-separated "
                              "integers, e.g. 32,1,8,8 or 8,64:int64 (use ';' between "
                              "inputs)") from None
        if not dims or any(d <= 0 for d in dims):
            raise ExportError(f"invalid --input-shape '{text}': dims must be positive")
        if math.prod(dims) * np.dtype(dtype).itemsize > EXAMPLE_MAX_BYTES:
            raise ExportError(f"invalid --input-shape '{text[:80]}': an example input of "
                              f"{math.prod(dims):.3g} elements is too large (at most "
                              f"{EXAMPLE_MAX_BYTES >> 30} GiB); the example batch can be small, "
                              "e.g. 8")
        shapes.append((dims, dtype))
    return shapes


def example_arrays(text: str) -> list[np.ndarray]:
    """Example inputs for ``--input-shape``: float noise, or ones for integer inputs (valid
    token ids and attention masks for any vocabulary)."""
    rng = np.random.default_rng(0)
    out = []
    for dims, dtype in parse_input_shapes(text):
        if np.dtype(dtype).kind == "f":
            out.append(rng.standard_normal(dims).astype(dtype))
        else:
            out.append(np.ones(dims, dtype=dtype))
    return out


def _load_factory(spec: str):
    path, _, fn = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"model file '{path}' not found (expected path/to/file.py:factory)")
    mod_spec = importlib.util.spec_from_file_location(f"_user_model_{file.stem}", file)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # the file may import modules next to it, as python file.py would
    try:
        try:
            mod_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's file may raise anything
            raise ExportError(f"cannot import model file '{path}': {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        factory = getattr(module, fn, None)
        if not callable(factory):
            avail = [n for n in dir(module)
                     if callable(getattr(module, n)) and not n.startswith("_")]
            raise ExportError(f"'{fn}' is not a function in {path}; callables there: "
                              f"{', '.join(avail) or 'none'}")
        try:
            return factory()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code may raise anything
            what = "exits" if isinstance(exc, SystemExit) else "fails"
            raise ExportError(f"factory '{fn}' in {path} {what}: {type(exc).__name__}: "
                              f"{_first_line(exc)}; it must take no arguments and return the "
                              "torch module") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (torch's carry URLs and graph dumps after it)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = line.split(" Please feel free to request support")[0].split("  [Caused by")[0]
    return line[:300]
