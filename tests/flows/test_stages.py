"""flows.stages: the stage graph is consistent, dvc.yaml is generated from it, and DVC accepts it."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from flows.params import SECTIONS, ParamsError, section_keys
from flows.stages import CODE_DEPS, STAGES, Output, Stage, get_stage, render_dvc_yaml

REPO = Path(__file__).resolve().parents[2]
DVC = REPO / ".venv" / "bin" / "dvc"


def _outputs(stage: Stage) -> list[str]:
    return [o.path for o in stage.outs] + list(stage.metrics) + [p.path for p in stage.plots]


def test_committed_dvc_yaml_is_in_sync() -> None:
    assert (REPO / "dvc.yaml").read_text(encoding="utf-8") == render_dvc_yaml(), (
        "dvc.yaml is stale: run `python -m flows.stages`"
    )


def test_one_stage_per_section_in_pipeline_order() -> None:
    # every section belongs to exactly one stage, in pipeline order; recon configures the quantize stage
    assert [sec for s in STAGES for sec in s.params] == list(SECTIONS)
    assert [s.params[0] for s in STAGES] == [s.name for s in STAGES]
    assert get_stage("quantize").params == ("quantize", "recon")


def test_data_deps_come_from_earlier_stages_and_code_is_a_dep() -> None:
    produced: set[str] = set()
    for stage in STAGES:
        assert set(CODE_DEPS) <= set(stage.deps), stage.name
        for dep in stage.deps:
            assert dep in CODE_DEPS or dep in produced, f"{stage.name}: {dep} is not produced earlier"
        produced.update(_outputs(stage))


def test_stage_folders() -> None:
    assert [o.path for o in get_stage("fetch_model").outs] == ["data/model"]
    assert get_stage("qat").deps[:3] == ("data/model", "data/tokens", "data/quantized")
    assert [o.path for o in get_stage("qat").outs] == ["data/qat"]
    assert get_stage("register").outs == (Output("data/reports/registry.json", cache=False),)
    assert all(s.cmd == f"ptq stage {s.name} -p params.yaml" for s in STAGES)
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        get_stage("nope")


def test_no_output_is_inside_another() -> None:
    # DVC rejects overlapping outputs, even within one stage (OverlappingOutputPathsError).
    paths = [PurePosixPath(p) for s in STAGES for p in _outputs(s)]
    assert len(set(paths)) == len(paths)
    for a in paths:
        for b in paths:
            assert a == b or a not in b.parents, f"{a} contains {b}"


def test_rendered_yaml_structure() -> None:
    doc = yaml.safe_load(render_dvc_yaml())
    assert list(doc) == ["stages", "plots"] and list(doc["stages"]) == [s.name for s in STAGES]
    for stage in STAGES:
        entry = doc["stages"][stage.name]
        assert entry["cmd"] == stage.cmd
        assert entry["deps"] == list(stage.deps)
        assert entry["params"] == [k for sec in stage.params for k in section_keys(sec)]  # only its own sections
        for item in entry.get("metrics", []) + entry.get("plots", []):
            ((_, options),) = item.items()
            assert options["cache"] is False
    assert doc["stages"]["quantize"]["plots"] == [{"data/reports/block_errors.json": {"cache": False, "x": "block"}}]
    assert doc["stages"]["evaluate"]["metrics"] == [{"data/reports/metrics.json": {"cache": False}}]
    assert doc["stages"]["register"]["outs"] == [{"data/reports/registry.json": {"cache": False}}]
    # one chart with each block's error at initialization and after reconstruction
    (plot,) = doc["plots"]
    assert plot["block_error_before_after"]["y"] == {"data/reports/block_errors.json": ["before", "after"]}


def test_stage_is_frozen_and_checks_its_sections() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGES[0].name = "x"  # type: ignore[misc]
    with pytest.raises(ParamsError, match="^nope: unknown section"):
        Stage("x", deps=(), params=("nope",), outs=())


@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in .venv")
def test_dvc_builds_the_graph(tmp_path: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / ".site-cache")}
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(DVC), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert run("init", "--no-scm", "-q").returncode == 0
    dag = run("dag", "--md")
    assert dag.returncode == 0, dag.stderr
    for stage in STAGES:
        assert f'["{stage.name}"]' in dag.stdout
