"""The `mhacompress` command line. Commands are thin: parse, call the library, render (rich on stderr, --json on
stdout). Heavy imports (torch, transformers) happen inside commands so that `mhacompress --help` is instant."""

from __future__ import annotations

import click

from .. import __version__
from .analyze import analyze
from .eval import eval_
from .export import export
from .finetune import finetune
from .reduce import reduce
from .report import report
from .sweep import sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
