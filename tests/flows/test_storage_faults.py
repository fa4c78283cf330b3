"""A full disk and a read-only folder, made by the kernel (a size-limited tmpfs and a read-only bind
mount in a private mount namespace, `unshare -rm`), under real `ptq run` subprocesses:

1. the storage root (.cache/ptq) is a tmpfs half the size a run needs: the run stops with ENOSPC;
2. the tmpfs is grown (what it holds is kept) and data/ is bound read-only: the run stops with EROFS;
3. data/ is writable again: the run resumes and releases the clean run's bytes, one version registered.

Each failed run exits 74 naming the file and the fix, and leaves no temporary behind.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pipeline_projects import release_files

SCRIPT = """
set -u
mkdir -p .cache/ptq data
mount -t tmpfs -o size={size_k}k tmpfs .cache/ptq || exit 90
{ptq} run > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc
find . -name '*.tmp' -o -name '.ptq-tmp*' > {out}/full.tmps
mount -o remount,size=4g .cache/ptq
mount --bind data data && mount -o remount,bind,ro data || exit 91
{ptq} run > {out}/ro.out 2> {out}/ro.err; echo $? > {out}/ro.rc
umount data
{ptq} run > {out}/ok.out 2> {out}/ok.err; echo $? > {out}/ok.rc
"""


def _namespaces_work() -> bool:
    probe = "mkdir -p /tmp/.ptq-ns-probe && mount -t tmpfs -o size=64k tmpfs /tmp/.ptq-ns-probe"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


def _du_k(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) // 1024


@pytest.fixture(scope="module")
def faulted(make_project, clean_project, tmp_path_factory):
    if not _namespaces_work():
        pytest.skip("needs `unshare -rm` with tmpfs mounts (user and mount namespaces)")
    project = make_project("storage-faults")
    out = tmp_path_factory.mktemp("storage-faults-out")
    need_k = _du_k(clean_project.root / ".cache" / "ptq")
    ptq = " ".join(project.command())
    done = subprocess.run(["unshare", "-rm", "sh", "-c", SCRIPT.format(size_k=need_k // 2, ptq=ptq, out=out)],
                          cwd=project.root, env=dict(project.env), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    read = {p.name: p.read_text() for p in out.iterdir()}
    return project, read


@pytest.mark.reliability(
    fault='the storage root fills up mid-run (a tmpfs at half the size the run needs)',
    sees='exit 74: `No space left on device writing <file>: free space there (df -h <folder>), or move the '
         'storage root (orchestration.storage) ...; then rerun the same command`',
    kept='every finished stage and block; no temporary file; nothing registered')
def test_a_full_disk_names_the_file_and_the_fix_and_leaves_no_temporary(faulted):
    project, read = faulted
    assert read["full.rc"].strip() == "74", read["full.err"][-3000:]
    err = read["full.err"]
    assert "No space left on device writing " + str(project.root / ".cache" / "ptq") in err, err[-3000:]
    assert "orchestration.storage" in err and "rerun the same command" in err
    assert err.strip().splitlines()[-1].startswith("ptq run: error: No space left on device writing ")  # last word
    assert read["full.tmps"].strip() == ""  # the half-written shard folder was removed


@pytest.mark.reliability(
    fault='a read-only output folder (data/ bound read-only)',
    sees='exit 74: `Read-only file system writing <file>: make <folder> writable, or run in a writable copy '
         'of the project; then rerun the same command`',
    kept='the storage root: no stage recomputes what the full-disk run finished')
def test_a_read_only_output_folder_names_the_folder(faulted):
    project, read = faulted
    assert read["ro.rc"].strip() == "74", read["ro.err"][-3000:]
    err = read["ro.err"]
    assert "Read-only file system writing " + str(project.root / "data") in err, err[-3000:]
    assert f"make {project.root / 'data'}" in err


def test_once_the_cause_is_gone_the_run_resumes_to_the_clean_release_and_one_version(faulted, clean_project):
    project, read = faulted
    assert read["ok.rc"].strip() == "0", read["ok.err"][-3000:]
    assert "fetch_model: up to date" in read["ok.err"]  # finished before the disk filled, not redone
    assert release_files(project.release) == release_files(clean_project.release)  # MANIFEST included
    registry = json.loads((project.root / "metrics" / "registry.json").read_text())
    assert int(registry["version"]) == 1, registry  # the failed runs registered nothing
