"""Errors that reach the user as one line and exit code 2, never as a traceback."""


class UserError(Exception):
    """A problem with what the user gave us (spec, flags, data folder, cluster): fixable without reading code."""
