"""The `mhacompress` command line. Commands are thin: parse, call the library, render (rich on stderr, --json on
stdout). Heavy imports (torch, transformers) happen inside commands so that `mhacompress --help` is instant."""

from __future__ import annotations

import click

from .. import __version__
from .reduce import reduce


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mhacompress")
def main():
    """Compress the self-attention of Hugging Face encoders without retraining.

    \b
    Quick start (the bundled MiniLM, no network):
      mhacompress reduce minilm --key-dim 96 --output out/minilm-cp96
    """


main.add_command(reduce)
