"""The reduction methods, registered once each. This module imports no torch (the CLI reads the names for
``--method`` at ``--help`` time); ``get(name)`` imports the method's own file, which holds its solvers, factor
layout and cost formula (see base.Method). Adding a method is one new file in this folder plus one ``register``
line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str
    module: str  # the file that implements it, relative to this package
    summary: str  # one line for --help


_REGISTRY: dict[str, Entry] = {}


def register(name: str, module: str, summary: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = Entry(name, module, summary)


register("cp", ".cp", "collaborative heads: shared U, V with a per-head diagonal mixing (CP of the score tensor)")
register("tucker", ".tucker", "shared U, V with a full per-head core (Tucker-2 of the score tensor)")
register("svd", ".svd", "per-head truncated SVD: shrinks each head instead of sharing (the baseline; key dim split "
         "evenly over heads)")

SOLVERS = ("structured", "tensorly")  # the fast structured solvers (default) and tensorly on the dense tensor


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def summaries() -> dict[str, str]:
    return {name: entry.summary for name, entry in _REGISTRY.items()}


def get(name: str):
    """The method object (a base.Method) registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return importlib.import_module(_REGISTRY[name].module, __name__).METHOD
