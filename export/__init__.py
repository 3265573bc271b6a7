"""Workstation side: trace a model into an instant-runtime training bundle (uses torch and onnx).

Attributes are imported lazily, so ``export.report`` (matplotlib) or ``export.graph`` can be used
without loading the exporter.
"""

from __future__ import annotations

__all__ = ["ExportError", "export_bundle", "select_trainable"]


def __getattr__(name: str):
    if name in ("export_bundle", "select_trainable"):
        from . import bundle

        return getattr(bundle, name)
    if name == "ExportError":
        from .graph import ExportError

        return ExportError
    raise AttributeError(f"module 'export' has no attribute {name!r}")
