"""User-facing errors.

A `UserError` is a mistake the user can fix (bad file, bad key, a run that already exists). The CLI prints its
message as one line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
