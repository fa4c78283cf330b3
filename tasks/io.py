"""Content-hashed, crash-safe file I/O: atomic writes, safetensors with sha256 sidecars, manifests.

Every artifact a stage hands to the next goes through here, so a killed run never leaves a
half-written file under its final name and a reader can prove it got the bytes the writer wrote.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # torch loads where tensors are read or written: hashing and JSON stay light
    import torch

__all__ = [
    "file_ok",
    "IntegrityError",
    "MANIFEST_NAME",
    "SIDECAR_SUFFIX",
    "sha256_bytes",
    "sha256_file",
    "fsync_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "storage_error",
    "load_safetensors_verified",
    "read_json_verified",
    "write_manifest",
    "read_manifest",
    "escaping_paths_problem",
    "verify_manifest",
    "temp_dir_beside",
    "building_dir",
    "TEMP_GLOB",
    "sweep_temporaries",
    "publish_dir",
    "swap_dir",
]

MANIFEST_NAME = "MANIFEST.json"
SIDECAR_SUFFIX = ".sha256"
_CHUNK = 1 << 20  # 1 MiB reads: hashing speed plateaus here, memory stays flat for multi-GB files


class IntegrityError(RuntimeError):
    """A file's content does not match the hash recorded for it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never loads the whole file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_ok(path: str | os.PathLike, sha: str) -> bool:
    """True if the file exists and its sha256 is `sha`."""
    return Path(path).is_file() and sha256_file(path) == sha


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    # Makes the rename itself durable; some filesystems/platforms cannot open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on clean exit fsync it and os.replace it onto `path`.

    If the body raises, the temp file is removed and `path` (old content or absent) is untouched.
    The temp file lives in the same directory so the final rename never crosses filesystems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        cause = storage_error(e, path)  # before the unlink frees the space it names
        tmp.unlink(missing_ok=True)
        if cause is not None:
            raise cause from e
        raise
    fsync_dir(path.parent)


def storage_error(e: BaseException, path: Path) -> OSError | None:
    """The filesystem error behind a writer's failure at `path`, as an OSError naming `path`; None
    if `e` is not one or already names its file. Writers report it three ways: Python's write()
    (an OSError without a file name), safetensors ("... (os error 28)"), and torch.save (a bare
    RuntimeError: the filesystem is then asked whether it is full)."""
    if isinstance(e, OSError):
        return None if e.filename or e.errno is None else OSError(e.errno, e.strerror, str(path))
    found = re.search(r"\(os error (\d+)\)", str(e))
    code = int(found[1]) if found else errno.ENOSPC if isinstance(e, RuntimeError) and _full(path.parent) else None
    return None if code is None else OSError(code, os.strerror(code), str(path))


def _full(folder: Path) -> bool:
    """Less than 1 MiB left on folder's filesystem (for its user: min of root's and others' room)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return min(st.f_bavail, st.f_bfree) * st.f_frsize < 2**20


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON (sorted keys, indent 2, trailing newline), so equal content hashes equal."""
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> str:
    """Atomically write `tensors` as safetensors plus `<path>.sha256`; return the file's sha256.

    Tensors are made contiguous (safetensors refuses strided views); the caller's are not modified.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"atomic_save_safetensors({path}): values must be torch.Tensor, not for keys {bad}")
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    # Written after the data file: a crash in between leaves a stale sidecar, which load rejects.
    atomic_write_bytes(_sidecar(path), (digest + "\n").encode("ascii"))
    return digest


def _expected_hash(path: Path, expected_sha256: str | None) -> str:
    if expected_sha256 is not None:
        return expected_sha256.strip().lower()
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise IntegrityError(
            f"{path}: no expected sha256 given and no sidecar {sidecar.name}; pass expected_sha256 "
            f"or write the file with atomic_save_safetensors"
        )
    return sidecar.read_text(encoding="ascii").strip().lower()


def load_safetensors_verified(
    path: str | os.PathLike, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU after checking its sha256 (explicit, else the sidecar)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    expected = _expected_hash(path, expected_sha256)
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{path}: sha256 mismatch, expected {expected}, actual {actual}")
    return load_file(str(path), device="cpu")


def read_json_verified(path: str | os.PathLike, expected_sha256: str) -> Any:
    """A JSON file's content after checking its bytes' sha256 (one read: what is checked is parsed)."""
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise IntegrityError(f"{path}: sha256 mismatch, expected {expected_sha256}, actual {actual}")
    return json.loads(data)


def _files_under(folder: Path) -> list[str]:
    # (relpath in posix form) for every regular file, sorted so manifests are deterministic.
    rels = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(r for r in rels if r != MANIFEST_NAME)


def write_manifest(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Write `folder/MANIFEST.json` = {"files": {relpath: sha256}} for every other file; return it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"write_manifest: {folder} is not a directory")
    manifest = {"files": {rel: sha256_file(folder / rel) for rel in _files_under(folder)}}
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create it with write_manifest({folder!s})")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path} is malformed: expected {{'files': {{relpath: sha256}}}}")
    problem = escaping_paths_problem(manifest["files"])
    if problem:
        raise IntegrityError(f"{path}: {problem}")
    return manifest


def _inside(rel: Any) -> bool:
    """A plain relative POSIX path that stays inside its folder (no '..', no root, no backslash)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel


def escaping_paths_problem(files: Any) -> str | None:
    """A MANIFEST `files` map may only name files inside its folder: a listed '../x' or '/etc/x'
    would make a verifier read (and report on) files outside the release."""
    if not isinstance(files, dict):
        return None
    bad = sorted(str(k) for k in files if not _inside(k))
    return f"files: paths outside the folder {bad}; not reading them" if bad else None


def verify_manifest(
    folder: str | os.PathLike, include: Callable[[str], bool] | None = None
) -> list[str]:
    """Relpaths listed in MANIFEST.json that are missing or whose sha256 differs (empty = intact).

    `include` restricts the check to some entries (e.g. skip multi-GB weights when only the
    tokenizer is read). Files present but not listed are not reported.
    """
    folder = Path(folder)
    bad = []
    for rel, digest in sorted(read_manifest(folder)["files"].items()):
        if include is not None and not include(rel):
            continue
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(rel)
    return bad


def temp_dir_beside(final: str | os.PathLike) -> Path:
    """A new empty folder next to `final` to build it in, named uniquely (.NAME.XXXXXXXX.tmp), so two
    writers never share one; swap_dir or a rename puts it in place. Leftovers of killed runs match
    TEMP_GLOB and sweep_temporaries removes them while the project lock is held."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


@contextmanager
def building_dir(final: str | os.PathLike) -> Iterator[Path]:
    """temp_dir_beside(final), removed if the body raises (a full disk, a library error), so a task
    that fails leaves no temporary; a killed one leaves it to sweep_temporaries."""
    tmp = temp_dir_beside(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TEMP_GLOB = ".*.tmp"  # what temp_dir_beside, atomic_path and swap_dir leave behind when killed


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary (TEMP_GLOB) under `folder`; only while no other writer can be active
    (the project lock held). Returns what was removed."""
    gone = sorted(Path(folder).rglob(TEMP_GLOB)) if Path(folder).is_dir() else []
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def publish_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make dst a copy of src (hard links where the filesystem allows, else copies), atomically:
    built beside dst, then renamed over it; an old dst is removed only once the new one is complete."""
    src, dst = Path(src), Path(dst)
    tmp = temp_dir_beside(dst)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = tmp / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    swap_dir(tmp, dst)


def _same_intact_folder(new: Path, dst: Path) -> bool:
    mine, theirs = new / MANIFEST_NAME, dst / MANIFEST_NAME
    try:
        return theirs.read_bytes() == mine.read_bytes() and not verify_manifest(dst)
    except (OSError, ValueError, KeyError):  # no manifest on either side, or one being replaced: swap
        return False


def swap_dir(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete folder `tmp` at `dst` by renames (same filesystem); an old `dst` is removed
    only once the new one is in place. An intact `dst` with tmp's MANIFEST.json, byte for byte, is
    kept and tmp dropped: another writer sharing the storage root (a sweep's parallel configs)
    published the same content, and a reader of theirs must not see it vanish between two renames."""
    tmp, dst = Path(tmp), Path(dst)
    if _same_intact_folder(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if dst.exists():
        old = temp_dir_beside(dst)  # unique: an empty folder the old dst is renamed over
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dst.parent)
