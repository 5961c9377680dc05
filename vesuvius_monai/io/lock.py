"""Exclusive locks on a run folder or an output store: a lock file created exclusively, naming its holder.

``with Lock(path, "run folder runs/a", "train"): ...`` creates ``path`` with ``O_CREAT | O_EXCL`` (one process
wins), writes into it who holds it (:class:`Holder`: pid, host, command, command line, start time) and removes it
on leaving the block, also on an error or Ctrl-C (with the folders it made for it, when they are empty again).
A second process is refused with one line naming the holder and
the lock file. A lock whose process is gone (same host, pid no longer running, or running since another time) is
stale: it is named in a warning and taken over; a lock of another host cannot be checked and is refused, naming the
file to delete if that run is dead. Locks are not re-entrant, and nobody waits for a live one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from vesuvius_monai.errors import VesuviusError, disk_errors

log = logging.getLogger(__name__)

READ_TRIES = 20  # a lock file is empty for a moment between its creation and its record: read again meanwhile
TAKE_TRIES = 100  # rounds of create / take over a stale lock before giving up


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: process ``pid`` on ``host`` (``boot``: the host's boot id, ``started``: the process's start
    tick, both Linux-only, to tell a reused pid), running ``command`` (``argv``: its command line) since ``since``;
    ``token`` tells this holding from any other."""

    pid: int
    host: str
    command: str
    argv: str
    since: str
    token: str
    boot: str = ""
    started: str = ""

    @classmethod
    def me(cls, command: str) -> Holder:
        pid = os.getpid()
        return cls(pid=pid, host=socket.gethostname(), command=command, argv=" ".join(sys.argv)[:500],
                   since=time.strftime("%Y-%m-%dT%H:%M:%S%z"), token=uuid.uuid4().hex, boot=_boot_id(),
                   started=_start_tick(pid))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder recorded in ``text``, or None when it is not a complete record."""
        try:
            raw = json.loads(text)
            holder = cls(**{k: raw[k] for k in ("pid", "host", "command", "argv", "since", "token")},
                         boot=str(raw.get("boot", "")), started=str(raw.get("started", "")))
        except (ValueError, KeyError, TypeError):
            return None
        return holder if isinstance(holder.pid, int) and holder.pid > 0 else None

    def alive(self) -> bool | None:
        """True while the holding process runs, False once it is gone, None when it runs on another host."""
        if self.host != socket.gethostname():
            return None
        if self.boot and self.boot != _boot_id():
            return False  # the host was restarted since
        if not _pid_runs(self.pid):
            return False
        now = _start_tick(self.pid)
        return not (self.started and now and now != self.started)  # another start time: the pid was reused

    def describe(self) -> str:
        return f"'{self.command}' (pid {self.pid} on host {self.host}, since {self.since})"


class Lock:
    """The lock file ``path`` of ``what`` (named in messages, e.g. "run folder runs/a"), taken for ``command``."""

    def __init__(self, path: str | os.PathLike, what: str, command: str) -> None:
        self.path = Path(path)
        self.what = what
        self.command = command
        self.holder: Holder | None = None  # set while held
        self.made: Path | None = None  # the first folder of the lock's folder that taking the lock made

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> Lock:
        """Take the lock (its folder made if needed); VesuviusError naming the holder when another process has it."""
        me = Holder.me(self.command)
        self.made = first_missing(self.path.parent)
        for _ in range(TAKE_TRIES):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise VesuviusError(f"cannot make the folder {self.path.parent} of {self.what} ({err.strerror})") \
                    from None
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is not None:
                    self._take_over(other)
                continue
            except FileNotFoundError:  # its folder was removed meanwhile (by a holder leaving): make it again
                continue
            except OSError as err:
                raise VesuviusError(f"cannot create the lock file {self.path} of {self.what} ({err.strerror})") \
                    from None
            self._write(fd, me)
            self.holder = me
            return self
        raise VesuviusError(f"could not take the lock {self.path} of {self.what}: other processes keep taking it")

    def release(self) -> None:
        """Remove the lock file, if it is still this holder's, and the folders taking it made, if they are empty."""
        if self.holder is None:
            return
        found = _parse_file(self.path)
        if found is not None and found.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            log.warning("%s is no longer the lock this process took; left as it is", self.path)
        self.holder = None
        _remove_empty(self.path.parent, self.made)

    # ----------------------------------------------------------------- steps

    def _write(self, fd: int, me: Holder) -> None:
        """Write the record into the lock file just created (removed again when that fails)."""
        try:
            with disk_errors(self.path), os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(asdict(me), indent=1))
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def _read(self) -> Holder | None:
        """The holder of the existing lock file; None when it vanished meanwhile. A file that stays unreadable is
        not a lock of ours: VesuviusError naming it."""
        for _ in range(READ_TRIES):
            if not self.path.exists():
                return None
            found = _parse_file(self.path)
            if found is not None:
                return found
            time.sleep(0.05)
        raise VesuviusError(f"{self.what} has a lock file {self.path} that is not a lock this program can read; if no "
                            f"vesuvius-monai command is using it, delete {self.path}")

    def _take_over(self, other: Holder) -> None:
        """Refuse a live (or unknown) holder; remove a stale lock so that two newcomers cannot both take it.

        Removing the stale lock needs a claim (``<lock>.<its token>.takeover``, created exclusively): one newcomer
        gets it, checks that the lock is still the stale one, removes it and drops the claim; the others look again.
        """
        alive = other.alive()
        if alive:
            raise VesuviusError(f"{self.what} is in use by {other.describe()}; lock file {self.path}: wait for it "
                                f"to finish or use another folder")
        if alive is None:
            raise VesuviusError(f"{self.what} is locked by {other.describe()}, which cannot be checked from host "
                                f"{socket.gethostname()}; if that command is no longer running, delete {self.path}")
        claim = self.path.with_name(f"{self.path.name}.{other.token}.takeover")
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._wait_for_claim(claim)
            return
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(asdict(Holder.me(self.command))))
            found = _parse_file(self.path)
            if found is not None and found.token == other.token:  # still the stale lock: no one else removes it
                log.warning("%s: taking over the lock %s of %s, which is no longer running", self.what, self.path,
                            other.describe())
                self.path.unlink()
        finally:
            claim.unlink(missing_ok=True)

    def _wait_for_claim(self, claim: Path) -> None:
        """Another newcomer is taking the stale lock over: give it a moment. A claim left by a newcomer that was killed
        meanwhile is refused, naming the files to delete."""
        owner = _parse_file(claim)
        if owner is not None and owner.alive() is False:
            raise VesuviusError(f"a take-over of the stale lock {self.path} of {self.what} was interrupted; if no "
                                f"command is using it, delete {self.path} and {claim}")
        time.sleep(0.02)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (``path`` itself or a parent) that does not exist; None when ``path`` does."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_empty(folder: Path, made: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``made`` (the outermost of them this process made) while they are empty
    (or gone already); a folder anything was put into stays, and so do its parents."""
    while made is not None and (folder == made or made in folder.parents):
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return
        folder = folder.parent


def _parse_file(path: Path) -> Holder | None:
    try:
        return Holder.parse(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _pid_runs(pid: int) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return _proc_stat(pid)[0] != "Z"


def _proc_stat(pid: int) -> tuple[str, str]:
    """(state, start tick) of process ``pid`` from /proc (Linux); ("", "") where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "", ""


def _start_tick(pid: int) -> str:
    return _proc_stat(pid)[1]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
