"""The one exception type for bad user input.

Every problem a user can fix (a missing or corrupt file, a shape mismatch, an unknown config key, ...)
raises :class:`VesuviusError` with a message that names the file or key and says what is wrong.
The CLI turns it into one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
A full disk, a file-size limit or a quota met while writing is one too (:func:`disk_errors`): the user can make room.
"""


import contextlib
import difflib
import errno
import os
from typing import Iterable, Iterator


class VesuviusError(Exception):
    """A problem with the user's input, config or files; the message names the culprit."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``options``, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large",
             getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded"}


def disk_full(err: BaseException | None) -> str | None:
    """What ran out ("no space left on device", "file too large", "disk quota exceeded") when ``err`` or an error it
    came from (``__cause__`` / ``__context__``; torch wraps the OSError of a failed write) is a full disk, a file-size
    limit or a quota; None otherwise."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return DISK_FULL[err.errno]
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a file-size limit or a quota met inside the block into ``VesuviusError("no space left on
    device writing PATH")`` (or "file too large", "disk quota exceeded"); other errors pass unchanged."""
    try:
        yield
    except VesuviusError:
        raise
    except Exception as err:
        what = disk_full(err)
        if what is None:
            raise
        raise VesuviusError(f"{what} writing {path}") from err
