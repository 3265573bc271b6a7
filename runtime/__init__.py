"""Device side: train an instant-runtime bundle on plain onnxruntime. Never imports torch.

Importing the package itself is light (nothing heavy loads until used), so that
``python -m runtime`` installs its Ctrl-C handling before numpy and onnxruntime load.
"""

import os

# onnxruntime (1.32, Linux too) records usage events under ~/.cache/Microsoft and may send them;
# the runtime writes only into the folder it is given, and a device may hold private data: off,
# before any module of this package imports onnxruntime (a user's own setting wins)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__all__ = ["Bundle", "UserError", "open_bundle"]


def __getattr__(name: str):
    if name in ("Bundle", "open_bundle"):
        from . import bundle

        return getattr(bundle, name)
    if name == "UserError":
        from contract import UserError

        return UserError
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
