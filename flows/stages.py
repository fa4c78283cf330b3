"""The pipeline's DAG, described once: dvc.yaml is generated from it and every stage reads through it.

Regenerate dvc.yaml after editing STAGES (a test checks they agree):

    python -m flows.stages            # writes dvc.yaml (and params.yaml if there is none)
    python -m flows.stages --check    # exit 1 if dvc.yaml is stale

A stage declares what it reads: `deps` (project paths written by earlier stages) and `params`
(`section` for every key of a section, or `section.key`). At run time a stage receives a params view
and a path resolver built from its declaration (flows.context), so reading anything else is an
error, not a silent dependency: DVC's idea of what changed is exactly what the code uses.

Outputs: `outs` go to the DVC cache (data/, git-ignored); `metrics` and `plots` are small JSON files
kept in git (metrics/), so `dvc metrics diff` and `dvc plots diff` work across commits. Every stage
also writes `metrics/stages/<name>.json` (its wall time and how much it computed vs reused), which
nothing downstream reads. The `inputs` stage hashes the model source and the text files (outside
the project, where DVC cannot hash them itself) into data/inputs.json, which the stages that read
them depend on. DVC re-runs it when the source params change; `ptq run` re-runs it every time
(`refresh`, about a second), so a source file changed in place is noticed; under `dvc repro` force
that check with `dvc repro -f inputs`. When the content is unchanged, nothing downstream re-runs.
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
    "INPUTS",
    "METRICS",
    "MODEL",
    "PPL",
    "QAT",
    "QUANTIZED",
    "REGISTRY",
    "RELEASE",
    "RELEASE_PARAMS",
    "REPORT",
    "STAGES",
    "TOKENS",
    "Plot",
    "Stage",
    "get_stage",
    "missing_inputs",
    "render_dvc_yaml",
]

# Artifacts, relative to the project root (where dvc.yaml and params.yaml live).
INPUTS = "data/inputs.json"  # content hashes of the model source and the text files
MODEL = "data/model"
TOKENS = "data/tokens"
QUANTIZED = "data/quantized"
QAT = "data/qat"
RELEASE = "data/release"
REPORT = "data/report"
# git-tracked metrics and plots
BLOCK_ERRORS = "metrics/block_errors.json"
METRICS = "metrics/metrics.json"
PPL = "metrics/ppl.json"
REGISTRY = "metrics/registry.json"
TIMINGS_DIR = "metrics/stages"


def primary_source(metrics: dict) -> str:
    """The evaluation text metrics.json's headline numbers and the quality gate use: the first of
    prepare_data.eval_sources (recorded as "primary"; the JSON keeps its keys sorted, not in order)."""
    return metrics.get("primary") or next(iter(metrics["ppl"]))


# The code every stage runs, so that a code change re-runs the stages (hashed by DVC; keep
# __pycache__ out of the hash with a .dvcignore).
CODE_DEPS = ("quantlib", "tasks", "flows")
# The params that make a release: recorded in full in its MANIFEST, so the pack stage declares them.
RELEASE_PARAMS = ("fetch_model", "prepare_data", "quantize", "recon", "qat", "pack")


@dataclass(frozen=True)
class Plot:
    """A git-tracked plot file; x and y name its columns (y None: DVC picks the last one)."""

    path: str
    x: str | None = None
    y: str | None = None


@dataclass(frozen=True)
class Stage:
    """One DVC stage, run as `python -m flows.cli stage <name>` (the project's own code, which DVC hashes
    as CODE_DEPS) by DVC, or in process by `ptq run`."""

    name: str
    deps: tuple[str, ...]  # project paths read (besides CODE_DEPS)
    params: tuple[str, ...]  # "section" (every key) or "section.key"
    outs: tuple[str, ...]  # DVC-cached outputs
    metrics: tuple[str, ...] = ()  # git-tracked
    plots: tuple[Plot, ...] = ()  # git-tracked
    refresh: bool = False  # `ptq run` re-runs it whatever DVC says (it checks files DVC cannot see)

    def __post_init__(self) -> None:
        self.param_keys  # raises ParamsError on an unknown section or key

    @property
    def param_keys(self) -> tuple[str, ...]:
        """Every declared `section.key`, sections expanded, in declaration order."""
        keys: list[str] = []
        for p in self.params:
            section, _, key = p.partition(".")
            known = section_keys(section)
            if key and p not in known:
                raise KeyError(f"stage {self.name}: unknown param {p!r} (section {section}: {', '.join(known)})")
            keys += [p] if key else known
        return tuple(dict.fromkeys(keys))

    @property
    def timings(self) -> str:
        """The stage's own metrics file: wall time and computed/reused counts; nothing reads it."""
        return f"{TIMINGS_DIR}/{self.name}.json"

    @property
    def writes(self) -> tuple[str, ...]:
        return (*self.outs, *self.metrics, *(p.path for p in self.plots), self.timings)

    @property
    def reads(self) -> tuple[str, ...]:
        return self.deps

    @property
    def cmd(self) -> str:
        return f"python -m flows.cli stage {self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("inputs", deps=(), refresh=True, outs=(INPUTS,),
          params=("fetch_model.source", "prepare_data.calib_source", "prepare_data.eval_sources",
                  "prepare_data.mirror")),
    Stage("fetch_model", deps=(INPUTS,), params=("fetch_model",), outs=(MODEL,)),
    # fetch_model.trust_remote_code: every stage that loads the model (or its tokenizer) honours it
    Stage("prepare_data", deps=(INPUTS, MODEL), params=("prepare_data", "fetch_model.trust_remote_code"), outs=(TOKENS,)),
    # fetch_model.dtype: the dtype the model computes in (quantize, qat and evaluate honour it)
    Stage("quantize", deps=(MODEL, TOKENS), params=("quantize", "recon", "fetch_model.dtype",
                                                    "fetch_model.trust_remote_code"), outs=(QUANTIZED,),
          plots=(Plot(BLOCK_ERRORS, x="block"),)),
    # qat.enabled: auto decides by the number of bits (the fewest a mixed-precision plan may give)
    # quantize.activations: QAT trains with the release's activation quantizers in its forward
    Stage("qat", deps=(MODEL, TOKENS, QUANTIZED), params=("qat", "quantize.bits", "quantize.mixed_from",
                                                          "quantize.activations",
                                                          "fetch_model.dtype", "fetch_model.trust_remote_code"),
          outs=(QAT,)),
    Stage("pack", deps=(MODEL, TOKENS, QAT), params=RELEASE_PARAMS, outs=(RELEASE,)),
    Stage("evaluate", deps=(INPUTS, MODEL, TOKENS, RELEASE, BLOCK_ERRORS),
          params=("evaluate", "prepare_data.eval_sources", "prepare_data.mirror", "fetch_model.dtype",
                  "fetch_model.trust_remote_code"),
          outs=(REPORT,), metrics=(METRICS,), plots=(Plot(PPL, x="model", y="ppl"),)),
    Stage("register", deps=(RELEASE, METRICS), params=("register",), outs=(), metrics=(REGISTRY,)),
)


def get_stage(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r} (stages: {', '.join(s.name for s in STAGES)})")


def missing_inputs(root: Path, name: str) -> list[tuple[str, str]]:
    """[(dep, the stage that makes it)] for stage `name`'s deps that another stage makes and that
    do not exist under `root` yet: the stages to run first."""
    makers = {path: s.name for s in STAGES for path in s.writes}
    return [(d, makers[d]) for d in get_stage(name).deps if d in makers and not (root / d).exists()]


def _plot_entry(p: Plot) -> dict[str, Any]:
    return {p.path: {"cache": False, **{k: v for k, v in (("x", p.x), ("y", p.y)) if v is not None}}}


def _stage_entry(stage: Stage) -> dict[str, Any]:
    entry: dict[str, Any] = {"cmd": stage.cmd, "deps": [*stage.deps, *CODE_DEPS], "params": list(stage.param_keys)}
    if stage.outs:
        entry["outs"] = list(stage.outs)
    entry["metrics"] = [{path: {"cache": False}} for path in (*stage.metrics, stage.timings)]
    if stage.plots:
        entry["plots"] = [_plot_entry(p) for p in stage.plots]
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
