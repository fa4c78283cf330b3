"""What orchestration costs: the default pipeline's full `ptq run`, a no-op `ptq run` after it, and a
no-op `dvc repro`, each a fresh process in a fresh clone of this checkout (the way a user runs them).

    ptq bench orchestration            # appends to docs/benchmarks/orchestration.json

Records hold the command, the git commit, the load average and the date (a benchmark record, not a
pipeline output); docs/benchmarks/orchestration.md is regenerated from them.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_orchestration", "render_orchestration_md"]

DEFAULT_OUT = "docs/benchmarks/orchestration.json"
STEPS = (("full ptq run", ["-m", "flows.cli", "run"]), ("no-op ptq run", ["-m", "flows.cli", "run"]),
         ("no-op dvc repro", ["-m", "dvc", "repro"]))


def _clone(root: Path, dest: Path) -> None:
    """The checkout's files (tracked and untracked-not-ignored) at dest, committed: a fresh clone."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (root / rel).is_file() and not rel.startswith(("metrics/", "dvc.lock")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    ident = ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], [*ident, "commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)


def _timed(project: Path, argv: list[str]) -> tuple[float, str]:
    # this Python first on PATH: dvc.yaml's stages run `python -m flows.cli stage NAME`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed in {project}:\n{done.stderr[-4000:]}")
    return seconds, done.stdout + done.stderr


def run_orchestration(out: str = DEFAULT_OUT, keep: str | None = None) -> list[dict]:
    """Time the three steps in a fresh clone (kept at `keep` if given); append one record."""
    from tasks.codeid import code_root, git_state

    root = code_root()
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="ptq-bench-orch-"))
    try:
        _clone(root, tmp)
        seconds = {name: round(_timed(tmp, argv)[0], 1) for name, argv in STEPS}
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    record = {"command": "ptq bench orchestration", "git_commit": git_state(root)["git_commit"],
              "load_avg_1m": round(os.getloadavg()[0], 2), "date": dt.date.today().isoformat(), "seconds": seconds}
    path = Path(out)
    rows = (json.loads(path.read_text()) if path.is_file() else []) + [record]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    path.with_suffix(".md").write_text(render_orchestration_md(rows))
    return [record]


def render_orchestration_md(rows: list[dict]) -> str:
    lines = ["# Orchestration cost", "",
             "Default pipeline (SmolLM2-135M, GPTQ W4 g64, fp32, this 2-core CPU), each step a fresh process in a",
             "fresh clone. Made by `ptq bench orchestration` (docs/benchmarks/orchestration.json).", "",
             "| date | commit | full ptq run (s) | no-op ptq run (s) | no-op dvc repro (s) | load (1 min) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:  # a record made by hand (its `steps` say how) may lack a step or list several runs
        cells = [_cell(r["seconds"].get(name)) for name, _ in STEPS]
        lines.append(f"| {r['date']} | {(r['git_commit'] or '-')[:10]} | {' | '.join(cells)} | {r['load_avg_1m']} |")
    lines += ["", "A no-op `ptq run` re-runs only the `inputs` stage (it hashes the model source and the texts) and",
              "starts no Prefect server: its time is process start, imports, the params check and DVC's status of",
              "the 8 stages (a fully cached run took 47 s before the stages were driven by DVC's status). A row",
              "whose JSON record has `steps` was run by hand with those commands."]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "-" if value is None else str(value)
