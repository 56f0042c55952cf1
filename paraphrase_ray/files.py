"""Crash-safe file writes shared by every stage that saves something a user keeps.

One rule everywhere: write a sibling temp file, then rename it over the target. A crash (or Ctrl-C) mid-write
leaves the previous file intact, never half of a new one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a sibling temp path, then rename it to ``path`` (parents are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write(tmp)
    tmp.replace(out)
    return out


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def jsonable(obj: Any) -> Any:
    """NaN/inf become null, so the file is strict JSON that any reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(data), indent=2, ensure_ascii=False, default=str) + "\n")


def write_records(path: str | Path, records: list[dict]) -> Path:
    """JSONL, or Parquet when ``path`` ends in .parquet; never a half-written file (``atomic_write``)."""
    if str(path).lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        return atomic_write(path, lambda tmp: pq.write_table(pa.Table.from_pylist(records), str(tmp)))

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    return atomic_write(path, write)
