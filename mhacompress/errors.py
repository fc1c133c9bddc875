"""Errors that are the user's to fix: the CLI prints their message on one line and exits non-zero."""


class UsageError(Exception):
    """Bad input (a missing folder, an unreachable hub, an impossible key dim) with a hint on what to do instead."""
