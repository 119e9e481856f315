"""The one exception type users see: a short message that names the problem and the fix."""


class HeadsurgeonError(ValueError):
    """Bad input or an unsupported model; the CLI prints it as one line and exits non-zero."""
