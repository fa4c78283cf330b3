"""Prefect deployments (prefect.yaml): `ptq run` and `ptq sweep` as flows a worker of a process
work pool runs in a project folder. The pipeline's stage flows become subflows of the deployment's
run, so the Prefect UI shows one run per pipeline execution with its stages and tasks beneath.

Everything else is the CLI's: the project lock, the params checks before any work, the -S overrides
written into params.yaml. Where the tasks run is params (orchestration.*), so the same deployment
runs on a laptop or a cluster.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

__all__ = ["ptq_pipeline", "ptq_sweep"]


def _cli(*args: str) -> None:
    from .cli import main

    rc = main(list(args))
    if rc != 0:
        raise RuntimeError(f"ptq {' '.join(args)} exited {rc}; its error is in the log above")


def _sets(flag: str, values: list[str]) -> list[str]:
    return [a for v in values for a in (flag, v)]


@flow(name="ptq-pipeline", validate_parameters=True)
def ptq_pipeline(project: str = ".", overrides: list[str] | None = None, to: str | None = None) -> None:
    """`ptq run` in `project` with `-S` overrides (section.key=value) and an optional last stage."""
    params = str(Path(project) / "params.yaml")
    _cli("run", "-p", params, *_sets("-S", overrides or []), *(["--to", to] if to else []))


@flow(name="ptq-sweep", validate_parameters=True)
def ptq_sweep(project: str = ".", axes: list[str] | None = None, name: str = "sweep") -> None:
    """`ptq sweep` in `project`: axes like quantize.method=rtn,gptq or scheme=w4pc,w3g64."""
    params = str(Path(project) / "params.yaml")
    _cli("sweep", "-p", params, *_sets("-S", axes or []), "--name", name)
