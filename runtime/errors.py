"""The one exception family for bad user input (defined in ``contract``, shared with export):
the CLI prints its message on one line, exit 2."""

from __future__ import annotations

from contract.errors import ManifestError, UserError

__all__ = ["ManifestError", "UserError"]
