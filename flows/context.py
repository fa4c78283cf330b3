"""What a stage may read and write, enforced: a params view and a path resolver built from its
declaration in flows/stages.py.

A stage's code gets a `StageContext`. `ctx.params.quantize.bits` works only if the stage declares
`quantize.bits` (or the whole `quantize` section); a method or property of a section (such as
`quantize.resolved_method`) needs the whole section, since it may read any key. `ctx.path(rel)`
resolves only the paths the stage declares as deps or writes. Anything else raises
`UndeclaredInputError`, so an undeclared dependency fails in tests instead of hiding from DVC.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .orchestration import SEQUENTIAL, Engine
from .params import PipelineParams, params_to_dict
from .stages import Stage

__all__ = ["ParamsView", "StageContext", "UndeclaredInputError"]


class UndeclaredInputError(KeyError):
    """A stage read a param or path that its entry in flows/stages.py does not declare."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class _SectionView:
    def __init__(self, stage: str, section: str, body: Any, allowed: frozenset[str], whole: bool) -> None:
        self._stage, self._section, self._body, self._allowed, self._whole = stage, section, body, allowed, whole

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._section}.{name}"
        is_field = name in {f.name for f in fields(self._body)}
        if (is_field and key not in self._allowed) or (not is_field and not self._whole):
            what = key if is_field else f"{key} (reads the whole section)"
            raise UndeclaredInputError(
                f"stage {self._stage} reads {what}, which flows/stages.py does not declare for it; "
                f"add it to the stage's params and regenerate dvc.yaml (python -m flows.stages)")
        return getattr(self._body, name)


class ParamsView:
    """Read-only view of PipelineParams restricted to a stage's declared `section.key`s."""

    def __init__(self, params: PipelineParams, stage: Stage) -> None:
        self._params, self._stage = params, stage
        self._keys = frozenset(stage.param_keys)

    def __getattr__(self, section: str) -> _SectionView:
        if section.startswith("_"):
            raise AttributeError(section)
        body = getattr(self._params, section)  # AttributeError for an unknown section
        whole = all(f"{section}.{f.name}" in self._keys for f in fields(body))
        return _SectionView(self._stage.name, section, body, self._keys, whole)

    def declared(self) -> dict[str, dict[str, Any]]:
        """The declared params as plain nested data {section: {key: value}} (JSON types)."""
        full = params_to_dict(self._params)
        out: dict[str, dict[str, Any]] = {}
        for key in self._stage.param_keys:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = full[section][name]
        return out


@dataclass(frozen=True)
class StageContext:
    """Everything a stage's code may touch: its declared params and paths, the project's content
    cache (outside every DVC out) and a metrics logger (MLflow, live; a no-op without tracking)."""

    stage: Stage
    root: Path
    params: ParamsView
    cache: Path
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step=0: None
    tracking: Any = None  # flows.runner.Tracking: the MLflow client and parent run, for the register stage
    engine: Callable[[], Engine] = lambda: SEQUENTIAL  # where its tasks run (started on first call)

    def path(self, rel: str) -> Path:
        """The absolute path of a declared dep or output (or anything inside a declared folder)."""
        if rel not in self.stage.reads and rel not in self.stage.writes:
            raise UndeclaredInputError(
                f"stage {self.stage.name} uses {rel}, which flows/stages.py does not declare as its dep or "
                f"output; declare it and regenerate dvc.yaml (python -m flows.stages)")
        return self.root / rel
