"""The one exception type for bad user input.

Every problem a user can fix (a missing or corrupt file, a shape mismatch, an unknown config key, ...)
raises :class:`VesuviusError` with a message that names the file or key and says what is wrong.
The CLI turns it into one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""


import difflib
from typing import Iterable


class VesuviusError(Exception):
    """A problem with the user's input, config or files; the message names the culprit."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``options``, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
