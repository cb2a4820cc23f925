"""The `obert` command line (typer): one function per command, one-line errors."""
