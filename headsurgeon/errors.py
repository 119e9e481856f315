"""The one exception type users see: a short message that names the problem and the fix."""


class HeadsurgeonError(ValueError):
    """Bad input or an unsupported model; the CLI prints it as one line and exits non-zero."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message for a one-line error; its type name when the message is
    empty (``str(e).splitlines()[0]`` would raise an IndexError in the error path itself)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
