"""The `mhacompress` command line. Commands are thin: parse, call the library, render (rich on stderr, --json on
stdout). Heavy imports (torch, transformers) happen inside commands so that `mhacompress --help` is instant."""

from __future__ import annotations

import contextlib
import signal
import sys

import click

from .. import __version__, fsio
from .analyze import analyze
from .eval import eval_
from .export import export
from .finetune import finetune
from .reduce import reduce
from .report import report
from .sweep import sweep


class _Main(click.Group):
    """The command group, run so that SIGTERM, SIGHUP and Ctrl-C end a command through its cleanup code (temporary
    folders removed, previous outputs kept, locks released) with one line on stderr and exit 128 + signal."""

    def main(self, *args, **kwargs):
        with fsio.signals_as_exceptions():
            try:
                return super().main(*args, **kwargs)
            except (KeyboardInterrupt, fsio.Terminated) as err:  # arrived outside a command (while parsing)
                sys.exit(_stopped(err))
            finally:
                fsio.release_all()

    def make_context(self, *args, **kwargs):
        with _one_line_usage():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        try:
            with _one_line_usage():  # a command's own options are parsed in here
                return super().invoke(ctx)
        except (KeyboardInterrupt, fsio.Terminated) as err:
            raise click.exceptions.Exit(_stopped(err)) from None


class _OneLineUsageError(click.UsageError):
    """click's usage error (an unknown option, a value out of range...) as one line: what was wrong, then where the
    options are described (click would print the usage and a blank line first)."""

    def show(self, file=None) -> None:
        where = f"mhacompress {self.ctx.command_path.partition(' ')[2]}".strip() if self.ctx else "mhacompress"
        click.echo(f"Error: {self.format_message().rstrip('.')}; see '{where} --help'", file=file, err=file is None)


_HELP_INSTEAD = getattr(click.exceptions, "NoArgsIsHelpError", ())  # `mhacompress` alone: the help, as it is


@contextlib.contextmanager
def _one_line_usage():
    try:
        yield
    except (_OneLineUsageError, _HELP_INSTEAD):
        raise
    except click.UsageError as err:
        raise _OneLineUsageError(" ".join(err.format_message().split()), err.ctx) from None


def _stopped(err: BaseException) -> int:
    """One line on stderr for a run stopped by a signal; its exit status (130 for Ctrl-C, 143 for SIGTERM). The run
    is stopping: a second signal is ignored from here on (until signals_as_exceptions restores the handlers), so that
    it cannot cut short the cleanup that follows (locks, folders made for the output) with a traceback."""
    for s in fsio.CAUGHT:
        signal.signal(s, signal.SIG_IGN)
    signum = getattr(err, "signum", signal.SIGINT)
    done = f"{', '.join(fsio.WRITTEN)} was written before that" if fsio.WRITTEN else "nothing was written"
    click.echo(f"stopped by {fsio.signal_name(signum)}; {done}, no partial output left", err=True)
    return 128 + signum


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mhacompress")
def main():
    """Compress the self-attention of Hugging Face encoders without retraining.

    \b
    Quick start (the bundled MiniLM, no network):
      mhacompress reduce minilm --key-dim 96 --output out/minilm-cp96
    """
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Our own progress bars and tables own stderr: silence the libraries' download/loading bars and chatter."""
    import os
    import sys

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # already imported (e.g. when called from Python): switch it off directly
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()


for command in (reduce, eval_, finetune, sweep, analyze, report, export):
    main.add_command(command)
