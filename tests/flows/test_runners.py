"""The pipeline on Prefect's task runners: a local Ray instance and a local Dask cluster give the
sequential runner's release byte for byte (Dask with independent, quantize.inputs fp, blocks), with
the work done in one-thread worker processes; a storage root another checkout filled gives cache hits;
a sweep runs its configs on the threads runner."""
from __future__ import annotations

import json

import pytest

from pipeline_projects import N_BLOCKS, release_files


def _stage_metrics(project, stage: str) -> dict:
    return json.loads((project.root / "metrics" / "stages" / f"{stage}.json").read_text())


def test_ray_gives_the_sequential_release_byte_for_byte(make_project, clean_project):
    pytest.importorskip("prefect_ray")
    project = make_project("runner-ray")  # the clean project's commit: -S changes params only
    project.run_ok("run", "--to", "pack", "-S", "orchestration.runner=ray", "-S", "orchestration.workers=2")
    assert release_files(project.release) == release_files(clean_project.release)  # MANIFEST included
    _ran_in_one_thread_workers(project)
    assert _stage_metrics(clean_project, "quantize")["task_processes_elsewhere"] == 0


def test_dask_gives_the_sequential_release_byte_for_byte_with_fp_input_blocks_in_parallel(make_project, clean_project):
    pytest.importorskip("prefect_dask")
    seq = make_project("fp-seq", {"quantize": {"inputs": "fp"}})
    dask = make_project("fp-dask", {"quantize": {"inputs": "fp"}})  # the same commit: -S changes params only
    seq.run_ok("run", "--to", "pack")
    dask.run_ok("run", "--to", "pack", "-S", "orchestration.runner=dask", "-S", "orchestration.workers=2")
    assert release_files(dask.release) == release_files(seq.release)  # MANIFEST included
    codes = "data/quantized/quantized.safetensors"  # FP inputs calibrate each block otherwise
    assert (seq.root / codes).read_bytes() != (clean_project.root / codes).read_bytes()
    blocks = json.loads((seq.root / "data" / "quantized" / "quantize.json").read_text())["blocks"]
    assert [b["block"] for b in blocks] == list(range(N_BLOCKS))
    _ran_in_one_thread_workers(dask)


def _ran_in_one_thread_workers(project) -> None:
    """The block tasks ran in worker processes, not in the stage's own, on one torch thread each (the
    engines' default) where the sequential run used all cores: the codes do not depend on it."""
    quantize = _stage_metrics(project, "quantize")
    assert quantize["task_processes_elsewhere"] >= 1
    assert quantize["task_threads_min"] == quantize["task_threads_max"] == 1


def test_a_checkout_whose_storage_root_another_filled_gets_cache_hits_and_writes_nothing_there(
        make_project, clean_project):
    shared = clean_project.root / ".cache" / "ptq"  # stands in for a shared mount another checkout filled
    before = sorted(p.relative_to(shared) for p in shared.rglob("*") if p.name != "project.lock")
    second = make_project("storage-b", {"orchestration": {"storage": str(shared)}})
    log = second.run_ok("run", "--to", "quantize").stderr
    assert "fetch_model: cached" in log and "prepare_data: cached" in log
    assert "capture_activations: cached" in log and all(f"block {i}: cached" in log for i in range(N_BLOCKS))
    assert not (second.root / ".cache" / "ptq" / "acts").exists()  # nothing computed into the project
    assert sorted(p.relative_to(shared) for p in shared.rglob("*") if p.name != "project.lock") == before
    assert (second.root / "data" / "quantized" / "quantize.json").read_bytes() == (
        clean_project.root / "data" / "quantized" / "quantize.json").read_bytes()


def test_sweep_of_two_methods_by_two_schemes_registers_four_results_and_one_table(make_project):
    project = make_project("sweep")
    done = project.run_ok("sweep", "-S", "quantize.method=rtn,gptq", "-S", "scheme=w4g32,w3g32", "-S", "qat.enabled=false",
                           "-S", "orchestration.runner=threads", "-S", "orchestration.workers=2", "--name", "grid")
    out = project.root / "sweeps" / "grid"
    record = json.loads((out / "results.json").read_text())
    assert record["runner"] == "threads"  # the configs ran as parallel tasks
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
