"""The one exception type for user-facing problems (bad input, impossible settings)."""


class ObertError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


def first_line(exc: BaseException) -> str:
    """First line of the innermost exception's message (libraries wrap the real cause)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
