"""The one error type users see: a one-line message naming what was wrong and what is valid."""


class GradestError(ValueError):
    """Bad input. The CLI prints its message on one line and exits with code 2."""


def one_line(message) -> str:
    """A message folded onto one line, as the CLI prints errors."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())
