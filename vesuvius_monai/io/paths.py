"""Names that come from files (fragment ids, volume names) made safe to use as file names, and output paths
checked to lie where they should.

A fragment id from a dataset YAML, an ids CSV or a file name becomes part of output file names
(``predictions/<id>_prob.nii.gz``, ``<id>.zarr``). :func:`safe_name` refuses an id that could leave its folder or
hide in it; :func:`inside` builds the path and checks that it stays in its folder; :func:`check_parents` refuses an
output path that runs through an existing file.
"""

from __future__ import annotations

import os
from pathlib import Path

from vesuvius_monai.errors import VesuviusError

MAX_NAME_BYTES = 200  # file names hold at most 255 bytes; an id leaves room for suffixes such as "_prob.nii.gz"


def safe_name(text: str, what: str) -> str:
    """``text`` itself when it can be (part of) a file name, else a VesuviusError naming ``what`` (e.g.
    ``"data.yaml: fragments[3].id"``).

    Refused: an empty name, a path separator (``/`` or ``\\``), ``..``, a control character, a leading ``.``
    (a hidden file), or more than :data:`MAX_NAME_BYTES` bytes in UTF-8.
    """
    problem = None
    if not text:
        problem = "is empty"
    elif "/" in text or "\\" in text:
        problem = "holds a path separator"
    elif ".." in text:
        problem = "holds '..'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "holds a control character"
    elif text.startswith("."):
        problem = "starts with '.'"
    elif len(text.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise VesuviusError(f"{what} {text!r} {problem}; a fragment id becomes part of file names: use letters, "
                            f"digits, '-', '_' and '.' (not first)")
    return text


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, checked to lie inside ``folder`` once both are resolved (symbolic links followed).

    Raises a VesuviusError naming both when ``name`` would lead out of the folder.
    """
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    if path.resolve() == root or root not in path.resolve().parents:
        raise VesuviusError(f"output {path} would lie outside its folder {folder}; nothing was written there")
    return path


def check_parents(path: str | os.PathLike, what: str) -> None:
    """Raise a VesuviusError naming ``what`` when a folder on the way to ``path`` exists as something else (a file),
    so that the output could not be created there."""
    path = Path(path)
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            raise VesuviusError(f"{what} {path}: {parent} is a file, not a folder; choose another path")
