"""Errors that reach the user as one line and exit code 2, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (spec, flags, data folder, cluster): fixable without reading code."""


def one_line(exc: BaseException, *, last: bool = False, with_type: bool = False, limit: int = 0) -> str:
    """An exception as one line of text: its first line (or its last, where a traceback ends with the cause),
    else its type's name; optionally prefixed by that type and cut to `limit` characters."""
    lines = str(exc).strip().splitlines()
    text = (lines[-1] if last else lines[0]) if lines else type(exc).__name__
    if with_type and lines:
        text = f"{type(exc).__name__}: {text}"
    return text if not limit or len(text) <= limit else text[: limit - 3] + "..."
