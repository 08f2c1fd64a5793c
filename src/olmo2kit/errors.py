"""The one exception type users see."""


class Olmo2KitError(Exception):
    """A user error: bad input, missing file, unreachable model.

    The message says what went wrong and what to do next. The CLI prints it
    as one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """
