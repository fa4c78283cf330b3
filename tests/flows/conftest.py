"""Fixtures for the end-to-end pipeline tests (helpers: pipeline_projects.py).

Without a Prefect API, every `ptq` process starts its own temporary Prefect server (5-10 s here,
docs/benchmarks/prefect_startup.md), so the runs of these tests talk to one `prefect server start`
per test process instead (PREFECT_API_URL, as a team with a Prefect server runs it); the default
path, a temporary server per process, is exercised by the projects made with `server=False`. The
tiny model and the reference project are session-scoped and shared: `clean_project` is one
uninterrupted run in a fresh clone that the other tests compare against and read back (DVC, MLflow,
lineage).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import the `pipeline_projects` helpers

from pipeline_projects import (  # noqa: E402
    MIRROR,
    WIKITEXT,
    Project,
    build_tiny_source,
    clone_checkout,
    git_commit_all,
    have_git,
    write_params,
)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """A local HF folder with a tiny random Llama and a trained tokenizer. Read-only."""
    if not WIKITEXT.is_file():
        pytest.skip(f"no WikiText-2 mirror at {WIKITEXT} (set PTQ_DATA_MIRROR)")
    return build_tiny_source(tmp_path_factory.mktemp("source") / "tiny-llama")


@pytest.fixture(scope="session")
def plain_env(tmp_path_factory) -> dict[str, str]:
    """Subprocess env: offline HF with a private HF_HOME, the data mirror, quiet telemetry. No
    PREFECT_HOME, so each project's runs use <root>/.cache/prefect-home (which ptq creates), and
    no MLflow URI, so register uses sqlite:///<root>/mlflow.db."""
    drop = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({
        "PTQ_DATA_MIRROR": str(MIRROR),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path_factory.mktemp("dvc-site")),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # python, dvc of this venv
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    })
    return env


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory, plain_env):
    """One `prefect server start` for this test process (its own PREFECT_HOME); yields its API URL."""
    from flows.bench_pipeline import _start_server, _stop_server

    env = dict(plain_env, PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-server-home")),
               PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    proc, url, _ = _start_server(env)
    yield url
    _stop_server(proc)


@pytest.fixture(scope="session")
def base_env(plain_env, prefect_api) -> dict[str, str]:
    """plain_env with PREFECT_API_URL: the runs of the tests talk to the shared test server."""
    return dict(plain_env, PREFECT_API_URL=prefect_api)


@pytest.fixture(scope="session")
def make_project(tmp_path_factory, tiny_source, base_env, plain_env):
    """make_project(name, extra=None, server=True) -> a fresh clone (committed) whose params.yaml
    points at the tiny model; `extra` params sections are written in. Its runs use the shared test
    server, or with server=False a temporary one per process (what `ptq run` does by default).
    Projects share a parent folder, so the committed default DVC remote (../ptq-dvc-remote) is one
    folder for all of them."""
    if not have_git():
        pytest.skip("git is not installed")
    parent = tmp_path_factory.mktemp("projects")

    def make(name: str, extra: dict | None = None, server: bool = True) -> Project:
        root = clone_checkout(parent / name)
        write_params(root / "params.yaml", tiny_source, extra)
        git_commit_all(root, base_env)
        return Project(root, base_env if server else plain_env)

    return make


@pytest.fixture(scope="session")
def clean_project(make_project) -> Project:
    """One uninterrupted `ptq run` in a fresh clone: the reference."""
    project = make_project("clean")
    project.run_ok()
    return project
