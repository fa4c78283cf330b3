"""tasks.registry: a release folder as a model version, idempotent, with lineage tags and no code."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from test_manifest import CODES, CONFIG, PARAMS, flip_byte, make_release, make_workspace
from test_mlflow_runs import no_global_mlflow, tracker  # noqa: F401  (fixtures)

from tasks.codeid import code_identity
from tasks.io import MANIFEST_NAME, IntegrityError, sha256_file
from tasks.lineage import audit, format_audit
from tasks.mlflow_runs import Tracker
from tasks.registry import (
    TAG_GATE,
    TAG_RELEASE_MANIFEST,
    Registration,
    register_release,
    release_model_name,
    release_tags,
)

NAME = "ptq-smollm2-135m-w4g64"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def release(tmp_path) -> Path:
    folder = tmp_path / "release"
    code = {**code_identity(tmp_path), "git_commit": COMMIT, "git_dirty": True}
    make_release(folder, make_workspace(tmp_path / "project"), code=code)
    return folder


def _changed_copy(release: Path, dst: Path) -> Path:
    """The release with another config.json, re-packed (a new, valid release)."""
    shutil.copytree(release, dst)
    (dst / CONFIG).write_text(json.dumps({"model_type": "llama", "bits": 3}), encoding="utf-8")
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    from tasks.manifest import build_release_manifest

    build_release_manifest(dst, params=manifest["params"], chain=manifest["chain"], code=manifest["code"])
    return dst


def _versions(tracker: Tracker, name: str) -> list[int]:
    return sorted(int(v.version) for v in tracker.client.search_model_versions(f"name = '{name}'"))


def _alias(tracker: Tracker, name: str, alias: str = "candidate") -> int:
    return int(tracker.client.get_model_version_by_alias(name, alias).version)


# ----------------------------------------------------------------------------------- names, tags


def test_release_model_name_is_mlflow_safe():
    assert release_model_name("smollm2-135m", "w4g64") == "ptq-smollm2-135m-w4g64"
    assert release_model_name("hf:HuggingFaceTB/SmolLM2-135M@main", "w3g64") == "ptq-smollm2-135m-w3g64"
    assert release_model_name("/models/Llama 3:8B.gguf", "W4PC") == "ptq-llama-3-8b-w4pc"
    assert release_model_name("./local/folder/", "w2g64") == "ptq-folder-w2g64"
    for name in (release_model_name("hf:a/b:c", "x/y"), release_model_name("C:\\m\\n", "w4")):
        assert "/" not in name and ":" not in name
    with pytest.raises(ValueError, match="scheme"):
        release_model_name("smollm2-135m", "//")


def test_release_tags_come_from_the_manifest(release):
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    chain, code = manifest["chain"], manifest["code"]
    assert release_tags(release) == {
        TAG_RELEASE_MANIFEST: sha256_file(release / MANIFEST_NAME),
        "ptq.code_fingerprint": code["fingerprint"],
        "ptq.git_commit": COMMIT,
        "mlflow.source.git.commit": COMMIT,
        "ptq.git_dirty": "true",
        "ptq.versions": json.dumps(code["versions"], sort_keys=True, separators=(",", ":")),
        "ptq.params_sha256": manifest["params_sha256"],
        "ptq.chain.model": chain["model"],
        "ptq.chain.calib": chain["calib"],
        "ptq.chain.quantized": chain["quantized"],
        "ptq.chain.qat": chain["qat"],
        "ptq.chain.eval": json.dumps(chain["eval"], separators=(",", ":")),
        "ptq.chain.source": json.dumps(chain["source"], sort_keys=True, separators=(",", ":")),
    }


def test_a_long_json_tag_is_stored_as_its_digest(tmp_path):
    chain = make_workspace(tmp_path / "project")
    files = {f"model-{i:05d}-of-00400.safetensors": "ab" * 32 for i in range(400)}  # a sharded checkpoint
    chain["source"] = {**chain["source"], "source_files": files}
    make_release(tmp_path / "release", chain)
    text = json.dumps(chain["source"], sort_keys=True, separators=(",", ":"))
    assert len(text) > 8000  # over MLflow's run tag limit
    tag = release_tags(tmp_path / "release")["ptq.chain.source"]
    assert tag == "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# -------------------------------------------------------------------------------------- register


@pytest.mark.reliability(
    fault='the same release registered twice (a rerun)',
    sees='the existing version returned',
    kept='one version')
def test_registering_the_same_release_twice_creates_one_version(tracker, release):
    with tracker.run("register") as run_id:
        first = register_release(tracker, run_id, release, NAME, "candidate", move_alias=True)
        second = register_release(tracker, run_id, release, NAME, "candidate", move_alias=True)
    assert first == Registration(NAME, 1, new=True, alias_moved=True, reason="")
    assert second == Registration(NAME, 1, new=False, alias_moved=True, reason="")
    assert _versions(tracker, NAME) == [1] and _alias(tracker, NAME) == 1
    assert [a.path for a in tracker.client.list_artifacts(run_id)] == ["release"]  # uploaded once

    tags = release_tags(release)
    mv = tracker.client.get_model_version(NAME, "1")
    assert mv.tags == {k: v for k, v in tags.items() if not k.startswith("mlflow.")} and mv.run_id == run_id
    run_tags = tracker.client.get_run(run_id).data.tags
    assert all(run_tags[k] == v for k, v in tags.items())  # mlflow.source.git.commit included


def test_a_changed_release_is_version_2_and_takes_the_alias(tracker, release, tmp_path):
    changed = _changed_copy(release, tmp_path / "changed")
    with tracker.run("register-1") as run_1:
        register_release(tracker, run_1, release, NAME, "candidate", move_alias=True)
    with tracker.run("register-2") as run_2:
        reg = register_release(tracker, run_2, changed, NAME, "candidate", move_alias=True)
    assert (reg.version, reg.new, reg.alias_moved) == (2, True, True)
    assert _versions(tracker, NAME) == [1, 2] and _alias(tracker, NAME) == 2
    assert TAG_GATE not in tracker.client.get_model_version(NAME, "2").tags
    # back to the first release: found again, nothing new, the alias follows it
    with tracker.run("register-3") as run_3:
        back = register_release(tracker, run_3, release, NAME, "candidate", move_alias=True)
    assert (back.version, back.new) == (1, False) and _alias(tracker, NAME) == 1
    assert tracker.client.list_artifacts(run_3) == []


def test_a_gated_release_leaves_the_alias_and_records_why(tracker, release, tmp_path):
    changed = _changed_copy(release, tmp_path / "changed")
    with tracker.run("register") as run_id:
        register_release(tracker, run_id, release, NAME, "candidate", move_alias=True)
        why = "ppl 31.9 > candidate 31.5 + 0.1"
        gated = register_release(tracker, run_id, changed, NAME, "candidate", move_alias=False, reason=why)
    assert gated == Registration(NAME, 2, new=True, alias_moved=False, reason=why)
    assert _alias(tracker, NAME) == 1
    assert tracker.client.get_model_version(NAME, "2").tags[TAG_GATE] == why
    assert TAG_GATE not in tracker.client.get_model_version(NAME, "1").tags
    # both registered from one run: each version's artifact holds its own release, intact
    for version, manifest in (("1", release / MANIFEST_NAME), ("2", changed / MANIFEST_NAME)):
        result = audit(f"models:/{NAME}/{version}", tracker.tracking_uri)
        assert result.ok, format_audit(result)
        assert result.manifest_sha256 == sha256_file(manifest)


def test_the_version_downloads_as_a_plain_release_folder(tracker, release, tmp_path):
    import mlflow

    with tracker.run("register") as run_id:
        register_release(tracker, run_id, release, NAME, "candidate", move_alias=True)
    uri = tracker.client.get_model_version_download_uri(NAME, "1")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl")))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == sorted([*json.loads((release / MANIFEST_NAME).read_text())["files"], MANIFEST_NAME])
    assert (local / MANIFEST_NAME).read_bytes() == (release / MANIFEST_NAME).read_bytes()
    assert not [f for f in files if f.endswith((".py", "MLmodel", ".pkl"))]  # data only, no code
    assert audit(str(local)).ok
    run_artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert run_artifacts == {"release"} and "MLmodel" not in {Path(f).name for f in files}
    assert list(tracker.client.search_logged_models([tracker.experiment_id])) == []  # no MLflow model


@pytest.mark.reliability(
    fault='registering a release that does not match its MANIFEST ({case})',
    sees='IntegrityError naming the files; not registering',
    kept='the registry unchanged')
@pytest.mark.parametrize("damage", ["flip", "add", "remove"])
def test_a_damaged_release_is_refused_and_nothing_registered(tracker, release, damage):
    if damage == "flip":
        flip_byte(release / CODES)
    elif damage == "add":
        (release / "extra.bin").write_bytes(b"\0")
    else:
        (release / CONFIG).unlink()
    named = {"flip": f"{CODES} (changed)", "add": "extra.bin (not listed)", "remove": f"{CONFIG} (missing)"}[damage]
    with tracker.run("register") as run_id, pytest.raises(IntegrityError, match=re.escape(named)):
        register_release(tracker, run_id, release, NAME, "candidate", move_alias=True)
    assert tracker.client.search_model_versions(f"name = '{NAME}'") == []
    assert tracker.client.list_artifacts(run_id) == []


def test_params_that_do_not_match_their_digest_are_refused(tracker, release):
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    manifest["params"]["quantize"]["bits"] = 3
    (release / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    with tracker.run("register") as run_id, pytest.raises(IntegrityError, match="params"):
        register_release(tracker, run_id, release, NAME, "candidate", move_alias=True)
    assert PARAMS["quantize"]["bits"] == 4  # the shared constant was not touched
