"""Errors that are the user's to fix: the CLI prints their message on one line and exits non-zero."""

import contextvars
import functools
import inspect
from contextlib import contextmanager

_COMMAND_LINE = contextvars.ContextVar("mhacompress_command_line", default=False)


class UsageError(Exception):
    """Bad input (a missing folder, an unreachable hub, an impossible key dim) with a hint on what to do instead."""


class ConfigError(UsageError, ValueError):
    """An impossible setting (the message says which and what is allowed); the CLI exits 2 on it."""


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


@contextmanager
def command_line():
    """While a command runs (the CLI's ``user_errors``), messages name its options (``--max-drop``); elsewhere, in a
    Python call, the arguments that call takes (``max_drop``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def named(option: str, argument: str | None = None) -> str:
    """A setting as the user gave it: the ``option`` (``--max-drop``) on the command line, else its Python
    ``argument`` (default: the option without dashes, ``-`` as ``_``: ``max_drop``)."""
    if _COMMAND_LINE.get():
        return option
    return argument or option.lstrip("-").replace("-", "_")


def given(option: str, value, argument: str | None = None) -> str:
    """A setting with a value, as the user would write it: ``--opset 18`` on the command line, ``opset=18`` in
    Python (a string value quoted, unless it is an upper-case placeholder such as DIR)."""
    name = named(option, argument)
    if _COMMAND_LINE.get():
        return f"{name} {value}"
    return f"{name}={value}" if not isinstance(value, str) or value.isupper() else f"{name}={value!r}"


def out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError (CUDA, MPS) or its CPU allocator's error."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return "can't allocate memory" in text or "out of memory" in text


def memory_line(err: BaseException, names: list[str]) -> str:
    """The one line for an allocation that failed: what torch said (cut), then the settings that lower the memory
    (``names``, as the user gives them), then a larger device."""
    said = " ".join(str(err).split()).split(": ")[-1][:120] or type(err).__name__
    rest = f" (or {', '.join(names[1:])})" if names[1:] else ""
    smaller = f"pass a smaller {names[0]}{rest}, or " if names else ""
    return f"out of memory ({said}); {smaller}use a device with more memory"


def memory_refused(*options: str):
    """A decorator: an allocation that fails inside the call is a UsageError with ``memory_line`` (a Python caller
    gets the line the command prints), not a multi-line RuntimeError from torch's allocator."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (MemoryError, RuntimeError) as err:
                if not out_of_memory(err):
                    raise
                raise UsageError(memory_line(err, [named(o) for o in options])) from None
        return call
    return wrap


def imported(module: str, missing: str, install: str):
    """``module`` imported; refused in one line when it is not installed (``missing``: that line) or installed but
    broken (anything else raised at import: a version clash among its own dependencies, a shared library that will
    not load), naming the error and ``install``, the command that reinstalls it. Either way, a user's setup
    problem, not a traceback."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:
        # a missing dependency of the installed package is a broken install, not an absent one
        if isinstance(err, ModuleNotFoundError) and err.name == module.split(".")[0]:
            raise UsageError(missing) from None
        raise UsageError(f"{module} is installed but fails to import ({first_line(err, 160)}); reinstall it: "
                         f"{install}") from None


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err`` (at most ``limit`` characters of it): a UsageError (ConfigError too) by its
    message alone, which names the problem and the fix; anything else, a bug worth naming, with its type in front."""
    text = str(err).strip().splitlines()
    if isinstance(err, UsageError) and text:
        return text[0][:limit]
    return f"{type(err).__name__}: {text[0][:limit]}" if text else type(err).__name__
