"""docs/reliability.md from the tests marked `reliability(fault=..., sees=..., kept=...)`.

Regenerate with `PTQ_RELIABILITY_OUT=docs/reliability.md .venv/bin/python -m pytest -m reliability -n 2`
(or the whole suite with that variable set): one row per marked test that ran, with its outcome,
sorted by test id, so the table says only what a test proved in that run. `{case}` in a marker's
text is the test's parameter id.
"""
from __future__ import annotations

HEADER = """# Reliability: faults and bad input the tests inflict, and what happens

Generated from the tests by `PTQ_RELIABILITY_OUT=docs/reliability.md .venv/bin/python -m pytest -m
reliability -n 2` (tests/reliability_doc.py); do not edit by hand. Each row is one test, marked
`@pytest.mark.reliability(fault=..., sees=..., kept=...)`, and its outcome in the run that wrote
this file. Crashes are real `kill -9`s of a `ptq run` process group, at a random point or at a
named failpoint (tasks/faults.py).

| fault or bad input | what the user sees | what is kept | test | outcome |
|---|---|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict]) -> str:
    """The markdown page, one row per test, in the order given."""
    lines = [f"| {_cell(r.get('fault', ''))} | {_cell(r.get('sees', ''))} | {_cell(r.get('kept', ''))} | "
             f"`{r['test']}` | {r['outcome']} |" for r in rows]
    passed = sum(r["outcome"] == "passed" for r in rows)
    return HEADER + "\n".join(lines) + f"\n\n{passed} of {len(rows)} passed.\n"
