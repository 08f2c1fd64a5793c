"""The one exception type users see."""


class Olmo2KitError(Exception):
    """A user error: bad input, missing file, unreachable model.

    The message says what went wrong and what to do next. The CLI prints it
    as one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
