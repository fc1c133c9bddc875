"""What every command shares: one-line errors, JSON on stdout, rich on stderr, progress bars."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys

import click


def console():
    from rich.console import Console

    return Console(stderr=True)


def emit_json(obj: dict, command: str, device=None) -> None:
    """Exactly one JSON object on stdout: the envelope (schema_version, versions, device; see schema.json) first."""
    from ..schema import envelope, strict

    plain = json.loads(json.dumps({**envelope(command, device), **obj}, default=float))  # numpy / torch scalars too
    if sys.stdout is None:  # started with stdout closed (>&-): Python has no stream, and click.echo drops the text
        raise click.ClickException("cannot write the JSON result: stdout is closed (the command's work is done, and "
                                   "any output it names was written); run it with stdout open or redirected to a file")
    try:
        click.echo(json.dumps(strict(plain), allow_nan=False))
        sys.stdout.flush()
    except OSError as err:
        if err.errno == errno.EPIPE:  # the reader went away (| head): click ends quietly, exit 1
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere, quietly
        raise click.ClickException(f"cannot write the JSON result to stdout: {err.strerror or err} (the command's "
                                   f"work is done, and any output it names was written; free the space, or redirect "
                                   f"stdout to another file)") from None


class BadSetting(click.ClickException):
    """A setting refused after parsing (a key dim of 0, --refine without --calibrate, a key dim wider than the model):
    exit 2, as click's own refusals of an option's type or range, so that a script tells a bad command line (2) from
    a model, data or file that failed (1)."""

    exit_code = 2


@contextlib.contextmanager
def user_errors():
    """Turn expected failures (bad input, unsupported models, a full disk) into a one-line ClickException: exit 1 (2
    for a bad setting, ``BadSetting``), no traceback. Ctrl-C and SIGTERM pass through to the command group, which
    reports them (see cli.main). A current folder that was deleted is refused first: torch's libraries would fail to
    load, ending the process."""
    from ..errors import ConfigError, UsageError, command_line, memory_line, out_of_memory

    try:
        os.getcwd()
    except FileNotFoundError:
        raise click.ClickException("the current folder no longer exists (it was deleted or moved); cd to an "
                                   "existing folder and run the command again") from None
    try:
        with command_line():  # messages name the options (--max-drop), not the Python arguments (max_drop)
            yield
    except click.ClickException:
        raise
    except UsageError as err:
        raise (BadSetting if isinstance(err, ConfigError) else click.ClickException)(one_line(str(err))) from None
    except ValueError as err:
        from ..reduction.modeling import UnsupportedModelError

        if isinstance(err, UnsupportedModelError):
            raise click.ClickException(one_line(str(err))) from None
        raise
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        raise click.ClickException(memory_line(err, _smaller_options())) from None
    except OSError as err:  # the file system refused (disk full, permissions changed mid-run): nothing was replaced
        where = f" {err.filename}" if err.filename else ""
        raise click.ClickException(f"cannot access{where}: {err.strerror or err}; nothing was replaced (check the "
                                   f"path, its permissions and free space)") from None


def _smaller_options() -> list[str]:
    """What the running command takes that lowers its memory (--batch-size, --samples...), so that the
    out-of-memory line suggests no option the command lacks."""
    ctx = click.get_current_context(silent=True)
    names = {o for p in ctx.command.params for o in getattr(p, "opts", ())} if ctx else set()
    return [o for o in ("--batch-size", "--seq-len", "--samples", "--limit") if o in names]


def interval_text(interval: list[float] | None) -> str:
    """A drop's 95% bootstrap interval as the tables show it ('' where there is none)."""
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else ""


def one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def device_option(what: str = "Where to compute"):
    """--device, shared by every command that computes; resolve it with ``resolved_device``."""
    return click.option("--device", default="auto", show_default=True, help=f"{what}: auto (CUDA, then MPS, then "
                        "CPU), cpu, cuda, cuda:N or mps. A device this machine lacks is refused at once.")


def resolved_device(spec: str) -> str:
    """The device string for ``spec`` (auto resolved), or a one-line UsageError when it does not exist here."""
    from ..devices import resolve_device

    return str(resolve_device(spec))


def allow_pickle_option(f):
    """--allow-pickle, shared by every command that loads a checkpoint."""
    return click.option("--allow-pickle", is_flag=True, help="Also load pickled (.bin) weights, which can run code "
                        "when loaded. Only for checkpoints you trust.")(f)


def task_names() -> str:
    """The GLUE tasks, from the task table (eval/tasks.py imports no torch)."""
    from ..eval.tasks import TASKS

    return ", ".join(TASKS)


def first_token_option(help_tail: str):
    """--first-token-only, shared by reduce, eval, report and export."""
    return click.option("--first-token-only", is_flag=True, help="Exact [CLS] shortcut for reduced sequence "
                        "classifiers: the last layer computes attention and feed-forward for the first token only "
                        "(logits unchanged). " + help_tail)


def status(text: str, enabled: bool = True):
    """A spinner with ``text`` on stderr while a step without a count runs (loading, exporting, timing)."""
    if not enabled:
        return contextlib.nullcontext()
    return console().status(text, spinner="dots")


def progress(enabled: bool = True):
    """A rich progress bar on stderr, shown only on a terminal: transient bars show nothing in a CI log, and stopping
    them there printed a blank line (above the one-line error of a command refused after its work began)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stderr = console()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=stderr, transient=True, disable=not enabled or not stderr.is_terminal)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (click lets them through: every comparison with nan is False).
    ``FiniteFloat()``: any finite number."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            ranged = self.min is not None or self.max is not None
            wanted = f"a number in the range {self._describe_range()}" if ranged else "a finite number"
            self.fail(f"{value!r} is not a finite number; give {wanted}", param, ctx)
        return number

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:  # click would print "x<=None"
            return "finite"
        return super()._describe_range()


def given_on_command_line(*names: str) -> bool:
    """Whether any of these parameters of the running command was typed (not its default): options that only mean
    something beside another are refused alone, not ignored."""
    from click.core import ParameterSource

    context = click.get_current_context()
    return any(context.get_parameter_source(name) is ParameterSource.COMMANDLINE for name in names)


def integers(text: str) -> list[int] | None:
    """Comma-separated decimal integers written in ASCII digits (an optional sign, spaces around), else None: int()
    alone also reads '٨' (an Arabic-Indic eight) and '1_0' as numbers."""
    import re

    parts = text.split(",")
    if not all(re.fullmatch(r"\s*[+-]?[0-9]+\s*", part) for part in parts):
        return None
    return [int(part) for part in parts]


def parse_dims(text: str, option: str = "--key-dims") -> list[int]:
    """Comma-separated positive integers (``--key-dims``), one line of error otherwise."""
    from ..errors import ConfigError

    dims = integers(text) or []
    if not dims or any(k < 1 for k in dims):
        raise ConfigError(f"{option} takes comma-separated positive integers, e.g. 48,96,192; got {text!r}")
    return dims


def method_choice():
    """--method choices from the registry (which imports no torch), in any case (CP is cp), as --format is."""
    from ..reduction import methods

    return click.Choice(methods.names(), case_sensitive=False)


def method_help() -> str:
    from ..reduction import methods

    return "; ".join(f"{name}: {summary}" for name, summary in methods.summaries().items()) + "."


class ProgressBars:
    """Render ``mhacompress.Progress`` events: one bar per stage family (the text before ':'), a spinner for steps
    without a count. A context manager; hidden when ``enabled`` is False (--json) and off a terminal (``progress``).
    The bars start at the first event: a command refused before any work shows no empty display."""

    def __init__(self, enabled: bool = True):
        self.bars = progress(enabled)
        self.tasks: dict[str, int] = {}
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc) if self.started else None

    def __call__(self, event) -> None:
        if not self.started:
            self.bars.__enter__()
            self.started = True
        family = event.stage.split(":")[0]
        if family not in self.tasks:
            self.tasks[family] = self.bars.add_task(event.stage, total=event.total or None)
        self.bars.update(self.tasks[family], description=event.stage, completed=event.done,
                         total=event.total or None)
