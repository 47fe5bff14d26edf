"""Reading JSON and JSON Lines record files, with typed, line-numbered errors.

One reader for every record file editkit accepts: evaluation datasets (CounterFact, zsRE),
training records of the learned editors, request files of ``editkit edit`` and ``.jsonl``
text sources of the statistics. A ``.jsonl`` file holds one JSON value per line (blank lines
are skipped); any other file holds one JSON document, either a list of records or a single
record. A malformed file raises :class:`~editkit.errors.DatasetFormatError` naming the file,
the line and what to fix; a missing file raises
:class:`~editkit.errors.DatasetUnavailableError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from editkit.errors import DatasetFormatError, DatasetUnavailableError

__all__ = ["iter_jsonl", "read_json", "read_json_records"]


def _require_file(path: Path, hint: str) -> None:
    if not path.is_file():
        raise DatasetUnavailableError(
            f"no file at {str(path)!r}" + (f"; {hint}" if hint else "")
        )


def iter_jsonl(path: str | Path, *, hint: str = "") -> Iterator[Any]:
    """The JSON values of a JSON Lines file, one per non-blank line, read lazily.

    Raises :class:`DatasetFormatError` ``"<path>:<line>: invalid JSON (...)"`` at the first
    line that does not parse; ``hint`` is appended to the error messages (what the file
    should contain).
    """
    path = Path(path)
    _require_file(path, hint)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(
                    f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno}); "
                    "a .jsonl file holds one JSON value per line"
                    + (f"; {hint}" if hint else "")
                ) from exc
            except RecursionError as exc:
                raise DatasetFormatError(_too_deep(path, line_no, hint)) from exc


def read_json(path: str | Path, *, hint: str = "") -> Any:
    """The JSON document in ``path``; errors name the file and line (``"<path>:<line>: ..."``)."""
    path = Path(path)
    _require_file(path, hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
            + (f"; {hint}" if hint else "")
        ) from exc
    except RecursionError as exc:
        raise DatasetFormatError(_too_deep(path, 1, hint)) from exc


def _too_deep(path: Path, line_no: int, hint: str) -> str:
    return (f"{path}:{line_no}: the JSON is nested too deeply to read (Python's recursion "
            "limit); it is not a record file" + (f"; {hint}" if hint else ""))


def read_json_records(path: str | Path, *, hint: str = "") -> list[Any]:
    """Records of a ``.jsonl`` file (one per line) or a ``.json`` file (a list, or one object).

    Errors name the file and line: ``"<path>:<line>: invalid JSON (...)"``.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path, hint=hint))
    data = read_json(path, hint="for one record per line name the file .jsonl"
                     + (f"; {hint}" if hint else ""))
    if isinstance(data, Mapping):  # a single record
        return [data]
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{path}:1: expected a JSON list of records (or one record object), got "
            f"{type(data).__name__}" + (f"; {hint}" if hint else "")
        )
    return data
