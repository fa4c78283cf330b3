"""The pipeline end to end on a tiny Llama, in fresh clones, through the real `ptq` and `dvc` commands.

Proven here:
- `ptq run` leaves DVC clean (dvc.lock describes what ran); a second `ptq run` recomputes nothing
  and registers nothing; two `ptq run` started at once in one project: one waits for the project
  lock, then finds everything done; one release, one registered version, no temporaries left;
- a SIGKILLed run resumes without recomputing finished blocks and releases byte-identical files
  (MANIFEST.json included); MLflow shows the killed stage FAILED and links the resumed one to it;
  a corrupted cache entry is reported and recomputed; a run killed at each failpoint in turn (a model
  folder half-published, a stage finished but not committed to dvc.lock, a release written but not
  swapped in, half an evaluation, a release uploaded but not versioned, a version created but not
  aliased) resumes to the same release bytes and one registered version;
- `dvc repro` in a fresh clone runs every stage, a second one nothing, and its release and dvc.lock
  equal `ptq run`'s; `ptq run` after it runs nothing; changing any param re-runs exactly the stages
  that declare it; `dvc push` / `dvc pull` into a second clone restores a release that `ptq lineage`
  verifies;
- the registry gate keeps the alias and exits non-zero; an older version still verifies after the
  workspace has moved on; `ptq lineage` names a flipped byte in codes, scales, config and MANIFEST;
  `ptq lineage --rebuild` reproduces the release byte for byte;
- bad params fail before any stage, naming the key.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pipeline_projects import (N_BLOCKS, RUN_TIMEOUT_S, Project, git, git_commit_all, ptq_many, release_files,
                               run_and_kill, write_params)

from flows.params import section_keys
from flows.stages import STAGES
from tasks.codeid import code_fingerprint
from tasks.io import sha256_file

KILL_AFTER = 2  # blocks finished (checkpoint written and result recorded) before the SIGKILL
RECOMPUTING = "cache entry points at missing or corrupted files; recomputing"
CODE_CHANGED = ("quantlib/tasks/flows sources changed while the test ran; cache keys hash them, so nothing could "
                "be reused: re-run the test on a quiet checkout")
STAGE_NAMES = [s.name for s in STAGES]


def _code() -> str:
    """The code part of every cache key, hashed afresh (code_fingerprint itself is memoized)."""
    return code_fingerprint.__wrapped__()


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def _file_ids(paths) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _block_files(project: Project) -> list[Path]:
    """Block checkpoints (codes) in the order they were written: block 0 first."""
    return sorted(project.blocks_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


def _client(project: Project):
    from tasks.mlflow_runs import quiet_mlflow

    quiet_mlflow()
    from mlflow import MlflowClient

    uri = f"sqlite:///{project.root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _registry(project: Project) -> dict:
    return json.loads((project.root / "metrics" / "registry.json").read_text())


def _versions(project: Project) -> list[int]:
    name = _registry(project)["model_name"]
    return sorted(int(v.version) for v in _client(project).search_model_versions(f"name = '{name}'"))


def _stage_status(stdout: str) -> dict[str, str]:
    """stage -> "ran" | "up to date", from `ptq run`'s summary table."""
    rows = [line.split() for line in stdout.splitlines()]
    return {r[0]: " ".join(r[1:-1]) for r in rows if r and r[0] in STAGE_NAMES}


# ----------------------------------------------------------------------- ptq run leaves DVC clean


def test_ptq_run_leaves_dvc_clean_and_the_lock_describing_every_stage(clean_project):
    assert "Data and pipelines are up to date" in clean_project.dvc_ok("status")
    lock = yaml.safe_load((clean_project.root / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGE_NAMES
    release = next(o for o in lock["stages"]["pack"]["outs"] if o["path"] == "data/release")
    assert release["nfiles"] == len(release_files(clean_project.release))
    # metrics and plots are plain files in git, outside the ignored data folder
    ignored = git(clean_project.root, clean_project.env, "status", "--porcelain", "--ignored", "metrics")
    assert "!!" not in ignored and "metrics/" in ignored


@pytest.fixture(scope="module")
def noop(clean_project):
    before = release_files(clean_project.release), _versions(clean_project), _registry(clean_project)
    done = clean_project.run_ok()
    return before, done, (release_files(clean_project.release), _versions(clean_project), _registry(clean_project))


def test_second_run_recomputes_and_registers_nothing(noop, clean_project):
    before, done, after = noop
    status = _stage_status(done.stdout)
    assert status == {"inputs": "ran", **{s: "up to date" for s in STAGE_NAMES[1:]}}, done.stdout
    assert after == before  # the same release bytes, no new version, the same registry record
    assert "Data and pipelines are up to date" in clean_project.dvc_ok("status")
    # the no-op run is still tracked: its stages are nested runs tagged cached
    from tasks.mlflow_runs import TAG_PARENT, TAG_STAGE, TAG_STAGE_STATUS

    client = _client(clean_project)
    exp = client.get_experiment_by_name("ptq-pipeline")
    parents = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"])
    latest = next(r for r in parents if TAG_PARENT not in r.data.tags)
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{latest.info.run_id}'")
    tags = {k.data.tags[TAG_STAGE]: k.data.tags[TAG_STAGE_STATUS] for k in kids}
    assert tags == {"inputs": "run", **{s: "cached" for s in STAGE_NAMES[1:]}}


# ------------------------------------------------------------------------- two runs, one project


@pytest.fixture(scope="module")
def concurrent(make_project) -> tuple[Project, list[subprocess.CompletedProcess]]:
    project = make_project("concurrent")
    return project, ptq_many([(project, ("run",)), (project, ("run",))])


@pytest.mark.reliability(
    fault='two `ptq run` started at once in one project',
    sees='the second prints `waiting for the project lock ... (held by pid N ...)`, then finds every stage up to date',
    kept='one release, one registered version, DVC clean, no temporaries')
def test_two_runs_at_once_one_waits_then_finds_everything_done(concurrent, clean_project):
    project, done = concurrent
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-3000:] for d in done]
    waited = [d for d in done if "waiting for the project lock" in d.stderr]
    assert len(waited) == 1, [d.stderr[-2000:] for d in done]
    [first] = [d for d in done if d is not waited[0]]
    assert set(_stage_status(first.stdout).values()) == {"ran"}, first.stdout
    assert _stage_status(waited[0].stdout) == {"inputs": "ran", **{s: "up to date" for s in STAGE_NAMES[1:]}}
    assert release_files(project.release) == release_files(clean_project.release)
    assert _versions(project) == [1]
    assert "Data and pipelines are up to date" in project.dvc_ok("status")
    assert _temporaries(project) == []


# ------------------------------------------------------------------------------- kill / resume


# every failpoint of tasks.faults.FAILPOINTS in pipeline order; each run dies at the next one
CRASH_POINTS = ("fetch_model.written", "prepare_data.finished", "quantize.finished", "pack.written",
                "evaluate.scored", "register.uploaded", "register.versioned")


@dataclass
class Crashed:
    project: Project
    deaths: dict[str, subprocess.CompletedProcess]  # failpoint -> the run that died there
    final: subprocess.CompletedProcess  # the run after the last death
    release: dict[str, bytes]
    temporaries: list[str]


@pytest.fixture(scope="module")
def crashed(make_project) -> Crashed:
    from tasks.faults import ENV

    project = make_project("crashed")
    deaths = {}
    for point in CRASH_POINTS:  # its own session: the failpoint kills the run with its Prefect server
        deaths[point] = subprocess.run(project.command("run"), cwd=project.root, env={**project.env, ENV: point},
                                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S, start_new_session=True)
    final = project.run_ok()
    return Crashed(project, deaths, final, release_files(project.release), _temporaries(project))


def test_each_crashed_run_died_at_its_failpoint(crashed):
    for point, done in crashed.deaths.items():
        assert done.returncode == -signal.SIGKILL, f"{point}: rc {done.returncode}\n{done.stderr[-3000:]}"
        assert f"failpoint {point}: SIGKILL" in done.stderr


def test_each_rerun_reuses_what_the_crashed_run_finished(crashed):
    d = crashed.deaths
    # the model folder the crash left half-published in the cache, swept by the next run
    assert re.search(r"removed \.cache/ptq/models/\.[^ /]+\.tmp \(left by a killed run\)", d["prepare_data.finished"].stderr)
    assert "fetch_model: up to date" in d["quantize.finished"].stderr
    # quantize finished but was not committed: DVC re-runs it, every block from the cache
    rerun = d["pack.written"].stderr
    assert "capture_activations: cached" in rerun and all(f"block {i}: cached" in rerun for i in range(N_BLOCKS))
    assert "perplexity (release): cached" in d["register.uploaded"].stderr
    assert _stage_status(crashed.final.stdout) == {
        "inputs": "ran", **{s: "up to date" for s in STAGE_NAMES[1:-1]}, "register": "ran"}


@pytest.mark.reliability(
    fault='kill -9 at each failpoint in turn: model folder written but not published, prepare_data and quantize finished but not in dvc.lock, release written but not swapped in, half an evaluation, release uploaded but not a model version, version created but not aliased',
    sees='each next `ptq run` reruns only the unfinished stage, from its cached tasks',
    kept='the same release bytes as an uninterrupted run and exactly one registered version, aliased; `ptq lineage` OK')
def test_crashes_anywhere_resume_to_the_clean_release_and_one_version(crashed, clean_project):
    project = crashed.project
    assert crashed.release == release_files(clean_project.release)  # whole files, MANIFEST included
    assert _versions(project) == [1]  # neither the upload without a version nor the version without alias doubled it
    reg = _registry(project)
    assert reg["version"] == 1 and reg["alias_moved"] and not reg["new_version"]
    done = project.ptq("lineage", f"models:/{reg['model_name']}@{reg['alias']}")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]
    assert "Data and pipelines are up to date" in project.dvc_ok("status")
    assert crashed.temporaries == []


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
    temporaries: tuple[list[str], list[str]]  # temporaries in the project after the kill, after the resume


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
    left = _temporaries(project)
    log = project.run_ok().stderr
    return Resumed(project, rc, killed_log, kept, _file_ids(project.blocks_dir / name for name in kept),
                   len(_block_files(project)), log, release_files(project.release), (code, _code()),
                   (left, _temporaries(project)))


def _temporaries(project: Project) -> list[str]:
    """What a killed writer leaves behind (tasks.io.TEMP_GLOB) under data/ and the cache."""
    from tasks.io import TEMP_GLOB

    return sorted(p.relative_to(project.root).as_posix() for d in ("data", ".cache/ptq")
                  for p in (project.root / d).rglob(TEMP_GLOB))


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
    assert "capture_activations: cached" in resumed.log
    assert resumed.after == resumed.kept  # same inodes and mtimes: not rewritten
    assert resumed.n_files == N_BLOCKS


@pytest.mark.reliability(
    fault='temporary folders a killed run left behind',
    sees='`removed <path> (left by a killed run)` for each, from the next run once it holds the project lock',
    kept='everything else')
def test_resume_removes_the_temporaries_the_kill_left(resumed):
    left, after = resumed.temporaries
    assert after == []
    for rel in left:  # each reported by name (the kill may land before a block opens one: then none)
        assert f"removed {rel} (left by a killed run)" in resumed.log


@pytest.mark.reliability(
    fault='kill -9 of `ptq run` (process group, Prefect server included) in the middle of quantize, after 2 of 4 blocks',
    sees='the next `ptq run` logs the finished blocks `cached` and computes the rest',
    kept='finished blocks (same inodes, not rewritten); a release byte-identical to an uninterrupted run, MANIFEST included')
def test_resumed_release_is_byte_identical_to_the_uninterrupted_one(resumed, clean_project):
    # whole files, MANIFEST.json included: no timing or run flag in a release
    assert resumed.release == release_files(clean_project.release)


@pytest.mark.reliability(
    fault='kill -9 during a stage, seen in MLflow',
    sees="the killed stage's run is FAILED and tagged killed; the resumed pipeline run names it",
    kept='the MLflow history of both runs')
def test_mlflow_shows_the_killed_stage_failed_and_links_the_resumed_one(resumed):
    from tasks.mlflow_runs import TAG_KILLED, TAG_RESUMES, TAG_STAGE

    client = _client(resumed.project)
    exp = client.get_experiment_by_name("ptq-pipeline")
    quantize = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_STAGE}` = 'quantize'",
                                  order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in quantize] == ["FAILED", "FINISHED"]
    killed, resumed_run = quantize
    assert killed.data.tags[TAG_KILLED] == "true"
    assert resumed_run.data.tags[TAG_RESUMES] == killed.info.run_id
    assert killed.data.tags["mlflow.parentRunId"] == resumed_run.data.tags["mlflow.parentRunId"]
    # the stage logged its block errors while it ran, before it was killed (the kill may land
    # between a block's "computed" line and its metric)
    assert len(client.get_metric_history(killed.info.run_id, "block_error")) >= KILL_AFTER - 1


@pytest.mark.reliability(
    fault='cache entries whose files are corrupted or deleted',
    sees='`<task>: cache entry points at missing or corrupted files; recomputing`',
    kept='every intact entry; the same release')
def test_corrupted_cache_entries_are_reported_and_recomputed(resumed, clean_project):
    project = resumed.project
    blocks = _block_files(project)
    assert len(blocks) == N_BLOCKS
    codes = blocks[0]  # block 0's codes
    # a block's output shard is the acts/ folder named like its codes file (both by the block's key)
    shard = project.root / ".cache" / "ptq" / "acts" / blocks[2].stem / "batch_00000.safetensors"
    _flip_byte(codes)
    _flip_byte(shard)
    shutil.rmtree(project.root / "data" / "quantized")  # make DVC re-run the quantize stage

    log = project.run_ok().stderr
    assert _code() == resumed.code[1], CODE_CHANGED
    assert f"block 0: {RECOMPUTING}" in log and "block 0: computed" in log
    assert f"block 2: {RECOMPUTING}" in log and "block 2: computed" in log
    assert "block 1: cached" in log and "block 3: cached" in log  # same inputs again: still valid
    assert (codes.with_name(codes.name + ".sha256")).read_text().strip() == sha256_file(codes)
    assert release_files(project.release) == release_files(clean_project.release)


# ------------------------------------------------------------------------------- dvc repro


@dataclass
class DvcRuns:
    project: Project
    first: str
    second: str
    ptq_after: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def dvc_runs(make_project) -> DvcRuns:
    """`dvc repro` twice in a fresh clone (no `dvc init`: the DVC project files are committed), then `ptq run`."""
    project = make_project("dvc")
    first = project.dvc_ok("repro")
    second = project.dvc_ok("repro")
    return DvcRuns(project, first, second, project.run_ok())


def test_dvc_repro_runs_every_stage_then_nothing(dvc_runs):
    assert all(f"Running stage '{s}'" in dvc_runs.first for s in STAGE_NAMES), dvc_runs.first
    assert "Running stage" not in dvc_runs.second, dvc_runs.second
    assert "Data and pipelines are up to date" in dvc_runs.second


def test_ptq_run_after_dvc_repro_runs_nothing(dvc_runs):
    status = _stage_status(dvc_runs.ptq_after.stdout)
    assert status == {"inputs": "ran", **{s: "up to date" for s in STAGE_NAMES[1:]}}, dvc_runs.ptq_after.stdout
    assert "Data and pipelines are up to date" in dvc_runs.project.dvc_ok("status")


def _lock_outs(root: Path) -> dict[str, dict[str, str]]:
    """stage -> {out path: md5} from dvc.lock, without the timing files nothing reads."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in (s.get("outs") or []) if not o["path"].startswith("metrics/stages/")}
            for name, s in lock.items()}


def test_dvc_repro_and_ptq_run_agree_byte_for_byte(dvc_runs, clean_project):
    assert release_files(dvc_runs.project.release) == release_files(clean_project.release)
    outs = {k: v for k, v in _lock_outs(clean_project.root).items() if k != "register"}
    assert {k: v for k, v in _lock_outs(dvc_runs.project.root).items() if k != "register"} == outs
    for name in ("metrics.json", "ppl.json", "block_errors.json"):
        assert (dvc_runs.project.root / "metrics" / name).read_bytes() == (clean_project.root / "metrics" / name).read_bytes()


def _changed_stages(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {key.rsplit(":", 1)[-1] for key in repo.status()}  # "<path>/dvc.yaml:<stage>" -> stage


def test_changing_each_param_reruns_exactly_the_stages_that_declare_it(dvc_runs):
    root = dvc_runs.project.root
    path = root / "params.yaml"
    original = path.read_text()
    assert _changed_stages(root) == set()
    try:
        for section in yaml.safe_load(original):
            for key in section_keys(section):
                params = yaml.safe_load(original)
                params[section][key.split(".", 1)[1]] = f"changed {key}"  # DVC compares values only
                path.write_text(yaml.safe_dump(params, sort_keys=False))
                declaring = {s.name for s in STAGES if key in s.param_keys}
                if section == "orchestration":  # where tasks run and results live: no output depends on it
                    assert not declaring and _changed_stages(root) == set(), key
                else:
                    assert declaring and _changed_stages(root) == declaring, key
    finally:
        path.write_text(original)
    assert _changed_stages(root) == set()


def test_dvc_push_then_pull_into_a_second_clone_restores_a_verified_release(dvc_runs, base_env):
    project = dvc_runs.project
    git_commit_all(project.root, project.env, "dvc.lock and metrics of a run")
    project.dvc_ok("push")
    second = Project(project.root.parent / "second-clone", base_env)
    subprocess.run(["git", "clone", "-q", str(project.root), str(second.root)], check=True, env=dict(base_env))
    assert not (second.root / "data").exists()
    second.dvc_ok("pull")
    assert release_files(second.release) == release_files(project.release)
    assert "Data and pipelines are up to date" in second.dvc_ok("status")
    done = second.ptq("lineage", "data/release", "--workspace")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]


# -------------------------------------------------------------------------------------- MLflow


def test_mlflow_holds_live_stage_runs_params_metrics_and_the_registered_version(clean_project):
    from tasks.mlflow_runs import TAG_PARENT, TAG_STAGE
    from tasks.registry import TAG_CODE_FINGERPRINT, TAG_GIT_COMMIT, TAG_RELEASE_MANIFEST

    root, client = clean_project.root, _client(clean_project)
    registry = _registry(clean_project)
    version = client.get_model_version_by_alias(registry["model_name"], "candidate")
    assert int(version.version) == registry["version"] == 1
    parent = client.get_run(version.run_id)
    assert parent.info.status == "FINISHED" and TAG_PARENT not in parent.data.tags
    kids = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    by_stage = {k.data.tags[TAG_STAGE]: k for k in kids}
    assert set(by_stage) == set(STAGE_NAMES) and all(k.info.status == "FINISHED" for k in kids)
    # each stage run spans its own stage, in pipeline order (opened when it started)
    starts = [by_stage[s].info.start_time for s in STAGE_NAMES]
    assert starts == sorted(starts) and all(by_stage[s].data.metrics["seconds"] >= 0 for s in STAGE_NAMES)
    assert parent.data.params["quantize.bits"] == "4" and parent.data.params["quantize.group_size"] == "32"
    errors = json.loads((root / "metrics" / "block_errors.json").read_text())
    history = sorted(client.get_metric_history(by_stage["quantize"].info.run_id, "block_error"), key=lambda m: m.step)
    assert [m.step for m in history] == [b["block"] for b in errors] == list(range(N_BLOCKS))
    assert [m.value for m in history] == pytest.approx([b["after"] for b in errors])
    manifest = json.loads((clean_project.release / "MANIFEST.json").read_text())
    assert version.tags[TAG_RELEASE_MANIFEST] == sha256_file(clean_project.release / "MANIFEST.json")
    assert version.tags[TAG_CODE_FINGERPRINT] == manifest["code"]["fingerprint"] == _code()
    head = git(root, clean_project.env, "rev-parse", "HEAD").strip()
    assert version.tags[TAG_GIT_COMMIT] == manifest["code"]["git_commit"] == head
    assert manifest["code"]["git_dirty"] is False
    # the release's model card is covered by its MANIFEST; the registry entry adds the measured perplexity
    card = (clean_project.release / "README.md").read_text()
    assert manifest["files"]["README.md"] == sha256_file(clean_project.release / "README.md")
    assert manifest["chain"]["calib"] in card and head in card and "w4g32" in card
    metrics = json.loads((root / "metrics" / "metrics.json").read_text())
    assert version.description.startswith(card) and "## Perplexity" in version.description
    assert all(f"{v:.4f}" in version.description for v in metrics["ppl"].values())


# ---------------------------------------------------------------------- registry gate, lineage


@dataclass
class Moved:
    project: Project
    gated: subprocess.CompletedProcess
    moved: subprocess.CompletedProcess
    old_version: subprocess.CompletedProcess
    old_version_workspace: subprocess.CompletedProcess
    metrics_diff: str
    plots_diff: str


@pytest.fixture(scope="module")
def moved(clean_project, tmp_path_factory) -> Moved:
    """A copy of the clean project, its run committed to git: a run whose gate fails, then a run with
    another release format (the workspace moves on to version 2), then lineage of version 1 and the
    metrics and plots diffs against the committed run."""
    root = tmp_path_factory.mktemp("moved") / "project"
    shutil.copytree(clean_project.root, root, symlinks=True)
    project = Project(root, clean_project.env)
    git_commit_all(root, project.env, "dvc.lock and metrics of the first run")
    gated = project.ptq("run", "-S", "register.max_ppl_ratio=0.5")
    moved_on = project.run_ok("run", "-S", "register.max_ppl_ratio=null", "-S", "pack.format=compressed-tensors")
    name = _registry(project)["model_name"]
    old = [project.ptq("lineage", f"models:/{name}/1", *extra) for extra in ((), ("--workspace",))]
    diffs = [project.tool("dvc", kind, "diff", "HEAD", "--json").stdout for kind in ("metrics", "plots")]
    return Moved(project, gated, moved_on, *old, *diffs)


@pytest.mark.reliability(
    fault='a release that fails `register.max_ppl_ratio`',
    sees='exit 1 with the ratio and the limit; the version is registered and tagged with why',
    kept='the alias on the previous version')
def test_gate_failure_keeps_the_alias_records_why_and_exits_nonzero(moved):
    done = moved.gated
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    assert "quality gate failed: ppl ratio" in done.stderr and "register.max_ppl_ratio 0.5" in done.stderr
    status = _stage_status(done.stdout) if done.stdout else {}
    assert "register" not in status or status["register"] != "up to date"


def test_workspace_moved_on_registers_version_2_and_version_1_still_verifies(moved):
    registry = _registry(moved.project)
    assert registry["version"] == 2 and registry["alias_moved"] is True
    assert _stage_status(moved.moved.stdout)["quantize"] == "up to date"  # only pack and later re-ran
    for done in (moved.old_version, moved.old_version_workspace):
        assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]


def test_metrics_and_plots_diff_across_commits(moved):
    diff = json.loads(moved.metrics_diff)
    assert diff["metrics/registry.json"]["version"] == {"old": 1, "new": 2, "diff": 1}
    assert "metrics/stages/pack.json" in diff  # the re-run stage's timing file changed too
    plots = json.loads(moved.plots_diff)["data"]
    assert {"block_error_before_after", "metrics/block_errors.json", "metrics/ppl.json"} <= set(plots)
    assert plots["metrics/ppl.json"][0]["revisions"] == ["workspace", "HEAD"]


def _tensor_offset(path: Path, suffix: str) -> int:
    """Byte offset of the first tensor whose name ends with `suffix` in a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in sorted(header) if k.endswith(suffix))
    return 8 + n + header[name]["data_offsets"][0]


@pytest.fixture(scope="module")
def tampered(clean_project, tmp_path_factory):
    """`ptq lineage` on copies of the release with one flipped byte each (codes, scales, config,
    MANIFEST), and on the registered alias."""
    jobs, files = [], {}
    weights = clean_project.release / "model.safetensors"
    for what, rel, offset in (("codes", "model.safetensors", _tensor_offset(weights, ".qweight")),
                              ("scales", "model.safetensors", _tensor_offset(weights, ".scales")),
                              ("config", "config.json", 2), ("manifest", "MANIFEST.json", 20)):
        copy = tmp_path_factory.mktemp(what) / "release"
        shutil.copytree(clean_project.release, copy)
        _flip_byte(copy / rel, offset)
        files[what] = copy / rel
        jobs.append((clean_project, ["lineage", str(copy)]))
    name = _registry(clean_project)["model_name"]
    jobs.append((clean_project, ["lineage", f"models:/{name}@candidate"]))
    done = ptq_many(jobs)
    return dict(zip([*files, "alias"], done)), files


@pytest.mark.reliability(
    fault="one flipped byte in the release's {case}",
    sees='`ptq lineage` names the file and exits 1',
    kept='the registered copy, which still verifies')
@pytest.mark.parametrize("what", ["codes", "scales", "config", "manifest"])
def test_lineage_names_a_flipped_byte(tampered, what):
    runs, files = tampered
    done = runs[what]
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "lineage FAILED" in done.stdout and "Traceback" not in done.stderr
    if what != "manifest":
        assert str(files[what]) in done.stdout


def test_lineage_of_the_registered_alias_is_ok(tampered):
    done = tampered[0]["alias"]
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]


def test_rebuild_reproduces_the_release_byte_for_byte(clean_project):
    done = clean_project.ptq("lineage", "data/release", "--rebuild")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "rebuild OK: every file is byte-identical" in done.stdout


# ---------------------------------------------------------------------------------- bad params

BAD_PARAMS = {  # case -> (overrides, extra params.yaml content, key named in the error)
    "unknown key": (["quantize.nope=1"], {}, "quantize.nope"),
    "unknown key in file": ([], {"prepare_data": {"n_sample": 8}}, "prepare_data.n_sample"),
    "wrong type": (["quantize.bits=four"], {}, "quantize.bits"),
    "wrong type in file": ([], {"quantize": {"sym": "yes"}}, "quantize.sym"),
    "bits out of range": (["quantize.bits=9"], {}, "quantize.bits"),
    "group size zero": (["quantize.group_size=0"], {}, "quantize.group_size"),
    "missing model": (["fetch_model.source=/nonexistent"], {}, "fetch_model.source"),
    "bad gate": (["register.max_ppl_ratio=-1"], {}, "register.max_ppl_ratio"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_source, base_env) -> dict[str, tuple[Project, subprocess.CompletedProcess, str]]:
    """Every BAD_PARAMS case as `ptq run` in its own project, all started at once; with the
    params.yaml text before the run."""
    jobs = []
    for case, (overrides, extra, _) in BAD_PARAMS.items():
        root = tmp_path_factory.mktemp("bad")
        write_params(root / "params.yaml", tiny_source, extra)
        jobs.append((Project(root, base_env), ["run", *[a for o in overrides for a in ("-S", o)]]))
    before = [p.root.joinpath("params.yaml").read_text() for p, _ in jobs]
    return {case: (p, done, text) for case, (p, _), done, text in zip(BAD_PARAMS, jobs, ptq_many(jobs), before)}


@pytest.mark.reliability(
    fault='bad params: {case}',
    sees='`ptq run: error: <section.key>: <rule>` before any stage, exit 2',
    kept='the project untouched: no data/, no .cache/ptq')
@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_fail_before_any_stage(bad_runs, case):
    project, done, before = bad_runs[case]
    key = BAD_PARAMS[case][2]
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"ptq run: error: {key}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project.root / "data").exists() and not (project.root / ".cache" / "ptq").exists()
    assert (project.root / "params.yaml").read_text() == before  # -S values are not written back
