"""The DVC stage graph, described once; dvc.yaml is generated from it.

Regenerate dvc.yaml after editing STAGES (a test checks they agree):

    python -m flows.stages            # writes dvc.yaml (and params.yaml if there is none)
    python -m flows.stages --check    # exit 1 if dvc.yaml is stale

Every stage depends on the code it runs (CODE_DEPS) and on the `section.key` params of its own
params.yaml section. The graph is fixed: the qat stage always runs and, when `qat.enabled` is
false, copies data/quantized to data/qat. Flows take their folder and file paths from here.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.params import dump_default_params, section_keys

__all__ = [
    "BLOCK_ERRORS",
    "CODE_DEPS",
    "METRICS",
    "MODEL",
    "PPL",
    "QAT",
    "QUANTIZED",
    "REGISTRY",
    "RELEASE",
    "REPORT",
    "STAGES",
    "TOKENS",
    "Output",
    "Plot",
    "Stage",
    "get_stage",
    "render_dvc_yaml",
]

# Artifacts, relative to the repo root (where dvc.yaml and params.yaml live).
MODEL = "data/model"
TOKENS = "data/tokens"
QUANTIZED = "data/quantized"
# Not data/quantized/block_errors.json: DVC rejects an output inside another output.
BLOCK_ERRORS = "data/reports/block_errors.json"
QAT = "data/qat"
RELEASE = "data/release"
REPORT = "data/reports/report"
METRICS = "data/reports/metrics.json"
PPL = "data/reports/ppl.json"
REGISTRY = "data/reports/registry.json"

# The code every stage runs, so that a code change re-runs the stages (hashed by DVC; keep
# __pycache__ out of the hash with a .dvcignore).
CODE_DEPS = ("quantlib", "tasks", "flows")


@dataclass(frozen=True)
class Output:
    """A stage output; cache=False keeps it in git instead of the DVC cache."""

    path: str
    cache: bool = True


@dataclass(frozen=True)
class Plot:
    """A plot file (never cached); x and y name its columns (y None: DVC picks the last one)."""

    path: str
    x: str | None = None
    y: str | None = None


@dataclass(frozen=True)
class Stage:
    """One DVC stage, run as `ptq stage <name> -p params.yaml`; metrics files are not cached."""

    name: str
    deps: tuple[str, ...]
    params: tuple[str, ...]  # params.yaml sections; every key of each is tracked
    outs: tuple[Output, ...]
    metrics: tuple[str, ...] = ()
    plots: tuple[Plot, ...] = ()

    def __post_init__(self) -> None:
        for section in self.params:
            section_keys(section)  # raises ParamsError on an unknown section

    @property
    def cmd(self) -> str:
        return f"ptq stage {self.name} -p params.yaml"


STAGES: tuple[Stage, ...] = (
    Stage("fetch_model", deps=CODE_DEPS, params=("fetch_model",), outs=(Output(MODEL),)),
    Stage("prepare_data", deps=(MODEL, *CODE_DEPS), params=("prepare_data",), outs=(Output(TOKENS),)),
    Stage(
        "quantize",
        deps=(MODEL, TOKENS, *CODE_DEPS),
        params=("quantize", "recon"),
        outs=(Output(QUANTIZED),),
        plots=(Plot(BLOCK_ERRORS, x="block"),),
    ),
    Stage("qat", deps=(MODEL, TOKENS, QUANTIZED, *CODE_DEPS), params=("qat",), outs=(Output(QAT),)),
    Stage("pack", deps=(MODEL, QAT, *CODE_DEPS), params=("pack",), outs=(Output(RELEASE),)),
    Stage(
        "evaluate",
        deps=(MODEL, TOKENS, RELEASE, *CODE_DEPS),
        params=("evaluate",),
        outs=(Output(REPORT),),
        metrics=(METRICS,),
        plots=(Plot(PPL),),
    ),
    Stage(
        "register",
        deps=(RELEASE, METRICS, *CODE_DEPS),
        params=("register",),
        outs=(Output(REGISTRY, cache=False),),
    ),
)


def get_stage(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r} (stages: {', '.join(s.name for s in STAGES)})")


def _stage_entry(stage: Stage) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "cmd": stage.cmd,
        "deps": list(stage.deps),
        "params": [key for section in stage.params for key in section_keys(section)],
        "outs": [o.path if o.cache else {o.path: {"cache": False}} for o in stage.outs],
    }
    if stage.metrics:
        entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
    if stage.plots:
        entry["plots"] = [
            {p.path: {"cache": False, **{k: v for k, v in (("x", p.x), ("y", p.y)) if v is not None}}}
            for p in stage.plots
        ]
    return entry


def render_dvc_yaml() -> str:
    """dvc.yaml text for STAGES, in order."""
    header = "# Generated from flows/stages.py by `python -m flows.stages`; do not edit by hand.\n"
    body = {"stages": {stage.name: _stage_entry(stage) for stage in STAGES},
            # per-block output error at the initialization (reconstruction) and after, on one chart
            "plots": [{"block_error_before_after": {"template": "linear", "x": "block",
                                                     "y": {BLOCK_ERRORS: ["before", "after"]}}}]}
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def main(argv: Sequence[str] = ()) -> int:
    root = Path(__file__).resolve().parents[1]
    dvc_yaml, text = root / "dvc.yaml", render_dvc_yaml()
    if "--check" in argv:
        fresh = dvc_yaml.exists() and dvc_yaml.read_text(encoding="utf-8") == text
        print("dvc.yaml is up to date" if fresh else "dvc.yaml is stale: run `python -m flows.stages`")
        return 0 if fresh else 1
    dvc_yaml.write_text(text, encoding="utf-8")
    params_yaml = root / "params.yaml"
    if not params_yaml.exists():
        params_yaml.write_text(dump_default_params(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
