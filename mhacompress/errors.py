"""Errors that are the user's to fix: the CLI prints their message on one line and exits non-zero."""

import inspect


class UsageError(Exception):
    """Bad input (a missing folder, an unreachable hub, an impossible key dim) with a hint on what to do instead."""


def check_callback(name: str, fn, what: str) -> None:
    """A callback (``on_progress``, ``on_result``, ...) that cannot be called with one argument is refused in one line
    before any work: not a TypeError at its first event, which for a sweep comes after a whole cell's work."""
    if fn is None:
        return
    if not callable(fn):
        raise UsageError(f"{name} must be a function taking {what}; got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: taken as it is
        return
    try:
        signature.bind(None)
    except TypeError:
        label = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise UsageError(f"{name} must be a function taking {what}; {label}{signature} cannot be called with "
                         f"one") from None
