"""The error family shared by both sides: bad input the user can fix.

``UserError`` is raised for anything a user (or a bundle, which is untrusted data) can cause; the
CLI prints its message on one line and exits 2. ``ManifestError`` narrows it to a bundle whose
manifest or files do not satisfy the contract.
"""

from __future__ import annotations

import re

__all__ = ["ManifestError", "UserError", "ort_message"]


class UserError(Exception):
    """Bad input (bundle, data, budget, option). The message names the problem and the way out."""


class ManifestError(UserError):
    """A bundle's manifest or one of its files breaks the contract (type, range, path, hash)."""


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
# a C++ source location and function signature: "/onnxruntime_src/.../x.h:46 void ns::f(...) "
_ORT_WHERE = re.compile(r"(?:/|\b)[\w./-]+\.(?:h|cc|cpp|hpp|cu):\d+ (?:[^()]*\([^()]*\)"
                        r"(?: const)? ?|(?=[A-Z][a-z]*\b))")  # or a bare location (session 27)


def ort_message(exc: BaseException, limit: int = 240) -> str:
    """onnxruntime's exception as one readable line: without its "[ONNXRuntimeError] : 1 :
    FAIL :" prefix and the C++ source location and signature that often fill the first 300
    characters (session 23 probe: an opset-999 graph's error was cut off inside the
    signature, before its reason)."""
    text = " ".join(str(exc).split())
    text = _ORT_WHERE.sub("", _ORT_PREFIX.sub("", text)).strip()
    return text[:limit] if text else type(exc).__name__
