"""What every command shares: one-line errors, JSON on stdout, rich on stderr, progress bars."""

from __future__ import annotations

import contextlib
import json
import sys

import click


def console():
    from rich.console import Console

    return Console(stderr=True)


def emit_json(obj: dict) -> None:
    """Exactly one JSON object on stdout."""
    click.echo(json.dumps(obj, default=float))


@contextlib.contextmanager
def user_errors():
    """Turn expected failures (bad input, unsupported models) into a one-line ClickException: exit 1, no traceback."""
    from ..errors import UsageError

    try:
        yield
    except click.ClickException:
        raise
    except UsageError as err:
        raise click.ClickException(str(err)) from None
    except ValueError as err:
        from ..compress.config import ConfigError
        from ..compress.modeling import UnsupportedModelError

        if isinstance(err, (ConfigError, UnsupportedModelError)):
            raise click.ClickException(str(err)) from None
        raise
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)


def progress(enabled: bool = True):
    """A rich progress bar on stderr (hidden when stderr is not a terminal and nothing would be shown)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console(), transient=True, disable=not enabled)
