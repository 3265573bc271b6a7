"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input (bundle, data, budget, option). The message names the problem and the way out."""
