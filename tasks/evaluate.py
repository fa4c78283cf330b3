"""Perplexity of a model on prepared evaluation windows, one number per text source, and a
markdown table comparing runs. The arithmetic is quantlib.perplexity; this adds progress and layout.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlib.perplexity import perplexity

__all__ = ["evaluate_perplexity", "compare_ppl_table"]


def evaluate_perplexity(
    model: nn.Module, windows_by_source: dict[str, torch.Tensor], batch_size: int = 4
) -> dict[str, float]:
    """{source: (W, T) token-id windows} -> {source: perplexity}, in the dict's order.

    Each window is scored on its own (quantlib.perplexity: no BOS, no carry-over); the model stays
    where it is and the windows follow it.
    """
    if not windows_by_source:
        raise ValueError("evaluate_perplexity: no evaluation windows given")
    result = {}
    for source, windows in windows_by_source.items():
        with tqdm(total=int(windows.shape[0]), desc=f"ppl {source}", unit="window", leave=False) as bar:
            result[source] = perplexity(model, windows, batch_size=batch_size, progress=bar.update)
    return result


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def _numeric(rows: list[dict[str, Any]], column: str) -> bool:
    values = [row[column] for row in rows if row.get(column) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def compare_ppl_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of runs, one row each (e.g. {"run": "rtn w4pc", "wikitext2": 45.45}).

    Columns are the keys in order of first appearance; a key a row lacks shows "-"; floats are
    printed with 2 decimals (how perplexities are quoted in docs/protocol.md); numeric columns are
    right-aligned.
    """
    if not rows:
        raise ValueError("compare_ppl_table: no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join("---:" if _numeric(rows, c) else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
