"""What the user is told: the one exception type the command line turns into a one-line
message, and the one type of a progress reporter (a function that takes a sentence)."""

from typing import Callable

#: Where a library function says what it is doing or chose: the command line passes its stderr
#: printer, the Python API nothing or ``print``, the web app its log.
Report = Callable[[str], None]


class UserError(Exception):
    """Something the user can fix: the message says what happened and what to do."""
