"""tasks.lineage: resolving release references and auditing every recorded hash.

Builds the same small project and MLflow history as test_tracking (its helpers), in a temp dir.
Tampering tests work on copies, or restore what they change, so the module's release stays intact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_tracking import HAVE_GIT, log_pipeline, make_project, write_dvc_lock

import flows.stages as stages
from tasks import lineage
from tasks.io import MANIFEST_NAME, atomic_write_json, sha256_file
from tasks.lineage import audit, format_audit, resolve_release
from tasks.tracking import Tracker, release_model_name

NAME = release_model_name("smollm2-135m", "w4g64")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    base = tmp_path_factory.mktemp("lineage")
    project = make_project(base / "project", git=HAVE_GIT)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    runs = log_pipeline(Tracker(uri, "ptq-test"), project, NAME)
    return {**project, **runs, "uri": uri, "base": base}


@pytest.fixture
def project_copy(registered, tmp_path):
    """A copy of the project (data/, dvc.lock) that a test may damage."""
    root = tmp_path / "project"
    shutil.copytree(registered["root"], root)
    return root


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_workspace_paths_agree_with_flows_stages():
    assert (lineage.MODEL_DIR, lineage.TOKENS_DIR, lineage.RELEASE_DIR, lineage.METRICS_FILE) == (
        stages.MODEL, stages.TOKENS, stages.RELEASE, stages.METRICS,
    )  # fmt: skip


# -------------------------------------------------------------------------------------- resolve


def test_resolve_folder_alias_and_version(registered, tmp_path):
    release = registered["release"]
    assert resolve_release(str(release)) == release
    by_alias = resolve_release(f"models:/{NAME}@candidate", registered["uri"])
    by_version = resolve_release(f"models:/{NAME}/1", registered["uri"])
    assert by_alias == by_version and by_alias != release  # the registry's stored copy (local)
    assert sha256_file(by_alias / MANIFEST_NAME) == registered["manifest_sha256"]
    assert {p.name for p in by_alias.iterdir()} == {p.name for p in release.iterdir()}


def test_resolve_rejects_bad_refs(registered, tmp_path):
    with pytest.raises(FileNotFoundError, match="models:/NAME@ALIAS"):
        resolve_release(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="tracking URI"):
        resolve_release(f"models:/{NAME}@candidate")
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        resolve_release(f"models:/{NAME}@candidate", f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        resolve_release(f"models:/{NAME}@nosuchalias", registered["uri"])


# ---------------------------------------------------------------------------------------- audit


def test_audit_of_the_untouched_release_is_ok_and_shows_the_chain(registered):
    result = audit(str(registered["release"]), registered["uri"], registered["root"])
    text = format_audit(result)
    assert result.ok, text
    assert result.mismatches == []
    assert result.manifest_sha256 == registered["manifest_sha256"]
    checked = dict(result.checks)
    assert checked["release files (4) vs MANIFEST.json"] == "ok"
    assert checked[str(registered["root"] / "data/tokens/calib.safetensors")] == "ok"
    assert checked[str(registered["root"] / "data/model/MANIFEST.json")] == "ok"
    assert any(k.startswith(str(registered["root"] / "dvc.lock")) and v.startswith("ok") for k, v in checked.items())
    # the chain: source, data, params, code, stages with dvc.lock md5s, metrics, MLflow runs
    for expected in (
        "source     smollm2-135m (builtin)",
        f"calib      sha256 {registered['calib_sha256'][:12]}",
        "eval       wikitext2",
        "quantize.bits=4",
        f"code       git {registered['code']['git_commit'] or 'none'}, quantlib",
        "quantize      run        12.0s  data/quantized md5 q1.dir",
        "evaluate",
        "ppl.wikitext2=31.5",
        f"registry   {NAME} v1 @candidate",
        "result     OK",
    ):
        assert expected in text, f"{expected!r} not in\n{text}"
    run_ids = {r.run_id for r in result.runs}
    assert {registered["parent"], *registered["stages"].values()} <= run_ids
    assert [v.version for v in result.versions] == [registered["version"]]
    assert result.metrics["ppl"] == {"wikitext2": 31.5}


@pytest.mark.parametrize("ref", [f"models:/{NAME}@candidate", f"models:/{NAME}/1"])
def test_audit_of_a_registered_version_is_ok(registered, ref):
    result = audit(ref, registered["uri"], registered["root"])
    assert result.ok, format_audit(result)
    assert result.model_version.name == NAME and result.model_version.version == 1
    assert ("MANIFEST.json vs " + f"{NAME} v1 tag", "ok") in result.checks
    assert f"(registered {NAME} v1)" in format_audit(result)


def test_audit_without_project_or_tracking_checks_the_release_alone(registered):
    result = audit(str(registered["release"]))
    assert result.ok and result.runs == [] and result.metrics == {}
    assert [what for what, _ in result.checks] == ["release files (4) vs MANIFEST.json", "params vs params_sha256"]


def test_one_flipped_byte_fails_naming_the_file(registered, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(registered["release"], release)
    _flip_byte(release / "model.safetensors")
    result = audit(str(release), registered["uri"], registered["root"])
    assert not result.ok
    (bad,) = result.mismatches
    assert bad.path == str(release / "model.safetensors")
    assert bad.expected == registered["manifest"]["files"]["model.safetensors"] and bad.actual != bad.expected
    assert f"MISMATCH   {release / 'model.safetensors'}: expected {bad.expected}" in format_audit(result)


def test_tampered_registered_copy_fails(registered):
    stored = resolve_release(f"models:/{NAME}@candidate", registered["uri"]) / "config.json"
    original = stored.read_bytes()
    try:
        _flip_byte(stored, 0)
        result = audit(f"models:/{NAME}@candidate", registered["uri"])
        assert [m.path for m in result.mismatches] == [str(stored)]
    finally:
        stored.write_bytes(original)
    assert audit(f"models:/{NAME}@candidate", registered["uri"]).ok


def test_rewritten_manifest_is_caught_by_the_version_tag(registered):
    """Changing a file and its MANIFEST entry together still fails: MLflow pinned the MANIFEST."""
    stored = resolve_release(f"models:/{NAME}/1", registered["uri"])
    saved = {p: p.read_bytes() for p in (stored / "quantization.json", stored / MANIFEST_NAME)}
    try:
        (stored / "quantization.json").write_text(json.dumps({"bits": 2}))
        manifest = json.loads((stored / MANIFEST_NAME).read_text())
        manifest["files"]["quantization.json"] = sha256_file(stored / "quantization.json")
        atomic_write_json(stored / MANIFEST_NAME, manifest)
        result = audit(f"models:/{NAME}/1", registered["uri"])
        assert [m.path for m in result.mismatches] == [str(stored / MANIFEST_NAME)]
        assert result.mismatches[0].expected == registered["manifest_sha256"]
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def test_an_added_file_fails(registered, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(registered["release"], release)
    (release / "extra.bin").write_bytes(b"\x00")
    (bad,) = audit(str(release)).mismatches
    assert bad.path == str(release / "extra.bin") and bad.expected is None


def test_changed_workspace_token_ids_fail(registered, project_copy):
    calib = project_copy / "data" / "tokens" / "calib.safetensors"
    _flip_byte(calib)
    result = audit(str(registered["release"]), None, project_copy)
    assert [m.path for m in result.mismatches] == [str(calib)]
    assert result.mismatches[0].expected == registered["calib_sha256"]


def test_changed_source_model_fails(registered, project_copy):
    weights = project_copy / "data" / "model" / "model.safetensors"
    _flip_byte(weights)
    result = audit(str(registered["release"]), None, project_copy)
    assert [m.path for m in result.mismatches] == [str(weights)]  # its MANIFEST still matches
    assert audit(str(registered["release"]), None, project_copy, deep=False).ok

    (project_copy / "data" / "model" / MANIFEST_NAME).write_text("{}")
    result = audit(str(registered["release"]), None, project_copy)
    assert [m.path for m in result.mismatches] == [str(project_copy / "data" / "model" / MANIFEST_NAME)]


def test_dvc_lock_checks_recorded_stage_entries(registered, project_copy):
    lock = project_copy / "dvc.lock"
    write_dvc_lock(project_copy, ("fetch_model", "prepare_data", "quantize", "qat"))  # as at pack time
    result = audit(str(registered["release"]), None, project_copy)
    assert result.ok and (str(lock), "ok (unchanged since pack)") in result.checks

    lock.write_text(lock.read_text().replace("q1.dir", "q2.dir"))  # quantize re-ran: other output
    result = audit(str(registered["release"]), None, project_copy)
    paths = [m.path for m in result.mismatches]
    assert paths == [f"{lock}:qat.deps.data/quantized", f"{lock}:quantize.outs.data/quantized"]
    assert "MISMATCH" in format_audit(result) and f"{lock}:quantize.outs.data/quantized" in format_audit(result)

    lock.unlink()
    assert [m.path for m in audit(str(registered["release"]), None, project_copy).mismatches] == [str(lock)]


def test_absent_workspace_data_is_skipped_not_failed(registered, project_copy):
    shutil.rmtree(project_copy / "data" / "tokens")
    result = audit(str(registered["release"]), None, project_copy)
    assert result.ok
    assert (str(project_copy / "data" / "tokens"), "not checked: absent") in result.checks
