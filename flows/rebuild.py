"""`ptq lineage REF --rebuild`: re-make a release from its own record and compare it byte for byte.

The release MANIFEST records the git commit of the code that made it, the params of every stage
that made it and the content hashes of its inputs. A rebuild checks that commit out into a
temporary project (a clone of the checkout ptq runs from), writes the recorded params, runs the
pipeline through `pack` with an empty cache, and compares every file of the new release with the
recorded one, MANIFEST.json included. On CPU the pipeline is deterministic, so any difference is a
real discrepancy: different code, inputs or libraries than the record claims. The temporary
project is removed afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["compare_releases", "rebuild"]


def compare_releases(recorded: Path, rebuilt: Path) -> list[str]:
    """Relative paths that differ between two release folders (missing on either side or other bytes)."""
    def files(folder: Path) -> dict[str, Path]:
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}

    a, b = files(recorded), files(rebuilt)
    return sorted(rel for rel in a.keys() | b.keys()
                  if rel not in a or rel not in b or a[rel].read_bytes() != b[rel].read_bytes())


def _checkout(commit: str, into: Path) -> None:
    from tasks.codeid import code_root

    root = code_root()
    for args in (["clone", "-q", "--no-checkout", str(root), str(into)], ["-C", str(into), "checkout", "-q", commit]):
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"rebuild: cannot check out commit {commit} from {root}: {done.stderr.strip()}; "
                               f"rebuild from a clone of the repository that holds it")


def _run_pipeline(project: Path, manifest: dict) -> None:
    import yaml

    # verbatim: the recorded commit's own loader validates them (today's schema may have other keys)
    (project / "params.yaml").write_text(yaml.safe_dump(manifest["params"], sort_keys=False), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    env.pop("PREFECT_HOME", None)  # the temporary project's own
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--to", "pack"], cwd=project, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"rebuild: the pipeline failed in the temporary project:\n{done.stderr[-4000:]}")


def rebuild(ref: str, tracking_uri: str | None) -> int:
    """Rebuild release `ref` (folder or models:/ URI) from its record; 0 if byte-identical, else 1."""
    from tasks.lineage import resolve_release
    from tasks.manifest import read_release_manifest

    with tempfile.TemporaryDirectory(prefix="ptq-rebuild-") as tmp:
        recorded = resolve_release(ref, tracking_uri, dst_dir=Path(tmp) / "download")
        manifest = read_release_manifest(recorded)
        code = manifest["code"]
        if code["git_commit"] is None or code["git_dirty"]:
            print(f"rebuild: {ref} was made from {'a dirty checkout' if code['git_dirty'] else 'code outside git'}; "
                  f"only a release made from a clean commit can be rebuilt exactly", file=sys.stderr)
            return 1
        project = Path(tmp) / "project"
        _checkout(code["git_commit"], project)
        print(f"rebuild: commit {code['git_commit'][:12]} in {project}, stages inputs..pack", file=sys.stderr)
        _run_pipeline(project, manifest)
        diff = compare_releases(recorded, project / "data" / "release")
    for rel in diff:
        print(f"REBUILD MISMATCH  {rel}")
    print("rebuild OK: every file is byte-identical" if not diff else f"rebuild FAILED: {len(diff)} files differ")
    return 0 if not diff else 1
