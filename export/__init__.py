"""Workstation side: trace a model into an instant-runtime training bundle (uses torch)."""

from .bundle import FORMAT_VERSION, export_bundle, select_trainable
from .graph import ExportError

__all__ = ["FORMAT_VERSION", "ExportError", "export_bundle", "select_trainable"]
