"""The pipeline on Prefect's task runners: a local Dask cluster and a local Ray instance give the
sequential runner's release byte for byte, with the work done in other processes; quantize.inputs fp
submits independent blocks; a storage root shared by two checkouts gives cache hits."""
from __future__ import annotations

import json

import pytest

from pipeline_projects import N_BLOCKS, release_files


def _stage_metrics(project, stage: str) -> dict:
    return json.loads((project.root / "metrics" / "stages" / f"{stage}.json").read_text())


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_a_cluster_runner_gives_the_sequential_release_byte_for_byte(make_project, clean_project, runner):
    pytest.importorskip({"dask": "prefect_dask", "ray": "prefect_ray"}[runner])
    project = make_project(f"runner-{runner}")  # the clean project's commit: -S changes params only
    project.run_ok("run", "--to", "pack", "-S", f"orchestration.runner={runner}", "-S", "orchestration.workers=2")
    assert release_files(project.release) == release_files(clean_project.release)  # MANIFEST included
    # the block tasks ran in worker processes, not in the stage's own, on one torch thread each (the
    # engines' default) where the sequential run used all cores: the codes do not depend on it
    quantize = _stage_metrics(project, "quantize")
    assert quantize["task_processes_elsewhere"] >= 1
    assert quantize["task_threads_min"] == quantize["task_threads_max"] == 1
    assert _stage_metrics(clean_project, "quantize")["task_processes_elsewhere"] == 0


def test_fp_inputs_blocks_run_in_parallel_threads_and_differ_from_quantized_inputs(make_project, clean_project):
    seq = make_project("fp-seq", {"quantize": {"inputs": "fp"}})
    par = make_project("fp-threads", {"quantize": {"inputs": "fp"}})  # the same commit: -S changes params only
    seq.run_ok("run", "--to", "quantize")
    par.run_ok("run", "--to", "quantize", "-S", "orchestration.runner=threads", "-S", "orchestration.workers=2")
    codes = "data/quantized/quantized.safetensors"  # FP inputs calibrate each block differently
    assert (par.root / codes).read_bytes() == (seq.root / codes).read_bytes()
    assert (seq.root / codes).read_bytes() != (clean_project.root / codes).read_bytes()
    blocks = json.loads((seq.root / "data" / "quantized" / "quantize.json").read_text())["blocks"]
    assert [b["block"] for b in blocks] == list(range(N_BLOCKS))


def test_two_checkouts_sharing_a_storage_root_share_cache_hits(make_project, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared-storage")  # stands in for a shared mount
    first = make_project("storage-a", {"orchestration": {"storage": str(shared)}})
    second = make_project("storage-b", {"orchestration": {"storage": str(shared)}})
    first.run_ok("run", "--to", "quantize")
    log = second.run_ok("run", "--to", "quantize").stderr
    assert "fetch_model: cached" in log and "prepare_data: cached" in log
    assert "capture_activations: cached" in log and all(f"block {i}: cached" in log for i in range(N_BLOCKS))
    assert not (second.root / ".cache" / "ptq" / "acts").exists()  # nothing computed into the project
    assert (second.root / "data" / "quantized" / "quantize.json").read_bytes() == (
        first.root / "data" / "quantized" / "quantize.json").read_bytes()


def test_sweep_of_two_methods_by_two_schemes_registers_four_results_and_one_table(make_project):
    project = make_project("sweep")
    done = project.run_ok("sweep", "-S", "quantize.method=rtn,gptq", "-S", "scheme=w4g32,w3g32", "-S", "qat.enabled=false",
                           "--name", "grid")
    out = project.root / "sweeps" / "grid"
    record = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["scheme"]): r for r in record["rows"]}
    assert set(rows) == {("rtn", "w4g32"), ("rtn", "w3g32"), ("gptq", "w4g32"), ("gptq", "w3g32")}
    assert len({r["model_uri"] for r in rows.values()}) == 4  # four registered versions
    assert len({r["ppl"] for r in rows.values()}) == 4  # four different quantizations were scored
    assert len({r["fp32_ppl"] for r in rows.values()}) == 1
    table = (out / "results.md").read_text()
    assert all(f"| {r['config']} |" in table and f"| {r['config']} |" in done.stdout for r in rows.values())
    # one MLflow sweep run, a child run per config
    from tasks.mlflow_runs import TAG_PARENT, Tracker

    runs = Tracker(f"sqlite:///{project.root / 'mlflow.db'}", "ptq-pipeline").runs_with_tag("ptq.sweep", "grid")
    (parent,) = [r for r in runs if TAG_PARENT not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(r["config"] for r in rows.values())
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    # the model, tokens and FP captures were computed once and shared through the storage root
    assert len(list((project.root / ".cache" / "ptq" / "models").iterdir())) == 1
    assert len(list((project.root / ".cache" / "ptq" / "tokens").iterdir())) == 1
