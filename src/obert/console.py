"""The ``obert`` console script: runs ``obert.cli.main`` so that even a Ctrl-C while the CLI
and its libraries are still being imported ends with one line and exit code 130."""

import sys


def run() -> None:
    try:
        from .cli import main

        code = main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
