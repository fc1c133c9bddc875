"""``python -m mhacompress``: the same command line as the ``mhacompress`` script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="mhacompress")
