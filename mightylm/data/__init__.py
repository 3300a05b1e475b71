"""Data: pretraining token streams, supervised fine-tuning sets, and synthetic task generators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from mightylm.errors import MightyError


class DataError(MightyError, ValueError):
    """Bad training data; the message names the file, the line and what was expected."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, read lazily; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "JSON Lines files are UTF-8: convert the file (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def data_identity(files: list[str | Path]) -> dict:
    """What a run trains on: each file's name, size and sha256. A training run records it, and a resume with
    other data is refused (it would silently mix two data sets)."""
    import hashlib

    out = []
    for file in files:
        digest = hashlib.sha256()
        with Path(file).open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        out.append({"name": Path(file).name, "bytes": Path(file).stat().st_size, "sha256": digest.hexdigest()})
    return {"files": out}
