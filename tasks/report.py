"""The evaluation report of a release: report.md plus PNG plots, written atomically.

Plots are drawn on a bare matplotlib Figure with the Agg canvas (no pyplot, no display, no global
figure state) under matplotlib's default style (a user's matplotlibrc cannot change them), and
saved without the "Software" PNG text chunk, so the same inputs give the same bytes with the same
matplotlib: DVC sees no change when nothing changed.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from matplotlib import style as mpl_style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .evaluate import compare_ppl_table
from .io import atomic_write_bytes

__all__ = ["REPORT_NAME", "BLOCK_PLOT", "PPL_PLOT", "write_report"]

REPORT_NAME = "report.md"
BLOCK_PLOT = "block_errors.png"
PPL_PLOT = "perplexity.png"
RELEASE_LABEL = "this release"
_DPI = 100
_FIGSIZE = (6.4, 3.6)  # inches: 640 x 360 px at _DPI


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _new_figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


# ------------------------------------------------------------------------------------- checks


def _check_inputs(block_errors: list[dict], history: list[dict]) -> None:
    for i, row in enumerate(block_errors):
        if not isinstance(row, dict) or "block" not in row or "after" not in row:
            raise ValueError(f"block_errors[{i}] = {row!r}: expected {{'block': int, 'before': float|None, 'after': float}}")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or "label" not in row or "ppl" not in row:
            raise ValueError(f"history[{i}] = {row!r}: expected {{'label': str, 'ppl': float}}")


# -------------------------------------------------------------------------------------- plots


def _plot_block_errors(block_errors: list[dict]) -> bytes | None:
    """Output error per decoder block, log scale: after (and before, where recorded)."""
    series = {
        "before": [(r["block"], r.get("before")) for r in block_errors],
        "after": [(r["block"], r["after"]) for r in block_errors],
    }
    series = {k: [(b, v) for b, v in pts if _finite_positive(v)] for k, pts in series.items()}
    if not any(series.values()):
        return None
    with mpl_style.context("default"):
        fig, ax = _new_figure()
        for (name, pts), style in zip(series.items(), ("o--", "o-")):
            if pts:
                ax.plot([b for b, _ in pts], [v for _, v in pts], style, label=name, markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("decoder block")
        ax.set_ylabel("output error")
        ax.set_title("Per-block output error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        return _png(fig)


def _plot_perplexity(bars: list[tuple[str, float, str]]) -> bytes | None:
    """Bar chart of perplexities: fp32 (grey), other recorded runs (blue), this release (red)."""
    bars = [b for b in bars if _finite_positive(b[1])]
    if not bars:
        return None
    values = [v for _, v, _ in bars]
    with mpl_style.context("default"):
        fig, ax = _new_figure()
        x = range(len(bars))
        rects = ax.bar(x, values, color=[c for _, _, c in bars])
        ax.bar_label(rects, labels=[f"{v:.2f}" for v in values], fontsize=8)
        ax.set_xticks(list(x), [label for label, _, _ in bars], rotation=20, ha="right", fontsize=8)
        if max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity: this release vs fp32 and other runs")
        return _png(fig)


def _ppl_bars(fp32_ppl: float | None, history: list[dict], release_ppl: float | None) -> list[tuple[str, float, str]]:
    bars = [("fp32", fp32_ppl, "tab:gray")] if fp32_ppl is not None else []
    bars += [(str(h["label"]), h["ppl"], "tab:blue") for h in history]
    if release_ppl is not None:
        bars.append((RELEASE_LABEL, release_ppl, "tab:red"))
    return bars


# ----------------------------------------------------------------------------------- markdown


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return lines + [""]


def _ppl_section(bars: list[tuple[str, float, str]], fp32_ppl: float | None, plotted: bool) -> list[str]:
    rows = [{"run": label, "ppl": ppl} for label, ppl, _ in bars]
    if _finite_positive(fp32_ppl):
        for row in rows:
            row["x fp32"] = row["ppl"] / fp32_ppl if row["ppl"] is not None else None
    lines = ["## Perplexity", "", compare_ppl_table(rows)]
    return lines + ([f"![perplexity]({PPL_PLOT})", ""] if plotted else [])


def _block_section(block_errors: list[dict], plotted: bool) -> list[str]:
    lines = ["## Per-block output error", "", "| block | before | after | after / before |", "|---:|---:|---:|---:|"]
    for r in block_errors:
        before, after = r.get("before"), r["after"]
        ratio = after / before if _finite_positive(before) and after is not None else None
        lines.append(f"| {r['block']} | {_fmt(before)} | {_fmt(after)} | {_fmt(ratio)} |")
    return lines + [""] + ([f"![per-block output error]({BLOCK_PLOT})", ""] if plotted else [])


# -------------------------------------------------------------------------------------- write


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    metrics: dict[str, Any],
    block_errors: list[dict],
    history: list[dict],
    fp32_ppl: float | None,
    ppl_key: str = "ppl",
) -> list[Path]:
    """Write out_dir/report.md and its PNG plots; return the paths written (report.md first).

    metrics: this release's numbers, in the order to show them; metrics[ppl_key] is its perplexity
    in the comparison. block_errors: [{"block": i, "before": float|None, "after": float}].
    history: other recorded runs of the same model, [{"label": str, "ppl": float}]. A plot with
    nothing to show (no finite positive values) is not written, and a stale copy is removed.
    """
    _check_inputs(block_errors, history)
    out_dir = Path(out_dir)
    bars = _ppl_bars(fp32_ppl, history, metrics.get(ppl_key))
    plots = {BLOCK_PLOT: _plot_block_errors(block_errors), PPL_PLOT: _plot_perplexity(bars)}
    written = []
    for name, png in plots.items():
        if png is None:
            (out_dir / name).unlink(missing_ok=True)
        else:
            atomic_write_bytes(out_dir / name, png)
            written.append(out_dir / name)
    lines = [f"# {title}", ""] + _metrics_section(metrics)
    if bars:
        lines += _ppl_section(bars, fp32_ppl, plots[PPL_PLOT] is not None)
    if block_errors:
        lines += _block_section(block_errors, plots[BLOCK_PLOT] is not None)
    atomic_write_bytes(out_dir / REPORT_NAME, "\n".join(lines).encode("utf-8"))
    return [out_dir / REPORT_NAME, *written]
