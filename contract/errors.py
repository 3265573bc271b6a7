"""The error family shared by both sides: bad input the user can fix.

``UserError`` is raised for anything a user (or a bundle, which is untrusted data) can cause; the
CLI prints its message on one line and exits 2. ``ManifestError`` narrows it to a bundle whose
manifest or files do not satisfy the contract.
"""

from __future__ import annotations

__all__ = ["ManifestError", "UserError"]


class UserError(Exception):
    """Bad input (bundle, data, budget, option). The message names the problem and the way out."""


class ManifestError(UserError):
    """A bundle's manifest or one of its files breaks the contract (type, range, path, hash)."""
