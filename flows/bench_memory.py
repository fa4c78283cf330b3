"""Memory model: peak host memory and disk per stage, measured, and projected to large models.

    python -m flows.bench_memory [-S section.key=value ...]   # appends to docs/benchmarks/memory.json

Measured: each stage as `dvc repro` runs it (`ptq stage NAME`, one process) in a fresh clone, under
a small parent process that reports its child's peak RSS (getrusage RUSAGE_CHILDREN of a process
with that one child); disk is the growth of the storage root and of data/ over the stage.
Projected (docs/benchmarks/memory.md): the formulas of `project()` for one block (or window) on
the device and activations streamed from disk, for Llama-3-8B and Llama-3-70B at 128 x 2048.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["measure", "project", "render_memory_md"]

DEFAULT_OUT = "docs/benchmarks/memory.json"
_PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr); sys.exit(rc)")

# (hidden d, intermediate f, layers L, vocab V, q heads, kv heads, tied embeddings)
MODELS = {"SmolLM2-135M": (576, 1536, 30, 49152, 9, 3, True),
          "Llama-3-8B": (4096, 14336, 32, 128256, 32, 8, False),
          "Llama-3-70B": (8192, 28672, 80, 128256, 64, 8, False)}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure(project: Path, stages: list[str]) -> list[dict]:
    """Peak RSS (MiB) and disk growth (MiB) of each stage run as its own process."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rows = []
    for name in stages:
        before = {"cache": _du(project / ".cache" / "ptq"), "data": _du(project / "data")}
        done = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "flows.cli", "stage", name],
                              cwd=project, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ptq stage {name} failed:\n{done.stderr[-4000:]}")
        peak = int(done.stderr.strip().splitlines()[-1])
        rows.append({"stage": name, "peak_rss_mib": peak,
                     "cache_growth_mib": round((_du(project / ".cache" / "ptq") - before["cache"]) / 2**20, 1),
                     "data_growth_mib": round((_du(project / "data") - before["data"]) / 2**20, 1)})
        print(rows[-1], file=sys.stderr)
    return rows


def project(model: str, n: int = 128, t: int = 2048, w_bytes: int = 2, a_bytes: int = 4, window: int = 2) -> dict:
    """GiB of device memory, host memory and disk for GPTQ/BoA (one block on the device) and for
    recon (a window of `window` blocks), activations streamed from disk in batches of 8 sequences.

    block params   P_b = 2 d^2 (q, o) + 2 d kv hd (k, v) + 3 d f (gated MLP)
    shard          S   = n t d a_bytes                       (one block boundary's activations)
    device, GPTQ   = P_b w_bytes (block) + 4 max_in^2 (the largest Hessian, fp32) + 2 * 8 t d 4 (a batch in/out)
    device, recon  = window P_b (4 + 4 + 8) (fp32 weights, grads, Adam: an upper bound, LoRA rounding trains
                     far fewer) + autograd of a batch (~12 batch-sized tensors per block)
    host           = skeleton (embeddings + head: V d w_bytes, x2 if untied) + one block + a batch in flight
    disk           = model (P w_bytes) + (L + 1) S for GPTQ/BoA: the cache keeps the captured inputs and every
                     block's output shard (what makes a killed run resume at its block); recon adds the L FP
                     target shards: (2 L + 1) S
    """
    d, f, layers, vocab, q, kv, tied = MODELS[model]
    head_dim = d // q
    attn = d * d * 2 + 2 * d * kv * head_dim  # q, o: d x d; k, v: d x kv*hd
    block = attn + 3 * d * f
    total = layers * block + vocab * d * (1 if tied else 2)
    shard = n * t * d * a_bytes
    batch = 8 * t * d * 4
    gib = 2**30
    hess = 4 * max(d, f) ** 2
    return {
        "model": model, "n": n, "seqlen": t, "weight_bytes": w_bytes, "act_bytes": a_bytes,
        "params_b": round(total / 1e9, 2), "block_params_m": round(block / 1e6, 1),
        "shard_gib": round(shard / gib, 2),
        "device_gptq_gib": round((block * w_bytes + hess + 2 * batch) / gib, 2),
        "device_recon_gib": round((window * block * 16 + 12 * batch * window) / gib, 2),
        "host_gib": round((vocab * d * w_bytes * (1 if tied else 2) + block * 4 + 2 * batch) / gib, 2),
        "disk_gptq_gib": round((total * w_bytes + (layers + 1) * shard) / gib, 1),
        "disk_recon_gib": round((total * w_bytes + (2 * layers + 1) * shard) / gib, 1),
    }


def render_memory_md(rows: list[dict]) -> str:
    lines = ["# Memory model", "",
             "Measured: each stage of the default pipeline as `dvc repro` runs it (one process per stage), on",
             "this 2-core CPU, in a fresh clone. Made by `python -m flows.bench_memory` (docs/benchmarks/memory.json).",
             ""]
    for r in rows:
        lines += [f"## {r['date']}, commit {(r['git_commit'] or '-')[:10]}: {r['settings']}", "",
                  "| stage | peak RSS (MiB) | storage root growth (MiB) | data/ growth (MiB) |", "|---|---:|---:|---:|"]
        lines += [f"| {s['stage']} | {s['peak_rss_mib']} | {s['cache_growth_mib']} | {s['data_growth_mib']} |"
                  for s in r["stages"]]
        lines.append("")
    lines += ["## Projection: one block (or window) on the device, activations streamed from disk", "",
              "From `flows.bench_memory.project` (its docstring has the formulas): bf16 weights read from disk,",
              "fp32 activation shards (`fetch_model.dtype: bfloat16` halves the shard and disk columns), 128",
              "calibration sequences of 2048 tokens, recon windows of 2 blocks. GiB.", "",
              "| model | params (B) | one shard | device GPTQ/BoA | device recon | host | disk GPTQ/BoA | disk recon |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in MODELS:
        p = project(name)
        lines.append(f"| {name} | {p['params_b']} | {p['shard_gib']} | {p['device_gptq_gib']} | "
                     f"{p['device_recon_gib']} | {p['host_gib']} | {p['disk_gptq_gib']} | {p['disk_recon_gib']} |")
    lines += ["", "Host memory is the skeleton (embeddings and head) plus one block: the tasks never load the whole",
              "model (tasks/partial.py). With `quantize.spill_to_disk: true` a block's input shard is streamed in",
              "batches instead of held in memory (add one shard to host memory otherwise). Disk is dominated by",
              "activation shards, kept in the storage root so that a killed run resumes at its block; recon also",
              "keeps the FP output of every block boundary as targets. Deleting a finished run's `acts/` costs only",
              "resumability (the codes are in `blocks/`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from tasks.codeid import code_root, git_state

    from .bench_orchestration import _clone

    ap = argparse.ArgumentParser(prog="python -m flows.bench_memory")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    root = code_root()
    commit = git_state(root)["git_commit"]  # the code the clone measures (the checkout may move on meanwhile)
    tmp = Path(tempfile.mkdtemp(prefix="ptq-bench-mem-"))
    _clone(root, tmp)
    if args.overrides:
        from .params import dump_params, load_params

        (tmp / "params.yaml").write_text(dump_params(load_params(tmp / "params.yaml", args.overrides)))
    from .stages import STAGES

    stages = measure(tmp, [s.name for s in STAGES if s.name != "register"])
    record = {"command": " ".join(["python -m flows.bench_memory", *[f"-S {o}" for o in args.overrides]]),
              "git_commit": commit, "date": dt.date.today().isoformat(),
              "settings": ", ".join(args.overrides) or "defaults (SmolLM2-135M, GPTQ W4 g64, 128 x 512, fp32)",
              "stages": stages}
    path = Path(args.out)
    rows = (json.loads(path.read_text()) if path.is_file() else []) + [record]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    path.with_suffix(".md").write_text(render_memory_md(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
