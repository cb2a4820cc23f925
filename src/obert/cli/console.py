"""The ``obert`` console script: runs ``obert.cli.main.main`` so that even a Ctrl-C while the CLI
and its libraries are still being imported ends with one line and exit code 130."""

import signal
import sys


def run() -> None:
    try:
        from obert.cli.main import main

        code = main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    # The outcome is decided and reported: a Ctrl-C while Python shuts down must not turn a
    # success into a silent exit 130.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
