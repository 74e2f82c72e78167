"""The one error type users see: a one-line message naming what was wrong and what is valid."""


class GradestError(ValueError):
    """Bad input. The CLI prints its message on one line and exits with code 2."""
