"""``python -m obert.cli``: the obert command line."""

from obert.cli.console import run

run()
