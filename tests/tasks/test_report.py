"""tasks.report: report.md plus PNG plots, atomic and byte-for-byte reproducible."""
from __future__ import annotations

import pytest
from PIL import Image

from tasks.report import BLOCK_PLOT, PPL_PLOT, REPORT_NAME, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def inputs(**overrides) -> dict:
    kw = dict(
        title="SmolLM2-135M gptq w4g64",
        metrics={"ppl": 27.8712, "wikitext_cloze/acc": 0.4375, "wall_s": 123.5},
        block_errors=[{"block": i, "before": 2e-3 * (i + 1) if i else None, "after": 1.25e-3 * (i + 1)} for i in range(6)],
        history=[{"label": "rtn w4g64", "ppl": 38.27}, {"label": "gptq w3g64", "ppl": float("inf")}],
        fp32_ppl=25.62,
    )
    return kw | overrides


def test_report_files_are_valid_and_referenced(tmp_path):
    paths = write_report(tmp_path, **inputs())
    assert paths == [tmp_path / REPORT_NAME, tmp_path / BLOCK_PLOT, tmp_path / PPL_PLOT]
    for png in paths[1:]:
        assert png.read_bytes().startswith(PNG_SIGNATURE)
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (640, 360)
    md = (tmp_path / REPORT_NAME).read_text(encoding="utf-8")
    assert md.startswith("# SmolLM2-135M gptq w4g64\n")
    assert f"]({BLOCK_PLOT})" in md and f"]({PPL_PLOT})" in md
    # metrics, the perplexity comparison (with ratio to fp32) and the per-block errors
    for number in ("27.8712", "0.4375", "123.5", "| fp32 | 25.62 | 1.00 |", "| rtn w4g64 | 38.27 | 1.49 |",
                   "| gptq w3g64 | inf | inf |", "| this release | 27.87 | 1.09 |",
                   "| 0 | - | 0.00125 | - |", "| 5 | 0.012 | 0.0075 | 0.625 |"):
        assert number in md, number
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temp files left behind


def test_report_is_byte_reproducible_without_software_tag(tmp_path):
    a = write_report(tmp_path / "a", **inputs())
    b = write_report(tmp_path / "b", **inputs())
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert b"Software" not in (tmp_path / "a" / PPL_PLOT).read_bytes()
    changed = write_report(tmp_path / "c", **inputs(fp32_ppl=25.0))
    assert changed[2].read_bytes() != a[2].read_bytes() and changed[1].read_bytes() == a[1].read_bytes()


def test_report_without_plot_data_writes_no_plot_and_removes_stale_one(tmp_path):
    write_report(tmp_path, **inputs())
    paths = write_report(tmp_path, **inputs(block_errors=[], history=[], fp32_ppl=None, metrics={"acc": 0.5}))
    assert paths == [tmp_path / REPORT_NAME]
    assert not (tmp_path / BLOCK_PLOT).exists() and not (tmp_path / PPL_PLOT).exists()
    md = (tmp_path / REPORT_NAME).read_text(encoding="utf-8")
    assert "| acc | 0.5 |" in md and ".png" not in md


def test_report_rejects_malformed_rows(tmp_path):
    with pytest.raises(ValueError, match=r"block_errors\[0\]"):
        write_report(tmp_path, **inputs(block_errors=[{"block": 0, "error": 1.0}]))
    with pytest.raises(ValueError, match=r"history\[1\]"):
        write_report(tmp_path, **inputs(history=[{"label": "a", "ppl": 1.0}, {"name": "b"}]))
    assert not any(tmp_path.iterdir())
