"""Small helpers shared by the tests (tests/conftest.py puts this folder on the import path)."""

from __future__ import annotations

from pathlib import Path


def error_line(capsys) -> str:
    """The one ``error: ...`` line a refused command printed on stderr (asserts there is exactly one)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes: compare two to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
