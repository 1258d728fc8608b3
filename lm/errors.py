"""The one exception type for bad user input; CLIs turn it into a one-line message and exit 2."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it, in one line."""
