"""`ptq sweep` on the sequential runner against a local 2-worker Dask cluster, same grid, each in a
fresh clone with a cold storage root (DESIGN protocol on the default model; QAT off so the rows are
the plain methods):

    python -m flows.bench_sweep            # appends to docs/benchmarks/sweep_runners.json

Reports the wall time of each sweep and every config's perplexity (which must be identical across
runners: the runner changes no output).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run", "collect", "render_md"]

DEFAULT_OUT = "docs/benchmarks/sweep_runners.json"
AXES = ["-S", "quantize.method=rtn,gptq", "-S", "scheme=w4pc,w3g64", "-S", "qat.enabled=false"]
RUNNERS = (("sequential", []), ("dask", ["-S", "orchestration.runner=dask", "-S", "orchestration.workers=2"]))


def _sweep(project: Path, extra: list[str]) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", *AXES, *extra, "--name", "bench"],
                          cwd=project, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptq sweep failed in {project}:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def collect(results: dict[str, tuple[Path, float]], command: str, git_commit: str | None, steps=None) -> dict:
    """One record from {runner: (its sweeps/NAME/results.json, wall seconds)}."""
    runs = {}
    for runner, (path, seconds) in results.items():
        rows = json.loads(Path(path).read_text())["rows"]
        runs[runner] = {"wall_s": round(seconds, 1),
                        "ppl": {f"{r['method']} {r['scheme']}": r["ppl"] for r in rows},
                        "config_s": {f"{r['method']} {r['scheme']}": r["seconds"] for r in rows}}
    record = {"command": command, "git_commit": git_commit, "date": dt.date.today().isoformat(),
              "load_avg_1m": round(os.getloadavg()[0], 2), "runs": runs}
    if steps:
        record["steps"] = steps
    return record


def run(out: str = DEFAULT_OUT) -> dict:
    from tasks.codeid import code_root, git_state

    from .bench_orchestration import _clone

    root = code_root()
    results = {}
    for runner, extra in RUNNERS:
        project = Path(tempfile.mkdtemp(prefix=f"ptq-bench-sweep-{runner}-"))
        _clone(root, project)
        seconds = _sweep(project, extra)
        results[runner] = (project / "sweeps" / "bench" / "results.json", seconds)
    record = collect(results, "python -m flows.bench_sweep", git_state(root)["git_commit"])
    append(record, out)
    return record


def append(record: dict, out: str = DEFAULT_OUT) -> None:
    path = Path(out)
    rows = (json.loads(path.read_text()) if path.is_file() else []) + [record]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    path.with_suffix(".md").write_text(render_md(rows))


def render_md(rows: list[dict]) -> str:
    lines = ["# ptq sweep: sequential runner vs a 2-worker local Dask cluster", "",
             "`ptq sweep -S quantize.method=rtn,gptq -S scheme=w4pc,w3g64 -S qat.enabled=false` on SmolLM2-135M",
             "(DESIGN protocol: 128 x 512 calibration, WikiText-2 second half, 16 windows of 1024), this 2-core CPU,",
             "each runner in a fresh clone with a cold storage root. Made by `python -m flows.bench_sweep`",
             "(docs/benchmarks/sweep_runners.json); a record with `steps` was run by hand with those commands.", ""]
    for r in rows:
        seq, par = r["runs"]["sequential"], r["runs"]["dask"]
        lines += [f"## {r['date']}, commit {(r['git_commit'] or '-')[:10]}", "",
                  f"Wall time: sequential {seq['wall_s']} s, Dask (2 workers) {par['wall_s']} s: "
                  f"ratio {par['wall_s'] / seq['wall_s']:.2f}. Seconds per config are its stages' time; on Dask the "
                  "configs overlap.", "", *[f"- {step}" for step in r.get("steps", [])], *([""] if r.get("steps") else []),
                  *([f"Conditions: {r['note']}", ""] if r.get("note") else []),
                  "| config | ppl sequential | ppl dask | identical | seconds sequential | seconds dask |",
                  "|---|---:|---:|---|---:|---:|"]
        for k, v in seq["ppl"].items():
            lines.append(f"| {k} | {v:.4f} | {par['ppl'][k]:.4f} | {'yes' if v == par['ppl'][k] else 'NO'} | "
                         f"{seq['config_s'][k]} | {par['config_s'][k]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.bench_sweep")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    print(render_md([run(args.out)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
