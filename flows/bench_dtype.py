"""bf16 against fp32 end to end: the same `ptq run` (GPTQ W4 per-channel, the protocol's calibration
and evaluation) in two fresh clones of this checkout, one with fetch_model.dtype float32 and one with
bfloat16; perplexity per evaluation text, wall time and the peak resident memory of the run (the
largest of its processes, from wait4).

    python -m flows.bench_dtype            # appends to docs/benchmarks/dtype.json, regenerates dtype.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_orchestration import _clone

__all__ = ["run_dtype", "render_dtype_md"]

DEFAULT_OUT = "docs/benchmarks/dtype.json"
SETTINGS = ("quantize.method=gptq", "quantize.bits=4", "quantize.group_size=null")


def _run(project: Path, dtype: str, extra: tuple[str, ...] = ()) -> dict:
    """One `ptq run` with `dtype` (and `extra` -S settings): {seconds, peak_rss_mib, ppl, fp_ppl}."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = [sys.executable, "-m", "flows.cli", "run", *(a for s in (*SETTINGS, *extra, f"fetch_model.dtype={dtype}")
                                                         for a in ("-S", s))]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss (KiB): the largest of the run and its waited children
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"ptq run ({dtype}) failed in {project}:\n{err[-4000:]}")
    metrics = json.loads((project / "metrics" / "metrics.json").read_text())
    return {"dtype": dtype, "seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "ppl": metrics["ppl"], "fp_ppl": metrics["fp32_ppl"]}


def run_dtype(out: str = DEFAULT_OUT, dtypes: tuple[str, ...] = ("float32", "bfloat16"),
              extra: tuple[str, ...] = ()) -> list[dict]:
    from tasks.codeid import code_root, git_state

    root = code_root()
    rows = []
    for dtype in dtypes:
        tmp = Path(tempfile.mkdtemp(prefix=f"ptq-bench-{dtype}-"))
        try:
            _clone(root, tmp)
            load = os.getloadavg()[0]
            rows.append(_run(tmp, dtype, extra) | {"load_avg_1m": round(load, 2)})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    command = "python -m flows.bench_dtype" + "".join(f" -S {e}" for e in extra)
    record = {"command": command, "settings": [*SETTINGS, *extra],
              "git_commit": git_state(root)["git_commit"], "date": dt.date.today().isoformat(), "rows": rows}
    path = Path(out)
    records = (json.loads(path.read_text()) if path.is_file() else []) + [record]
    path.write_text(json.dumps(records, indent=1) + "\n")
    path.with_suffix(".md").write_text(render_dtype_md(records))
    return rows


def render_dtype_md(records: list[dict]) -> str:
    lines = ["# Compute dtype: bf16 against fp32, end to end", "",
             "SmolLM2-135M, `ptq run` with GPTQ W4 per-channel on the protocol's calibration (128 x 512) and",
             "evaluation windows unless the command line says otherwise (-S), `fetch_model.dtype` float32 or bfloat16 (capture, blocks, evaluation in that",
             "dtype; Hessians and solves in fp32), each in a fresh clone on this 2-core CPU. ppl = the release's",
             "perplexity, fp = the source model's, both computed in the row's dtype. Peak RSS = the largest",
             "resident set of the run's processes. Made by `python -m flows.bench_dtype` (docs/benchmarks/dtype.json).", ""]
    for rec in records:
        texts = list(rec["rows"][0]["ppl"])
        lines += [f"{rec['date']}, commit {rec['git_commit']}, `{rec.get('command', 'python -m flows.bench_dtype')}`:", "",
                  "| dtype | " + " | ".join(f"ppl {t} | fp {t}" for t in texts) + " | wall s | peak RSS MiB | load |",
                  "|---|" + "---:|---:|" * len(texts) + "---:|---:|---:|"]
        for r in rec["rows"]:
            cells = " | ".join(f"{r['ppl'][t]:.2f} | {r['fp_ppl'][t]:.2f}" for t in texts)
            lines.append(f"| {r['dtype']} | {cells} | {r['seconds']:.0f} | {r['peak_rss_mib']} | {r['load_avg_1m']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("-S", dest="extra", action="append", default=[], help="extra `ptq run -S` setting")
    args = ap.parse_args(argv)
    run_dtype(args.out, extra=tuple(args.extra))


if __name__ == "__main__":
    main()
