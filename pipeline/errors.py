"""Errors and warnings a user can cause; the command line prints them as one line."""


class RunoffError(Exception):
    """A problem with the user's input or options (exit status 2, no traceback)."""


class RunoffWarning(UserWarning):
    """Something the user should know about, but that does not stop the run."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception, for the one line a :class:`RunoffError`
    prints; its type's name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
