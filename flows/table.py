"""Plain-text tables for the command line."""
from __future__ import annotations

__all__ = ["print_table"]


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
