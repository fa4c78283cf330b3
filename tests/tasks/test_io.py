"""tasks.io: hashing, atomic writes, verified safetensors, manifests."""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch

from tasks import io
from tasks.io import (
    MANIFEST_NAME,
    IntegrityError,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors_verified,
    sha256_bytes,
    sha256_file,
    verify_manifest,
    write_manifest,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_sha256_file_streams_and_matches_hashlib(tmp_path, monkeypatch):
    data = bytes(range(256)) * 10_000  # 2.5 MB: several chunks
    monkeypatch.setattr(io, "_CHUNK", 4096)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest() == sha256_bytes(data)


def test_atomic_write_bytes_and_json(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "x.json").read_text()
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert _leftovers(tmp_path) == [] and _leftovers(target.parent) == []


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new con")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


@pytest.mark.reliability(
    fault='a crash while a safetensors file is written',
    sees='the exception',
    kept='the previous file and its sidecar, intact; no temporary left')
def test_atomic_save_safetensors_keeps_old_file_when_save_raises(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    digest = atomic_save_safetensors(path, {"w": torch.arange(6.0)})

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # partial garbage, then the writer dies
        raise OSError("killed midway")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)  # tasks.io imports it when saving
    with pytest.raises(OSError, match="killed midway"):
        atomic_save_safetensors(path, {"w": torch.zeros(6)})
    assert sha256_file(path) == digest
    assert torch.equal(load_safetensors_verified(path)["w"], torch.arange(6.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "t.safetensors.sha256"]


def test_safetensors_roundtrip_sidecar_and_metadata(tmp_path):
    path = tmp_path / "t.safetensors"
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    tensors = {"x_t": x.t(), "ids": torch.arange(5)}  # a non-contiguous view is accepted
    digest = atomic_save_safetensors(path, tensors, metadata={"scheme": "w4pc"})
    assert digest == sha256_file(path)
    assert (tmp_path / "t.safetensors.sha256").read_text().strip() == digest
    loaded = load_safetensors_verified(path)
    assert torch.equal(loaded["x_t"], x.t()) and torch.equal(loaded["ids"], torch.arange(5))
    assert not x.t().is_contiguous()  # caller's tensor untouched
    assert torch.equal(load_safetensors_verified(path, expected_sha256=digest.upper())["ids"], torch.arange(5))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"scheme": "w4pc"}


@pytest.mark.reliability(
    fault='a safetensors file with a flipped byte or the wrong expected hash',
    sees='IntegrityError naming the file and both hashes',
    kept='-')
def test_load_verified_rejects_tampering_and_wrong_hash(tmp_path):
    path = tmp_path / "t.safetensors"
    digest = atomic_save_safetensors(path, {"w": torch.ones(8)})
    with pytest.raises(IntegrityError, match="0" * 64):
        load_safetensors_verified(path, expected_sha256="0" * 64)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last payload byte
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        load_safetensors_verified(path)
    msg = str(err.value)
    assert str(path) in msg and digest in msg and sha256_file(path) in msg
    assert isinstance(err.value, RuntimeError)


def test_load_verified_needs_a_hash_and_a_file(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(path, {"w": torch.ones(2)})
    (tmp_path / "t.safetensors.sha256").unlink()
    with pytest.raises(IntegrityError, match="no sidecar"):
        load_safetensors_verified(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_safetensors_verified(tmp_path / "missing.safetensors", expected_sha256="0" * 64)


def test_save_rejects_non_tensors(tmp_path):
    with pytest.raises(TypeError, match="'a'"):
        atomic_save_safetensors(tmp_path / "t.safetensors", {"a": [1, 2]})


def test_manifest_roundtrip_and_tamper_detection(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.bin").write_bytes(b"beta")
    manifest = write_manifest(tmp_path)
    assert manifest == {
        "files": {"a.txt": sha256_bytes(b"alpha"), "sub/b.bin": sha256_bytes(b"beta")}
    }
    assert json.loads((tmp_path / "MANIFEST.json").read_text()) == manifest
    assert write_manifest(tmp_path) == manifest  # MANIFEST.json never lists itself
    assert verify_manifest(tmp_path) == []

    (tmp_path / "a.txt").write_text("alpha!")
    (tmp_path / "sub" / "b.bin").unlink()
    (tmp_path / "extra.txt").write_text("not listed")
    assert verify_manifest(tmp_path) == ["a.txt", "sub/b.bin"]
    assert verify_manifest(tmp_path, include=lambda rel: rel.endswith(".bin")) == ["sub/b.bin"]


def test_verify_manifest_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="MANIFEST.json"):
        verify_manifest(tmp_path)


@pytest.mark.reliability(
    fault='a MANIFEST listing `../secret.txt`',
    sees="IntegrityError: `files: paths outside the folder ['../secret.txt']; not reading them`",
    kept='the file outside is never read')
def test_a_manifest_naming_files_outside_its_folder_is_refused_before_any_read(tmp_path):
    folder, outside = tmp_path / "model", tmp_path / "secret.txt"
    folder.mkdir()
    outside.write_text("not part of the folder")
    (folder / "a.txt").write_text("a")
    write_manifest(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["../secret.txt"] = sha256_file(outside)  # a verifier would "confirm" it
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"paths outside the folder \['../secret.txt'\]"):
        verify_manifest(folder)


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),  # Python's write(): no file name
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
])
def test_a_writer_failing_for_lack_of_space_names_the_final_path_and_leaves_no_temporary(tmp_path, raised):
    path = tmp_path / "t.safetensors"

    def full_disk_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise raised

    import safetensors.torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", full_disk_save)
        with pytest.raises(OSError) as caught:
            atomic_save_safetensors(path, {"w": torch.zeros(6)})
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(path))
    assert list(tmp_path.iterdir()) == []
