"""The project's error root: the CLI prints any of these as one line and exits non-zero."""


class TomtitError(Exception):
    """A problem the user can act on (bad input, missing file, wrong bundle...)."""
