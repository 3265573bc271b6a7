"""Device side: train an instant-runtime bundle on plain onnxruntime. Never imports torch."""

from .bundle import Bundle, open_bundle
from .errors import UserError

__all__ = ["Bundle", "UserError", "open_bundle"]
