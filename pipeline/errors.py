"""Errors and warnings a user can cause; the command line prints them as one line."""


class RunoffError(Exception):
    """A problem with the user's input or options (exit status 2, no traceback)."""


class RunoffWarning(UserWarning):
    """Something the user should know about, but that does not stop the run."""
