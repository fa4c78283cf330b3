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
    project.run_ok("run", "-S", f"orchestration.runner={runner}", "-S", "orchestration.workers=2")
    assert release_files(project.release) == release_files(clean_project.release)  # MANIFEST included
    # the block tasks ran in worker processes, not in the stage's own
    assert _stage_metrics(project, "quantize")["task_processes_elsewhere"] >= 1
    assert _stage_metrics(clean_project, "quantize")["task_processes_elsewhere"] == 0


def test_fp_inputs_blocks_run_in_parallel_threads_and_differ_from_quantized_inputs(make_project, clean_project):
    seq = make_project("fp-seq", {"quantize": {"inputs": "fp"}})
    par = make_project("fp-threads", {"quantize": {"inputs": "fp"}, "orchestration": {"runner": "threads"}})
    for p in (seq, par):
        p.run_ok("run", "--to", "pack")
    assert release_files(par.release) == release_files(seq.release)
    codes = "data/quantized/quantized.safetensors"  # FP inputs calibrate each block differently
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
