"""tasks.codeid: the code fingerprint, library versions and git state a release records."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.codeid import CODE_PACKAGES, LIBRARIES, code_identity, code_root, git_state, library_versions
from tasks.manifest import CODE_KEYS

REPO = Path(__file__).resolve().parents[2]
HAVE_GIT = shutil.which("git") is not None
needs_git = pytest.mark.skipif(not HAVE_GIT, reason="git not installed")


def _git(root: Path, *args: str) -> str:
    cmd = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def _project(root: Path) -> Path:
    """A committed project with the code packages, pyproject.toml and dvc.yaml (data/ not tracked)."""
    for pkg in CODE_PACKAGES:
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text(f'"""{pkg}"""\n')
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


# --------------------------------------------------------------------------------------- git


def test_git_state_outside_git(tmp_path):
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": False}


@needs_git
def test_only_code_changes_make_the_checkout_dirty(tmp_path):
    root = _project(tmp_path)
    head = _git(root, "rev-parse", "HEAD")
    assert git_state(root) == {"git_commit": head, "git_dirty": False}
    # pipeline outputs, dvc.lock, params and metrics change on every run: not code
    (root / "data" / "model").mkdir(parents=True)
    (root / "data" / "model" / "w.bin").write_bytes(b"w")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    (root / "params.yaml").write_text("quantize: {bits: 3}\n")
    (root / "tasks" / "__pycache__").mkdir()
    (root / "tasks" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"c")
    assert git_state(root)["git_dirty"] is False

    (root / "quantlib" / "__init__.py").write_text("x = 2\n")  # an edited module
    assert git_state(root)["git_dirty"] is True
    _git(root, "checkout", "-q", "--", "quantlib")
    (root / "tasks" / "new.py").write_text("y = 1\n")  # an untracked module
    assert git_state(root)["git_dirty"] is True
    (root / "tasks" / "new.py").unlink()
    (root / "dvc.yaml").write_text("stages: {a: {cmd: x}}\n")
    assert git_state(root)["git_dirty"] is True


@needs_git
def test_a_deleted_code_package_is_dirty(tmp_path):
    root = _project(tmp_path)
    shutil.rmtree(root / "flows")
    assert git_state(root)["git_dirty"] is True
    (root / "pyproject.toml").unlink()
    assert git_state(root)["git_dirty"] is True


@needs_git
def test_project_in_a_repository_subfolder(tmp_path):
    (tmp_path / "other.py").write_text("z = 1\n")
    root = tmp_path / "proj"
    root.mkdir()
    _project(root)  # its own repository: re-make it a subfolder of one at tmp_path
    shutil.rmtree(root / ".git")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "init")
    assert git_state(root)["git_dirty"] is False
    (tmp_path / "other.py").write_text("z = 2\n")  # outside the project
    assert git_state(root)["git_dirty"] is False
    (root / "tasks" / "__init__.py").write_text("t = 2\n")
    assert git_state(root)["git_dirty"] is True


# ----------------------------------------------------------------------------- fingerprint


def _fingerprint(packages: Path) -> str:
    """code_fingerprint() in a fresh interpreter that imports the packages under `packages`."""
    env = {**os.environ, "PYTHONPATH": str(packages)}
    code = "from tasks.codeid import code_fingerprint, _package_dir; import sys; " \
           "assert _package_dir('flows').parent == __import__('pathlib').Path(sys.argv[1]); print(code_fingerprint())"
    done = subprocess.run([sys.executable, "-c", code, str(packages)], cwd=packages, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_fingerprint_covers_every_python_file_of_the_code_packages(tmp_path):
    src = tmp_path / "src"
    for pkg in CODE_PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    base = _fingerprint(src)
    assert len(base) == 64 and _fingerprint(src) == base

    (src / "flows" / "notes.md").write_text("not code\n")  # not a .py file
    (src / "quantlib" / "__pycache__").mkdir(exist_ok=True)
    (src / "quantlib" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert _fingerprint(src) == base

    init = src / "flows" / "__init__.py"
    original = init.read_bytes()
    init.write_bytes(original + b"\n")  # one byte in one module
    assert _fingerprint(src) != base
    init.write_bytes(original)
    moved = sorted((src / "quantlib").glob("*.py"))[-1]
    moved.rename(moved.with_name("renamed_" + moved.name))  # same bytes, other name
    assert _fingerprint(src) != base


# --------------------------------------------------------------------------------- versions


def test_library_versions_read_package_metadata():
    versions = library_versions()
    assert set(versions) == {"python", *LIBRARIES}
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["mlflow"] == importlib.metadata.version("mlflow")
    assert all(isinstance(v, str) and v for v in versions.values())


def test_code_identity_has_the_manifest_code_keys(tmp_path):
    identity = code_identity(tmp_path)
    assert tuple(identity) == CODE_KEYS
    assert identity["versions"] == library_versions() and identity["git_commit"] is None


def test_code_identity_defaults_to_the_checkout_the_code_runs_from():
    assert (code_root() / "tasks" / "codeid.py").is_file()
    assert code_identity()["git_commit"] == git_state(code_root())["git_commit"]
    if HAVE_GIT and (REPO / ".git").exists() and code_root() == REPO:
        assert code_identity()["git_commit"] == _git(REPO, "rev-parse", "HEAD")
