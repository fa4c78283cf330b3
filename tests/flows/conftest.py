"""Fixtures for the end-to-end pipeline tests (helpers: pipeline_projects.py).

A `ptq run` costs 15-30 s (an ephemeral Prefect server starts per process), so the tiny model and
the reference project are session-scoped and shared: `clean_project` is one uninterrupted run in a
fresh clone that the other tests compare against and read back (DVC, MLflow, lineage).
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
def base_env(tmp_path_factory) -> dict[str, str]:
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
def make_project(tmp_path_factory, tiny_source, base_env):
    """make_project(name, extra=None) -> a fresh clone (committed) whose params.yaml points at the tiny
    model; `extra` params sections are written in. Projects share a parent folder, so the committed
    default DVC remote (../ptq-dvc-remote) is one folder for all of them."""
    if not have_git():
        pytest.skip("git is not installed")
    parent = tmp_path_factory.mktemp("projects")

    def make(name: str, extra: dict | None = None) -> Project:
        root = clone_checkout(parent / name)
        write_params(root / "params.yaml", tiny_source, extra)
        git_commit_all(root, base_env)
        return Project(root, base_env)

    return make


@pytest.fixture(scope="session")
def clean_project(make_project) -> Project:
    """One uninterrupted `ptq run` in a fresh clone: the reference."""
    project = make_project("clean")
    project.run_ok()
    return project
