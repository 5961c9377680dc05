"""Atomic output: write to a temporary sibling, then rename over the target.

A crash or an error mid-write leaves the previous file (or no file) in place, never a truncated one. Folders are
built in a fresh hidden sibling and published with one rename; a folder is only ever replaced when it holds nothing
but an earlier output of the same command (recorded in its owner file).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from vesuvius_monai.errors import VesuviusError

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    ``suffix`` defaults to the target's full suffix (``.nii.gz`` stays ``.nii.gz``) so that writers
    which pick a format from the file name still work on the temporary path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes)
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


def work_dir_beside(target: str | os.PathLike) -> Path:
    """A new empty folder beside ``target`` (hidden, unique name) in which to build an output before publishing it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))


OWNER_FILE = ".vesuvius_output.json"  # written into every folder a command publishes: what kind, which files


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
    write_text(work / OWNER_FILE, json.dumps({"kind": kind, "files": _files_under(work) + [OWNER_FILE]}, indent=1))
    check_replaceable(target, kind, name)
    replace_dir(work, target)
    return target


def build_dir(target: str | os.PathLike, kind: str, build: Callable[[Path], T], name: str = "output folder") -> T:
    """Build a folder output with ``build(work)`` in a fresh folder beside ``target``, then publish it at ``target``
    in one rename (:func:`publish_dir`): ``target`` appears complete or not at all. Returns what ``build`` returns.

    ``target`` is checked first (:func:`check_replaceable`: only an earlier ``kind`` output is replaced); on any
    error the unfinished folder, this command's own, is removed.
    """
    check_replaceable(target, kind, name)
    work = work_dir_beside(target)
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
