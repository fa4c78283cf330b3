"""DVC's view of the project, through DVC's own API: is a stage up to date, and record a stage that
`ptq run` just ran in dvc.lock (and the DVC cache) exactly as `dvc repro` would have.

This is how the two runners agree: `ptq run` asks DVC which stages changed, runs those in process,
and commits each one when it finishes, so afterwards `dvc status` is clean and `dvc repro` has
nothing to do; after `dvc repro`, every stage is up to date and `ptq run` runs nothing. Never call
these from a stage itself: under `dvc repro`, DVC holds the repository lock while a stage runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["ProjectError", "check_project", "commit_stage", "stage_changes"]


class ProjectError(RuntimeError):
    """The folder is not a ptq-pipeline project DVC can run (missing or stale dvc.yaml, no .dvc/)."""


def _repo(root: Path):
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    return Repo(str(root))


def check_project(root: Path) -> None:
    """Fail clearly, before any work, unless `root` holds the DVC project files and a dvc.yaml that
    matches flows/stages.py; a missing .dvc/ (a copy without the committed DVC files) is created."""
    from .stages import render_dvc_yaml

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise ProjectError(f"{root} has no dvc.yaml: run ptq from the root of a ptq-pipeline checkout "
                           f"(or write it with `python -m flows.stages`)")
    if dvc_yaml.read_text(encoding="utf-8") != render_dvc_yaml():
        raise ProjectError(f"{dvc_yaml} does not match flows/stages.py: regenerate it with `python -m flows.stages`")
    if not (root / ".dvc").is_dir():
        from dvc.repo import Repo

        Repo.init(str(root), no_scm=not (root / ".git").exists())


def stage_changes(root: Path, name: str) -> dict[str, Any]:
    """What DVC says changed for stage `name` ({} = up to date), like `dvc status NAME`."""
    with _repo(root) as repo:
        return repo.status(targets=[name])


def commit_stage(root: Path, name: str) -> None:
    """Record the stage's current deps, params and outputs in dvc.lock and its outputs in the DVC
    cache (`dvc commit NAME`), as `dvc repro` does after running it."""
    with _repo(root) as repo:
        repo.commit(name, force=True, relink=False)
