"""The one exception type the command line turns into a one-line message."""


class UserError(Exception):
    """Something the user can fix: the message says what happened and what to do."""
