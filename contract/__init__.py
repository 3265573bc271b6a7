"""The bundle contract: the typed manifest, the special graph names, shared file helpers and the
error family. Imported by both ``export/`` (writes bundles) and ``runtime/`` (reads them); imports
neither, nor torch, nor onnx (numpy only, for ``.npz`` files)."""

from . import names
from .errors import ManifestError, UserError
from .files import (
                    atomic_write,
                    bundle_in_use,
                    deferred_signals,
                    drop_dead_staging,
                    file_sha256,
                    hold_bundle,
                    hold_file,
                    json_text,
                    let_go,
                    open_listed,
                    read_listed,
                    read_npz,
                    refuse_special,
                    release_bundles,
                    write_npz,
                    write_text,
)
from .manifest import (
                    FORMAT,
                    FORMAT_VERSION,
                    FileEntry,
                    GraphFiles,
                    GraphIO,
                    ImageSpec,
                    InstantSettings,
                    InstantSpec,
                    LayerInfo,
                    Lookup,
                    LossSpec,
                    Manifest,
                    ParamSpec,
                    PrefixSpec,
                    TensorSpec,
                    TextSpec,
                    WeightEntry,
                    manifest_json,
                    read_manifest,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "FileEntry", "GraphFiles", "GraphIO", "ImageSpec",
    "InstantSettings", "InstantSpec", "LayerInfo", "LossSpec", "Lookup", "Manifest",
    "ManifestError", "ParamSpec", "PrefixSpec", "TensorSpec", "TextSpec", "UserError", "WeightEntry",
    "atomic_write", "bundle_in_use", "deferred_signals", "drop_dead_staging", "file_sha256", "hold_bundle", "hold_file", "let_go", "json_text", "manifest_json", "names", "open_listed", "read_listed", "read_npz", "refuse_special", "release_bundles",
    "read_manifest", "write_npz", "write_text",
]
