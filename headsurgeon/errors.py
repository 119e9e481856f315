"""The one exception type users see: a short message that names the problem and the fix."""


class HeadsurgeonError(ValueError):
    """Bad input or an unsupported model; the CLI prints it as one line and exits non-zero."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-blank line of an exception's message for a one-line error; its type name when the
    message is empty (``str(e).splitlines()[0]`` would raise an IndexError in the error path itself)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(e).__name__
