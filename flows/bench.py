"""`ptq bench quality` (DESIGN.md protocol, one subprocess per row for honest time and peak memory)
and `ptq demo`.

Rows are appended to docs/benchmarks/quality.json; docs/benchmarks/quality.md is regenerated from it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import quantlib
from quantlib.spec import parse_scheme
from tasks.io import atomic_write_bytes, atomic_write_json
from tasks.sources import load_model, load_tokenizer

from . import commands as C

__all__ = ["run_quality", "run_demo", "render_quality_md"]

CALIB = dict(n=128, seqlen=512, seed=0, window=1024, n_windows=16)


def _versions() -> dict:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"quantlib": quantlib.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git": commit or None, "threads": torch.get_num_threads()}


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _worker(job: dict) -> list[dict]:
    """One benchmark row in this process: load, (quantize,) evaluate. A `<method>+qat` job also
    evaluates the block-wise result before QAT and returns it as a `<method>` row first (its time is
    the block-wise quantization alone, without the FP teacher pass), so both come from one quantization."""
    model_dir = Path(job["model_dir"])
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    calib = CALIB | job["calib"]
    data = C.protocol_data(tok, "wikitext2", None, mirror=job.get("mirror"), **calib)
    seconds = 0.0
    settings = dict(calib, dtype="float32", device=job["device"])
    rows = []
    if job["method"] != "fp32":
        spec = parse_scheme(job["scheme"])
        base, qat = C.method_qat(job["method"], job["qat"])
        cfg = C.method_config(base, **job["solver"], recon=job["recon"])
        engine = C.EngineConfig(batch_size=job["batch_size"], true_sequential=job["true_sequential"], device=job["device"])
        t0 = time.perf_counter()
        teacher = C.qat_teacher(model, data.calib, qat)  # FP logits, before quantizing
        t_quant = time.perf_counter()
        results, _, _ = C.quantize_loaded(model, data.calib, spec, cfg, engine)
        settings |= {"method_config": cfg.__dict__, "true_sequential": job["true_sequential"], "batch_size": job["batch_size"]}
        if qat is not None:
            t_eval = time.perf_counter()
            rows.append({"method": base, "scheme": job["scheme"], "ppl": C.eval_ppl(model, data.windows),
                         "quant_seconds": round(t_eval - t_quant, 1), "peak_rss_mb": _rss_mb(), "settings": dict(settings)})
            t0 += time.perf_counter() - t_eval  # the evaluation is not quantization time
            results, qst = C.refine_qat(model, data.calib, results, qat, teacher)
            settings["qat"] = qat.__dict__ | {k: getattr(qst, k) for k in (
                "steps", "init_heldout", "best_heldout", "best_step", "kept_init", "stopped_early", "seconds")}
        seconds = time.perf_counter() - t0
    ppl = C.eval_ppl(model, data.windows)
    return rows + [{"method": job["method"], "scheme": job["scheme"], "ppl": ppl, "quant_seconds": round(seconds, 1),
                    "peak_rss_mb": _rss_mb(), "settings": settings}]


def _run_job(job: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        r = subprocess.run([sys.executable, "-m", "flows.bench", json.dumps(job), str(out)])
        if r.returncode != 0:
            raise RuntimeError(f"benchmark worker failed for {job['method']} {job['scheme']} (exit {r.returncode})")
        return json.loads(out.read_text())


def _jobs(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    from .cli_impl import resolve_device

    from .cli_impl import qat_overrides, recon_overrides

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    recon, qat = recon_overrides(args), qat_overrides(args)
    if args.n_samples < 1 or args.seqlen < 2:
        raise ValueError(f"--n-samples must be >= 1 and --seqlen >= 2, got {args.n_samples} and {args.seqlen}")
    for m in methods:  # unknown methods and bad settings fail before any work
        base, _ = C.method_qat(m, qat)
        C.method_config(base, recon=recon)
    for s in schemes:
        parse_scheme(s)
    base = {"model_dir": str(model_dir), "mirror": args.mirror, "device": resolve_device(args.device),
            "batch_size": args.batch_size, "true_sequential": args.true_sequential, "recon": recon, "qat": qat,
            "calib": {"n": args.n_samples, "seqlen": args.seqlen},
            "solver": {"act_order": args.act_order, "damp": args.damp, "block_size": args.block_size,
                       "clip_search": args.clip_search}}
    jobs = [dict(base, method="fp32", scheme="fp32")] if args.fp32 else []
    return jobs + [dict(base, method=m, scheme=s) for s in schemes for m in methods]


def run_quality(args: argparse.Namespace) -> int:
    from .cli_impl import print_table

    model_dir = C.cached_model(args.model)
    jobs = _jobs(args, model_dir)
    out = Path(args.out)
    command = "ptq " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    for job in jobs:
        new = [r | {"model": args.model, "versions": _versions(), "command": command,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")} for r in _run_job(job)]
        rows += new
        # re-read before appending: another bench may have added rows meanwhile
        records = (json.loads(out.read_text()) if out.exists() else []) + new
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, records)  # after every job: a killed bench keeps what finished
        atomic_write_bytes(out.with_suffix(".md"), render_quality_md(records).encode())
        for row in new:
            print(f"{row['method']:>6} {row['scheme']:>6}  ppl {row['ppl']:.2f}  {row['quant_seconds']:.0f} s", flush=True)
    print_table(rows, ["method", "scheme", "ppl", "quant_seconds", "peak_rss_mb"])
    return 0


def render_quality_md(records: list[dict]) -> str:
    """Latest record per (model, method, scheme, calibration size) as a markdown table, with the
    commands that made them."""
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r.get("model", "smollm2-135m"), r["method"], r["scheme"], _calib(r))] = r
    lines = ["# Quality benchmark", "",
             "DESIGN.md protocol: WikiText-2 test, calibration 128 x 512 from the first half (seed 0), ",
             "perplexity on the first 16 x 1024-token windows of the second half; fp32 on CPU. ",
             "Generated from quality.json by `ptq bench quality` (latest row per method and scheme).", "",
             "| model | method | scheme | ppl | quant s | threads | peak RSS MB | calib | date |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for (model, method, scheme, calib), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        lines.append(f"| {model} | {method} | {scheme} | {r['ppl']:.2f} | {r['quant_seconds']:.0f} | "
                     f"{r.get('versions', {}).get('threads', '')} | "
                     f"{r['peak_rss_mb']:.0f} | {calib} | {r['date'][:10]} |")
    lines += _settings_table([r for r in latest.values() if r["method"].startswith("recon") or "+qat" in r["method"]])
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in latest.values())]
    return "\n".join(lines) + "\n"


RECON_KEYS = ("window", "overlap", "lookahead", "rounding", "rank", "learn_clip", "loss", "init", "grid", "iters", "batch_size", "lr", "clip_lr")
QAT_KEYS = ("trainable", "loss", "steps", "lr", "batch_size", "heldout", "best_step", "kept_init")


def _calib(r: dict) -> str:
    return f"{r['settings'].get('n', CALIB['n'])}x{r['settings'].get('seqlen', CALIB['seqlen'])}"


def _settings_table(rows: list[dict]) -> list[str]:
    """Reconstruction / QAT rows with the settings that distinguish them (ablation view)."""
    if not rows:
        return []
    out = ["", "## Reconstruction and QAT settings", "",
           "| method | scheme | calib | ppl | quant s | reconstruction | qat |", "|---|---|---|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["scheme"], _calib(r), r["method"])):
        st = r["settings"]
        mc = st.get("method_config", {})
        recon = ", ".join(f"{k}={mc[k]}" for k in RECON_KEYS if k in mc) if "window" in mc else ""
        qat = ", ".join(f"{k}={st['qat'][k]}" for k in QAT_KEYS if k in st.get("qat", {}))
        out.append(f"| {r['method']} | {r['scheme']} | {_calib(r)} | {r['ppl']:.2f} | {r['quant_seconds']:.0f} | {recon} | {qat} |")
    return out


def run_demo() -> int:
    """The main job on the default model: `ptq run` with ./params.yaml (GPTQ W4 g64 by default),
    then round-to-nearest on the same model and windows for comparison."""
    from quantlib.rtn import RTNConfig
    from tasks.textdata import read_token_ids

    from . import stages as S
    from .cli import main as cli_main
    from .cli_impl import print_table

    if cli_main(["run", "-p", "params.yaml"]) != 0:
        return 1
    tokens = json.loads(Path(S.TOKENS, "tokens.json").read_text())
    first = next(iter(tokens["eval"].values()))
    windows = read_token_ids(Path(S.TOKENS) / first["file"], first["sha256"])["windows"]
    metrics = json.loads(Path(S.METRICS).read_text())
    model = load_model(S.MODEL)
    scheme = parse_scheme(metrics["scheme"])
    _, _, seconds = C.quantize_loaded(model, None, scheme, RTNConfig(), C.EngineConfig())
    rows = [{"method": "fp32", "scheme": "-", "ppl": next(iter(metrics["fp32_ppl"].values()))},
            {"method": "rtn", "scheme": scheme.name, "ppl": C.eval_ppl(model, windows, desc="rtn perplexity"),
             "quant_seconds": seconds},
            {"method": metrics["method"].split()[0], "scheme": scheme.name, "ppl": next(iter(metrics["ppl"].values())),
             "quant_seconds": metrics["quant_seconds"]}]
    print()
    print_table(rows, ["method", "scheme", "quant_seconds", "ppl"])
    return 0


if __name__ == "__main__":
    rows = _worker(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(rows))
