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
from flows.stages import CODE_DEPS, RELEASE_PARAMS, STAGES, Stage, get_stage, render_dvc_yaml

REPO = Path(__file__).resolve().parents[2]
DVC = REPO / ".venv" / "bin" / "dvc"


def _outputs(stage: Stage) -> list[str]:
    return list(stage.writes)


def test_committed_dvc_yaml_is_in_sync() -> None:
    assert (REPO / "dvc.yaml").read_text(encoding="utf-8") == render_dvc_yaml(), (
        "dvc.yaml is stale: run `python -m flows.stages`"
    )


def test_every_section_is_declared_by_its_stage_in_pipeline_order() -> None:
    # each section's stage declares all of it; stages come in pipeline order; recon configures quantize
    owners = {sec: s.name for s in STAGES for sec in s.params if "." not in sec and sec not in RELEASE_PARAMS[:-1]
              or (s.name != "pack" and "." not in sec)}
    assert list(owners) == [sec for sec in SECTIONS if sec != "orchestration"]
    assert [s.name for s in STAGES] == ["inputs", *[owners[sec] for sec in owners if sec != "recon"]]
    # where tasks run and where the cache lives never change an output: no stage reads them
    assert not any(p.split(".")[0] == "orchestration" for s in STAGES for p in s.params)
    assert get_stage("quantize").params == ("quantize", "recon", "fetch_model.dtype", "fetch_model.trust_remote_code")


def test_data_deps_come_from_earlier_stages() -> None:
    produced: set[str] = set()
    for stage in STAGES:
        for dep in stage.deps:
            assert dep in produced, f"{stage.name}: {dep} is not produced by an earlier stage"
        produced.update(_outputs(stage))


def test_pack_declares_every_param_the_release_records_and_qat_declares_the_bits() -> None:
    assert set(get_stage("pack").param_keys) == {k for sec in RELEASE_PARAMS for k in section_keys(sec)}
    assert "quantize.bits" in get_stage("qat").param_keys  # qat.enabled: auto decides by bits
    assert get_stage("evaluate").param_keys[-4:] == ("prepare_data.eval_sources", "prepare_data.mirror",
                                                     "fetch_model.dtype", "fetch_model.trust_remote_code")
    # every stage that loads the model or its tokenizer honours trust_remote_code
    for name in ("prepare_data", "quantize", "qat", "pack", "evaluate"):
        assert "fetch_model.trust_remote_code" in get_stage(name).param_keys, name
    # every stage that runs the model runs it in fetch_model.dtype
    for name in ("quantize", "qat", "evaluate"):
        assert "fetch_model.dtype" in get_stage(name).param_keys, name
    with pytest.raises(KeyError, match="unknown param 'quantize.nope'"):
        Stage("x", deps=(), params=("quantize.nope",), outs=()).param_keys


def test_metrics_and_plots_live_in_git_outside_the_data_folder() -> None:
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/data/*" in ignored and not any(line.startswith("/metrics") for line in ignored)
    for stage in STAGES:
        assert all(o.startswith("data/") for o in stage.outs), stage.name
        assert all(m.startswith("metrics/") for m in (*stage.metrics, *(p.path for p in stage.plots), stage.timings))


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
        assert entry["cmd"] == f"python -m flows.cli stage {stage.name}"
        assert entry["deps"] == [*stage.deps, *CODE_DEPS]
        assert entry["params"] == list(stage.param_keys)
        assert entry.get("outs", []) == list(stage.outs)
        assert {"metrics/stages/" + stage.name + ".json": {"cache": False}} in entry["metrics"]
        for item in entry.get("metrics", []) + entry.get("plots", []):
            ((_, options),) = item.items()
            assert options["cache"] is False
    assert doc["stages"]["quantize"]["plots"] == [{"metrics/block_errors.json": {"cache": False, "x": "block"}}]
    assert {"metrics/metrics.json": {"cache": False}} in doc["stages"]["evaluate"]["metrics"]
    # one chart with each block's error at initialization and after reconstruction
    (plot,) = doc["plots"]
    assert plot["block_error_before_after"]["y"] == {"metrics/block_errors.json": ["before", "after"]}


def test_unknown_stage() -> None:
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        get_stage("nope")


def test_stage_is_frozen_and_checks_its_sections() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGES[0].name = "x"  # type: ignore[misc]
    with pytest.raises(ParamsError, match="^nope: unknown section"):
        Stage("x", deps=(), params=("nope",), outs=())


@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in .venv")
def test_dvc_builds_the_graph(tmp_path: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    for code in CODE_DEPS:
        (tmp_path / code).mkdir()
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
