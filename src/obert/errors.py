"""The one exception type for user-facing problems (bad input, impossible settings)."""


class ObertError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""
