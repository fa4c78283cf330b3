"""Plain-text tables for the command line, and the benchmark record files (JSON + its Markdown)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

__all__ = ["print_table", "append_records"]


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    print(line(cols))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line([_fmt(r.get(c)) for c in cols]))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.3g}"
    return "" if v is None else str(v)


def append_records(out: Path, new: list[dict], render: Callable[[list[dict]], str]) -> list[dict]:
    """Append `new` to the JSON list at `out` (created if missing) and rewrite out.md from all records,
    both atomically; returns all records."""
    from tasks.io import atomic_write_bytes, atomic_write_json

    records = (json.loads(out.read_text()) if out.exists() else []) + new
    atomic_write_json(out, records)
    atomic_write_bytes(out.with_suffix(".md"), render(records).encode())
    return records
