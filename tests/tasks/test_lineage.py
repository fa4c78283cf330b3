"""tasks.lineage: auditing a release against its MANIFEST, its registry entry and a workspace.

Each test gets a tiny project (data/model, data/tokens, data/quantized, data/qat), a release packed
from it, its own SQLite database with a pipeline run, stage runs and the release registered as
version 1 @candidate. Damage is done to copies or to the registry's stored copy of this test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_manifest import CODES, CONFIG, SCALES, flip_byte, make_release, make_workspace
from test_mlflow_runs import no_global_mlflow, tracker  # noqa: F401  (fixtures)

import flows.stages as stages
from tasks import lineage
from tasks.codeid import code_identity
from tasks.io import MANIFEST_NAME, atomic_write_json, sha256_file
from tasks.lineage import CODE_MISMATCH, audit, format_audit, resolve_release
from tasks.mlflow_runs import Tracker, close_run, open_pipeline_run, open_stage_run
from tasks.registry import TAG_RELEASE_MANIFEST, register_release, release_tags

NAME = "ptq-smollm2-135m-w4g64"


def _register_pipeline(tracker: Tracker, release: Path, key: str = "key-1") -> dict:
    """What the flows do: a pipeline run, stage runs (quantize reused), the release registered."""
    parent = open_pipeline_run(tracker, key, "pipeline")
    stage_runs = {}
    for stage, status in (("quantize", "cached"), ("pack", "run")):
        stage_runs[stage] = open_stage_run(tracker, parent, stage, status)
        close_run(tracker, stage_runs[stage])
    stage_runs["register"] = open_stage_run(tracker, parent, "register")
    reg = register_release(tracker, stage_runs["register"], release, NAME, "candidate", move_alias=True)
    close_run(tracker, stage_runs["register"])
    close_run(tracker, parent)
    return {"parent": parent, "stages": stage_runs, "version": reg.version}


@pytest.fixture
def registered(tracker, tmp_path) -> dict:
    root = tmp_path / "project"
    chain = make_workspace(root)
    release = root / "data" / "release"
    manifest = make_release(release, chain)
    runs = _register_pipeline(tracker, release)
    stored = resolve_release(f"models:/{NAME}/1", tracker.tracking_uri)
    return {**runs, "root": root, "release": release, "manifest": manifest, "stored": stored, "tracker": tracker,
            "uri": tracker.tracking_uri, "manifest_sha256": sha256_file(release / MANIFEST_NAME)}


@pytest.fixture
def release_copy(registered, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(registered["release"], copy)
    return copy


def _paths(result) -> list[str]:
    return [m.path for m in result.mismatches]


def test_workspace_paths_agree_with_flows_stages():
    assert (lineage.MODEL_DIR, lineage.TOKENS_DIR, lineage.QUANTIZED_DIR, lineage.QAT_DIR) == (
        stages.MODEL, stages.TOKENS, stages.QUANTIZED, stages.QAT,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ resolve


def test_resolve_folder_alias_and_version(registered):
    release, uri = registered["release"], registered["uri"]
    assert resolve_release(str(release)) == release
    by_alias, by_version = resolve_release(f"models:/{NAME}@candidate", uri), resolve_release(f"models:/{NAME}/1", uri)
    assert by_alias == by_version == registered["stored"] and by_alias != release  # the stored copy, in place
    assert sha256_file(by_alias / MANIFEST_NAME) == registered["manifest_sha256"]


def test_resolve_rejects_bad_refs(registered, tmp_path):
    with pytest.raises(FileNotFoundError, match="models:/NAME@ALIAS"):
        resolve_release(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="tracking URI"):
        audit(f"models:/{NAME}@candidate")
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        audit(f"models:/{NAME}@candidate", f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        audit(f"models:/{NAME}@nosuchalias", registered["uri"])


# ------------------------------------------------------------------------------------ intact


def test_audit_of_an_intact_release_shows_the_chain(registered):
    result = audit(str(registered["release"]), registered["uri"], registered["root"])
    text = format_audit(result)
    assert result.ok and result.mismatches == [], text
    assert result.manifest_sha256 == registered["manifest_sha256"] and result.release_dir == registered["release"]
    checks = dict(result.checks)
    assert checks["MANIFEST.json is a valid ptq-release-manifest/2"] == "ok"
    assert checks["release files (4) vs MANIFEST.json"] == "ok" and checks["params vs params_sha256"] == "ok"
    root, chain = registered["root"], registered["manifest"]["chain"]
    for rel in ("data/model/MANIFEST.json", "data/tokens/calib.safetensors", "data/tokens/eval_wikitext2.safetensors",
                "data/quantized/quantized.safetensors", "data/qat/quantized.safetensors"):
        assert checks[str(root / rel)] == "ok"
    assert checks["code fingerprint (quantlib, tasks, flows) vs the release's"] == "ok"
    lines = text.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(p))
             for p in ("source ", "model ", "tokens ", "quantized ", "qat ", "release    4 files", "code ")]
    assert order == sorted(order), text  # model -> tokens -> quantized -> qat -> release, then code
    for expected in (
        "source     smollm2-135m (builtin)",
        f"tokens     calib sha256 {chain['calib'][:12]}, eval wikitext2 sha256 {chain['eval']['wikitext2'][:12]}",
        f"quantized  sha256 {chain['quantized'][:12]}",
        "quantize  bits=4, damp=0.01, group_size=64, method=gptq",
        f"registry   {NAME} v1 @candidate  run {registered['stages']['register']}",
        f"stage quantize (cached) FINISHED",
    ):
        assert expected in text, f"{expected!r} not in\n{text}"
    assert lines[-1] == "lineage OK"
    runs = {r.run_id: r for r in result.runs}
    assert set(runs) == {registered["parent"], *registered["stages"].values()}
    assert result.runs[0].run_id == registered["parent"] and runs[registered["parent"]].parent_run_id is None


@pytest.mark.parametrize("ref", [f"models:/{NAME}@candidate", f"models:/{NAME}/1"])
def test_audit_of_a_registered_version(registered, ref):
    result = audit(ref, registered["uri"], registered["root"])
    assert result.ok, format_audit(result)
    assert (result.model_version.name, result.model_version.version) == (NAME, 1)
    assert result.release_dir == registered["stored"] and result.location == str(registered["stored"])
    checks = dict(result.checks)
    assert checks[f"MANIFEST.json vs {NAME} v1 tag"] == "ok"
    assert checks[f"{NAME} v1 lineage tags (11) vs MANIFEST.json"] == "ok"
    assert f"(registered {NAME} v1)" in format_audit(result)


def test_without_tracking_or_workspace_only_the_release_is_read(registered):
    result = audit(str(registered["release"]))
    assert result.ok and result.runs == [] and result.versions == []
    assert [what for what, _ in result.checks] == [
        "MANIFEST.json is a valid ptq-release-manifest/2", "release files (4) vs MANIFEST.json", "params vs params_sha256",
    ]  # fmt: skip


# ------------------------------------------------------------------------------- the release


@pytest.mark.parametrize("rel", [CODES, SCALES, CONFIG])
def test_one_flipped_byte_fails_naming_the_file(registered, release_copy, rel):
    flip_byte(release_copy / rel)
    result = audit(str(release_copy), registered["uri"], registered["root"])
    (bad,) = result.mismatches
    assert bad.path == str(release_copy / rel)
    assert bad.expected == registered["manifest"]["files"][rel] and bad.actual == sha256_file(release_copy / rel)
    text = format_audit(result)
    assert f"MISMATCH   {release_copy / rel}: expected {bad.expected}" in text
    assert text.splitlines()[-1] == "lineage FAILED: 1 mismatches"


def test_flipped_byte_in_the_stored_copy_of_a_version(registered):
    stored = registered["stored"] / SCALES
    flip_byte(stored, 0)
    result = audit(f"models:/{NAME}@candidate", registered["uri"])
    assert _paths(result) == [str(stored)]


def test_an_added_and_a_missing_file_fail(registered, release_copy):
    (release_copy / "extra.bin").write_bytes(b"\0")
    (release_copy / "tokenizer" / "tokenizer.json").unlink()
    result = audit(str(release_copy))
    extra, missing = sorted(result.mismatches)
    assert (extra.path, extra.expected) == (str(release_copy / "extra.bin"), None)
    assert (missing.path, missing.actual) == (str(release_copy / "tokenizer/tokenizer.json"), None)


def test_tampered_params_fail(registered, release_copy):
    manifest = json.loads((release_copy / MANIFEST_NAME).read_text())
    manifest["params"]["quantize"]["bits"] = 2
    atomic_write_json(release_copy / MANIFEST_NAME, manifest)
    result = audit(str(release_copy))
    assert _paths(result) == [f"{release_copy / MANIFEST_NAME}#params"]
    assert result.mismatches[0].expected == registered["manifest"]["params_sha256"]


def test_an_invalid_manifest_is_a_mismatch_not_a_traceback(registered, release_copy):
    (release_copy / MANIFEST_NAME).write_text('{"format": "ptq-release-manifest/1", "files": {}}')
    result = audit(str(release_copy), None, registered["root"])
    (bad,) = result.mismatches
    assert bad.path == str(release_copy / MANIFEST_NAME) and "'ptq-release-manifest/1' is not" in bad.actual
    assert ("release files and params", "not checked: MANIFEST.json invalid") in result.checks
    text = format_audit(result)
    assert text.splitlines()[-1] == "lineage FAILED: 1 mismatches" and "no chain recorded" in text

    (release_copy / MANIFEST_NAME).unlink()
    (bad,) = audit(str(release_copy)).mismatches
    assert "not found" in bad.actual


def test_a_flipped_byte_in_a_registered_manifest_is_caught_by_the_version_tag(registered):
    manifest = registered["stored"] / MANIFEST_NAME
    text = manifest.read_text()
    digit = text.index(registered["manifest"]["files"][CONFIG]) + next(
        i for i, c in enumerate(registered["manifest"]["files"][CONFIG]) if c.isdigit())
    flip_byte(manifest, digit)  # a digit of config.json's hash: still valid JSON and a valid MANIFEST
    result = audit(f"models:/{NAME}/1", registered["uri"])
    assert (str(manifest), registered["manifest_sha256"], sha256_file(manifest)) in result.mismatches
    assert str(registered["stored"] / CONFIG) in _paths(result)


def test_a_consistently_rewritten_manifest_is_caught_by_the_version_tag(registered):
    """Change a file and its MANIFEST entry together: only the registry's pin can tell."""
    stored = registered["stored"]
    (stored / CONFIG).write_text(json.dumps({"model_type": "llama", "bits": 2}))
    manifest = json.loads((stored / MANIFEST_NAME).read_text())
    manifest["files"][CONFIG] = sha256_file(stored / CONFIG)
    atomic_write_json(stored / MANIFEST_NAME, manifest)
    result = audit(f"models:/{NAME}/1", registered["uri"])
    assert _paths(result) == [str(stored / MANIFEST_NAME)]
    assert result.mismatches[0].expected == registered["manifest_sha256"]


def test_edited_version_lineage_tags_fail(registered):
    client = registered["tracker"].client
    client.set_model_version_tag(NAME, "1", "ptq.chain.calib", "0" * 64)
    client.set_model_version_tag(NAME, "1", "ptq.git_dirty", "true")
    result = audit(f"models:/{NAME}/1", registered["uri"])
    assert _paths(result) == [f"models:/{NAME}/1#tag ptq.chain.calib", f"models:/{NAME}/1#tag ptq.git_dirty"]
    assert result.mismatches[0] == (result.mismatches[0].path, "0" * 64, registered["manifest"]["chain"]["calib"])


# ------------------------------------------------------------------------------ the workspace


@pytest.mark.parametrize("rel", ["data/model/MANIFEST.json", "data/tokens/calib.safetensors",
                                 "data/tokens/eval_wikitext2.safetensors", "data/quantized/quantized.safetensors",
                                 "data/qat/quantized.safetensors"])
def test_a_changed_workspace_file_fails_only_with_workspace(registered, rel):
    path = registered["root"] / rel
    flip_byte(path)
    result = audit(f"models:/{NAME}@candidate", registered["uri"], registered["root"])
    assert _paths(result) == [str(path)]
    assert result.mismatches[0].actual == sha256_file(path)
    assert audit(f"models:/{NAME}@candidate", registered["uri"]).ok  # the release itself is intact
    path.unlink()
    assert audit(str(registered["release"]), None, registered["root"]).mismatches[0] == (str(path),
                                                                                         result.mismatches[0].expected,
                                                                                         None)


def test_other_code_fails_only_with_workspace(registered, tmp_path):
    release = tmp_path / "old-code"
    chain = registered["manifest"]["chain"]
    make_release(release, chain, code={**code_identity(tmp_path), "fingerprint": "0" * 64})
    result = audit(str(release), None, registered["root"])
    assert _paths(result) == [CODE_MISMATCH] and result.mismatches[0].expected == "0" * 64
    assert f"MISMATCH   {CODE_MISMATCH}: expected {'0' * 64}" in format_audit(result)
    assert audit(str(release)).ok


def test_an_older_version_passes_after_the_workspace_moved_on(registered, tmp_path):
    root, tracker = registered["root"], registered["tracker"]
    for sub in ("tokens", "quantized", "qat", "release"):
        shutil.rmtree(root / "data" / sub)
    shutil.rmtree(root / "data" / "model")
    new_release = root / "data" / "release"
    make_release(new_release, make_workspace(root, seed=1), seed=1)  # re-ran on other data
    assert _register_pipeline(tracker, new_release, key="key-2")["version"] == 2
    assert audit(f"models:/{NAME}@candidate", registered["uri"], root).ok
    assert audit(f"models:/{NAME}/1", registered["uri"]).ok  # as registered
    old_against_new = audit(f"models:/{NAME}/1", registered["uri"], root)
    assert _paths(old_against_new) == [str(root / rel) for rel in (
        "data/model/MANIFEST.json", "data/tokens/calib.safetensors", "data/tokens/eval_wikitext2.safetensors",
        "data/quantized/quantized.safetensors", "data/qat/quantized.safetensors")]


# ---------------------------------------------------------------------------- no temp left over


def test_audit_leaves_no_temporary_files(registered, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert audit(f"models:/{NAME}@candidate", registered["uri"], registered["root"]).ok
    assert list(tmp.iterdir()) == []


def test_a_version_stored_elsewhere_is_downloaded_and_cleaned_up(registered, tmp_path, monkeypatch):
    """A version whose source is not a local folder (runs:/...) is read from a download that audit
    removes again; the result keeps what it found, not the path."""
    client, run_id = registered["tracker"].client, registered["stages"]["register"]
    tags = {k: v for k, v in release_tags(registered["stored"]).items() if not k.startswith("mlflow.")}
    client.create_registered_model("ptq-elsewhere")
    client.create_model_version("ptq-elsewhere", f"runs:/{run_id}/release", run_id, tags=tags)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    result = audit("models:/ptq-elsewhere/1", registered["uri"])
    assert result.ok, format_audit(result)
    assert result.release_dir is None and result.location == f"runs:/{run_id}/release"
    assert result.manifest == registered["manifest"] and list(tmp.iterdir()) == []
    flip_byte(registered["stored"] / CODES)  # the same artifact, read through the download
    assert _paths(audit("models:/ptq-elsewhere/1", registered["uri"])) == [f"runs:/{run_id}/release/{CODES}"]
    assert list(tmp.iterdir()) == []


# ------------------------------------------------------------------------------------ a server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout} s")


@pytest.mark.slow
def test_register_and_audit_through_a_tracking_server(tmp_path, monkeypatch, no_global_mlflow):  # noqa: F811
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
                                cwd=tmp_path, start_new_session=True)
    try:
        _wait_healthy(url, proc)
        root = tmp_path / "project"
        release = root / "data" / "release"
        make_release(release, make_workspace(root))
        runs = _register_pipeline(Tracker(url, "ptq-server-test"), release)
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        result = audit(f"models:/{NAME}@candidate", url, root)
        assert result.ok, format_audit(result)
        assert result.release_dir is None and result.location.startswith("mlflow-artifacts:")
        assert list(tmp.iterdir()) == []  # the download is gone
        assert {r.run_id for r in result.runs} == {runs["parent"], *runs["stages"].values()}
        stored = list((tmp_path / "server-artifacts").rglob(f"release/{MANIFEST_NAME}"))
        assert [sha256_file(p) for p in stored] == [sha256_file(release / MANIFEST_NAME)]
        flip_byte(stored[0].parent / CONFIG)
        assert _paths(audit(f"models:/{NAME}/1", url)) == [f"{result.location}/{CONFIG}"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn workers)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
