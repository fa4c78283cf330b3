"""The pipeline end to end on a tiny Llama, through the real `ptq` command line.

Acceptance criteria proven here: a SIGKILLed run resumes without recomputing finished blocks and
releases the same bytes as an uninterrupted run; a corrupted cache entry is reported and recomputed;
bad params fail before any stage, naming the key; MLflow holds the runs, params, metrics, lineage
tags and the registered version; `ptq lineage` verifies a release and names a tampered file; DVC
re-runs exactly the stages whose params changed (slow).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pipeline_projects import (N_BLOCKS, REPO, Project, git_commit_all, ptq_many, release_files, run_and_kill,
                               write_params)

from tasks.cache import code_fingerprint
from tasks.io import sha256_file

KILL_AFTER = 2  # blocks finished (checkpoint written and result recorded) before the SIGKILL
RECOMPUTING = "cache entry points at missing or corrupted files; recomputing"
CODE_CHANGED = ("quantlib/tasks sources changed while the test ran; cache keys hash them, so nothing could be "
                "reused: re-run the test on a quiet checkout")


def _code() -> str:
    """The code part of every cache key, hashed afresh (code_fingerprint itself is memoized)."""
    return code_fingerprint.__wrapped__()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _file_ids(paths) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _block_files(project: Project) -> list[Path]:
    """Block checkpoints (codes) in the order they were written: block 0 first."""
    return sorted(project.blocks_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


# ------------------------------------------------------------------------------- kill / resume


@dataclass
class Resumed:
    project: Project
    killed_rc: int
    killed_log: str
    kept: dict[str, tuple[int, int]]  # block files at the kill: name -> (inode, mtime_ns)
    after: dict[str, tuple[int, int]]  # the same files after the resumed run
    n_files: int  # block files after the resumed run
    log: str  # stderr of the resumed run
    release: dict[str, bytes]  # right after the resumed run (later tests re-run the project)
    code: tuple[str, str]  # code fingerprint before the killed run, after the resumed run


def _run_until_blocks_done(project: Project, n: int) -> tuple[int, str, dict]:
    """`ptq run`, SIGKILLed once block n-1 is logged computed (its checkpoint written, its task
    result recorded) while block n runs; returns (rc, stderr, the files of blocks 0..n-1 then).
    On a loaded machine block n may still finish before the signal lands: see _finished."""

    def ready(log: str):
        files = _block_files(project) if project.blocks_dir.is_dir() else []
        return _file_ids(files[:n]) if len(files) >= n and f"block {n - 1}: computed" in log else None

    return run_and_kill(project, ready)


@pytest.fixture(scope="module")
def resumed(make_project) -> Resumed:
    project, code = make_project("resumed"), _code()
    rc, killed_log, kept = _run_until_blocks_done(project, KILL_AFTER)
    log = project.run_ok().stderr
    return Resumed(project, rc, killed_log, kept, _file_ids(project.blocks_dir / name for name in kept),
                   len(_block_files(project)), log, release_files(project.release), (code, _code()))


def _finished(killed_log: str) -> int:
    """Blocks the killed run logged as computed: KILL_AFTER, or more if the kill landed late."""
    return sum(f"block {i}: computed" in killed_log for i in range(N_BLOCKS))


def test_killed_run_stopped_mid_quantize(resumed):
    assert resumed.killed_rc == -signal.SIGKILL
    assert len(resumed.kept) == KILL_AFTER
    assert KILL_AFTER <= _finished(resumed.killed_log) < N_BLOCKS


def test_resume_reuses_finished_blocks(resumed):
    assert resumed.code[0] == resumed.code[1], CODE_CHANGED
    done = _finished(resumed.killed_log)
    for i in range(done):
        assert f"block {i}: cached" in resumed.log
    # block `done` may have recorded its result in the instant before the kill, so either is right
    for i in range(done + 1, N_BLOCKS):
        assert f"block {i}: computed" in resumed.log
    for label in ("fetch_model", "prepare_data", "capture_activations"):
        assert f"{label}: cached" in resumed.log
    assert resumed.after == resumed.kept  # same inodes and mtimes: not rewritten
    assert resumed.n_files == N_BLOCKS
    assert (resumed.project.root / ".cache" / "prefect-home").is_dir()  # ptq's default, per project


def test_resumed_release_equals_uninterrupted_release(resumed, clean_project):
    assert resumed.release == release_files(clean_project.release)


def test_corrupted_cache_entries_are_reported_and_recomputed(resumed, clean_project):
    project = resumed.project
    blocks = _block_files(project)
    assert len(blocks) == N_BLOCKS
    codes = blocks[0]  # block 0's codes
    # a block's output shard is the acts/ folder named like its codes file (both by the block's key)
    shard = project.root / ".cache" / "ptq" / "acts" / blocks[2].stem / "batch_00000.safetensors"
    _flip_byte(codes)
    _flip_byte(shard)

    log = project.run_ok().stderr
    assert _code() == resumed.code[1], CODE_CHANGED

    assert f"block 0: {RECOMPUTING}" in log and "block 0: computed" in log
    assert f"block 2: {RECOMPUTING}" in log and "block 2: computed" in log
    assert "block 1: cached" in log and "block 3: cached" in log  # same inputs again: still valid
    assert (codes.with_name(codes.name + ".sha256")).read_text().strip() == sha256_file(codes)
    assert release_files(project.release) == release_files(clean_project.release)


# ---------------------------------------------------------------------------------- bad params

BAD_PARAMS = {  # case -> (overrides, extra params.yaml content, key named in the error)
    "unknown key": (["quantize.nope=1"], {}, "quantize.nope"),
    "unknown key in file": ([], {"prepare_data": {"n_sample": 8}}, "prepare_data.n_sample"),
    "wrong type": (["quantize.bits=four"], {}, "quantize.bits"),
    "wrong type in file": ([], {"quantize": {"sym": "yes"}}, "quantize.sym"),
    "bits out of range": (["quantize.bits=9"], {}, "quantize.bits"),
    "group size zero": (["quantize.group_size=0"], {}, "quantize.group_size"),
    "missing model": (["fetch_model.source=/nonexistent"], {}, "fetch_model.source"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_source, base_env) -> dict[str, tuple[Project, subprocess.CompletedProcess]]:
    """Every BAD_PARAMS case as `ptq run` in its own fresh project, all started at once."""
    jobs = []
    for case, (overrides, extra, _) in BAD_PARAMS.items():
        root = tmp_path_factory.mktemp("bad")
        write_params(root / "params.yaml", tiny_source, extra)
        jobs.append((Project(root, base_env), ["run", *[a for o in overrides for a in ("-S", o)]]))
    return {case: (p, done) for case, (p, _), done in zip(BAD_PARAMS, jobs, ptq_many(jobs))}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_fail_before_any_stage(bad_runs, case):
    project, done = bad_runs[case]
    key = BAD_PARAMS[case][2]
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"ptq run: error: {key}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project.root / "data").exists()
    assert not (project.root / ".cache" / "ptq").exists()  # no stage wrote its cache


# -------------------------------------------------------------------------------------- MLflow


def test_mlflow_holds_runs_params_metrics_tags_and_registered_version(clean_project):
    from tasks.tracking import (
        TAG_CALIB,
        TAG_GIT_COMMIT,
        TAG_QUANTLIB,
        TAG_RELEASE_MANIFEST,
        TAG_SOURCE_MODEL,
        TAG_STAGE,
        quiet_mlflow,
    )

    quiet_mlflow()
    from mlflow import MlflowClient

    import quantlib

    root = clean_project.root
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registry = json.loads((root / "data/reports/registry.json").read_text())
    parent = client.get_run(registry["run_id"])
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {c.data.tags[TAG_STAGE]: c for c in children}
    assert set(by_stage) == {"fetch_model", "prepare_data", "quantize", "qat", "pack", "evaluate"}
    assert all(c.info.status == "FINISHED" for c in children)

    params = parent.data.params
    assert params["quantize.bits"] == "4" and params["quantize.group_size"] == "32"
    assert params["fetch_model.source"] == yaml.safe_load((root / "params.yaml").read_text())["fetch_model"]["source"]

    metrics = json.loads((root / "data/reports/metrics.json").read_text())
    assert parent.data.metrics["ppl.wikitext2"] == pytest.approx(metrics["ppl"]["wikitext2"])
    assert parent.data.metrics["fp32_ppl.wikitext2"] == pytest.approx(metrics["fp32_ppl"]["wikitext2"])
    history = client.get_metric_history(by_stage["quantize"].info.run_id, "block_error")
    errors = json.loads((root / "data/reports/block_errors.json").read_text())
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [b["block"] for b in errors] == list(range(N_BLOCKS))
    assert [m.value for m in history] == pytest.approx([b["after"] for b in errors])

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    release_manifest = sha256_file(root / "data/release/MANIFEST.json")
    tags = parent.data.tags
    assert tags[TAG_GIT_COMMIT] == head
    assert tags[TAG_SOURCE_MODEL] == sha256_file(root / "data/model/MANIFEST.json")
    assert tags[TAG_CALIB] == sha256_file(root / "data/tokens/calib.safetensors")
    assert tags[TAG_QUANTLIB] == quantlib.__version__
    assert tags[TAG_RELEASE_MANIFEST] == release_manifest

    version = client.get_model_version_by_alias(registry["model_name"], "candidate")
    assert int(version.version) == registry["version"] and version.run_id == parent.info.run_id
    assert version.tags[TAG_RELEASE_MANIFEST] == release_manifest


# ------------------------------------------------------------------------------------- lineage


@pytest.fixture(scope="module")
def lineage_runs(clean_project, tmp_path_factory):
    """`ptq lineage` on the release folder, on the registered alias, and on a tampered copy."""
    root = clean_project.root
    name = json.loads((root / "data/reports/registry.json").read_text())["model_name"]
    tampered = tmp_path_factory.mktemp("tampered") / "release"
    shutil.copytree(clean_project.release, tampered)
    _flip_byte(tampered / "model.safetensors")
    runs = ptq_many([(clean_project, ["lineage", "data/release", "--project", str(root)]),
                     (clean_project, ["lineage", f"models:/{name}@candidate", "--project", str(root)]),
                     (clean_project, ["lineage", str(tampered), "--project", str(root)])])
    return {**dict(zip(("folder", "alias", "tampered"), runs)), "name": name,
            "tampered_file": tampered / "model.safetensors"}


def test_lineage_of_release_folder(lineage_runs, clean_project):
    done = lineage_runs["folder"]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    source = yaml.safe_load((clean_project.root / "params.yaml").read_text())["fetch_model"]["source"]
    assert f"source     {source} (local)" in out
    assert "quantize.bits=4" in out
    assert f"registry   {lineage_runs['name']} v1 @candidate" in out
    assert "stage quantize (run)" in out
    assert out.rstrip().endswith("result     OK: every recorded hash matches")


def test_lineage_of_registered_alias(lineage_runs):
    done = lineage_runs["alias"]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert f"(registered {lineage_runs['name']} v1)" in done.stdout
    assert "result     OK" in done.stdout


def test_lineage_names_a_tampered_file(lineage_runs):
    done = lineage_runs["tampered"]
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "result     FAILED" in done.stdout
    assert f"MISMATCH   {lineage_runs['tampered_file']}: expected" in done.stdout


# ----------------------------------------------------------------------------------------- DVC


@pytest.mark.slow
def test_dvc_repro_reruns_only_changed_stages(tmp_path, tiny_source, base_env):
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() or not Path(sys.executable).with_name("ptq").exists():
        pytest.skip("dvc or the ptq script is not installed next to this Python")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo)
    for code in ("quantlib", "tasks", "flows"):  # the stages' code deps (a symlink works too)
        shutil.copytree(REPO / code, repo / code, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo / "params.yaml", tiny_source)
    env = {**base_env, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base_env['PATH']}"}
    git_commit_all(repo, env)

    def dvc_run(*args: str) -> str:
        done = subprocess.run([str(dvc), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout + done.stderr

    dvc_run("init", "-q")
    git_commit_all(repo, env, "dvc init")
    stages = ["fetch_model", "prepare_data", "quantize", "qat", "pack", "evaluate", "register"]

    out = dvc_run("repro")
    assert all(f"Running stage '{s}'" in out for s in stages), out
    assert (repo / "data/release/MANIFEST.json").is_file()

    out = dvc_run("repro")
    assert "Running stage" not in out and "Data and pipelines are up to date" in out, out

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["quantize"]["bits"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc_run("repro")
    for s in stages[:2]:
        assert f"Stage '{s}' didn't change, skipping" in out and f"Running stage '{s}'" not in out, out
    for s in stages[2:]:
        assert f"Running stage '{s}'" in out, out
    assert json.loads((repo / "data/reports/metrics.json").read_text())["scheme"] == "w3g32"
