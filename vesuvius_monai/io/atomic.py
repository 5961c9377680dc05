"""Atomic output: write to a temporary sibling, then rename over the target.

A crash or an error mid-write leaves the previous file (or no file) in place, never a truncated one; a full disk or
a file-size limit is one line naming the file (``no space left on device writing PATH``). Folders are built in a
fresh hidden sibling (which records the process building it) and published with one rename, with the usual
permissions (``0o777 & ~umask``, as files get ``0o666 & ~umask``); a folder is only ever replaced when it holds
nothing but an earlier output of the same command (recorded in its owner file). The unfinished folders of a process
that is gone (killed) are removed by the next build of the same output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from vesuvius_monai.errors import VesuviusError, disk_errors
from vesuvius_monai.io.lock import Holder
from vesuvius_monai.io.paths import check_parents

log = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    ``suffix`` defaults to the target's full suffix (``.nii.gz`` stays ``.nii.gz``) so that writers
    which pick a format from the file name still work on the temporary path. A full disk, a file-size limit or a
    quota met while writing is a VesuviusError naming ``target`` (see :func:`disk_errors`); the temporary is removed.
    """
    target = Path(target)
    check_parents(target, "output")
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes)
    with disk_errors(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            if tmp_path.is_file():  # mkstemp makes 0600 files; give the output the usual permissions
                os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, target)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


OWNER_FILE = ".vesuvius_output.json"  # written into every folder a command publishes: what kind, which files
WORK_RECORD = ".vesuvius_work.json"  # in an unfinished folder: the process building it (removed on publishing)


def work_dir_beside(target: str | os.PathLike, kind: str = "output") -> Path:
    """A new folder beside ``target`` (hidden, unique name ``.<name>.*.partial``) in which to build a ``kind``
    output before publishing it; it holds only :data:`WORK_RECORD`, naming this process."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    write_text(work / WORK_RECORD, json.dumps(dataclasses.asdict(Holder.me(kind)), indent=1))
    return work


def work_dirs_left(target: str | os.PathLike) -> list[Path]:
    """The unfinished folders of ``target`` (:func:`work_dir_beside`) whose process is gone: killed before it could
    publish or clean up. Folders without a record, of a live process or of another host are not listed."""
    target = Path(target)
    gone = []
    for folder in sorted(target.parent.glob(f".{glob.escape(target.name)}.*.partial")):
        try:
            holder = Holder.parse((folder / WORK_RECORD).read_text())
        except (OSError, UnicodeDecodeError):
            continue
        if holder is not None and holder.alive() is False:
            gone.append(folder)
    return gone


def clean_work_dirs(target: str | os.PathLike) -> None:
    """Remove the unfinished folders of ``target`` left by processes that are gone (:func:`work_dirs_left`)."""
    for folder in work_dirs_left(target):
        log.info("removing %s, an unfinished output of a process that is no longer running", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _files_under(folder: Path) -> list[str]:
    """Relative paths of every file (not folder) under ``folder``, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def check_replaceable_file(path: str | os.PathLike, ours: Callable[[Path], bool], message: str) -> None:
    """Raise ``VesuviusError(message)`` unless ``path`` is free, or a file that ``ours(path)`` recognises as an
    earlier output of the same command (an unreadable file, or one ``ours`` fails on, is not ours)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        mine = path.is_file() and ours(path)
    except Exception:  # unreadable or damaged: not ours either way
        mine = False
    if not mine:
        raise VesuviusError(message)


def check_replaceable(target: str | os.PathLike, kind: str, name: str = "output folder") -> None:
    """Raise unless publishing a folder at ``target`` would delete no file that an earlier ``kind`` output did not
    write.

    Fine: no ``target``, an empty folder, or a folder published earlier as ``kind`` that still holds only the files
    it was published with. Anything else (a file, a foreign folder, extra files) is a VesuviusError naming ``name``,
    the folder and one of the files in the way.
    """
    target = Path(target)
    check_parents(target, name)
    if not target.exists():
        return
    if not target.is_dir():
        raise VesuviusError(f"{name} {target} is an existing file, not a folder; choose another {name}")
    try:
        record = json.loads((target / OWNER_FILE).read_text())
        ours = set(record["files"]) if record["kind"] == kind else set()
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    foreign = [f for f in _files_under(target) if f not in ours | {OWNER_FILE}]
    if foreign:
        raise VesuviusError(f"{name} {target} already holds files this command did not write (e.g. {foreign[0]}); "
                            f"nothing was changed there: choose another {name} or move them away")


def publish_dir(work: Path, target: str | os.PathLike, kind: str, name: str = "output folder") -> Path:
    """Move the finished folder ``work`` to ``target`` in one rename, recording its files as a ``kind`` output.

    ``target`` must pass :func:`check_replaceable`: only an earlier output of the same kind is replaced.
    """
    target = Path(target)
    (work / WORK_RECORD).unlink(missing_ok=True)
    write_text(work / OWNER_FILE, json.dumps({"kind": kind, "files": _files_under(work) + [OWNER_FILE]}, indent=1))
    check_replaceable(target, kind, name)
    os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the output the usual permissions
    replace_dir(work, target)
    return target


def build_dir(target: str | os.PathLike, kind: str, build: Callable[[Path], T], name: str = "output folder") -> T:
    """Build a folder output with ``build(work)`` in a fresh folder beside ``target``, then publish it at ``target``
    in one rename (:func:`publish_dir`): ``target`` appears complete or not at all. Returns what ``build`` returns.

    ``target`` is checked first (:func:`check_replaceable`: only an earlier ``kind`` output is replaced); on any
    error the unfinished folder, this command's own, is removed. Unfinished folders of ``target`` left by killed
    processes are removed first (:func:`clean_work_dirs`).
    """
    check_replaceable(target, kind, name)
    clean_work_dirs(target)
    work = work_dir_beside(target, kind)
    try:
        result = build(work)
        publish_dir(work, target, kind, name)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


def replace_dir(source: Path, target: Path) -> None:
    """Move folder ``source`` onto ``target``; an existing ``target`` folder is swapped out, then deleted.

    Callers check first that ``target`` holds nothing they did not write (:func:`check_replaceable`).
    """
    source, target = Path(source), Path(target)
    if not target.exists():
        os.replace(source, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old)  # onto the empty folder just made: a unique name, never someone else's
    os.replace(source, target)
    shutil.rmtree(old)
