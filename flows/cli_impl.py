"""Command implementations behind flows/cli.py: validate everything, then do the work."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from quantlib.adapters import check_spec_fits, get_adapter
from quantlib.data import eval_windows, split_halves
from quantlib.engine import EngineConfig
from quantlib.spec import QuantSpec
from tasks.sources import load_model, load_tokenizer
from tasks.textdata import load_text, parse_text_source, tokenize_text

from . import commands as C

__all__ = ["dispatch", "resolve_device", "engine_config", "print_table"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(batch_size=args.batch_size, true_sequential=args.true_sequential,
                        device=resolve_device(args.device), spill_dir=args.spill_dir)


RECON_FLAGS = ("window", "overlap", "lookahead", "rounding", "rank", "iters", "loss", "lr", "clip_lr", "init", "grid", "cfp")


def recon_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in RECON_FLAGS if getattr(args, k, None) is not None}


QAT_FLAGS = {"qat_trainable": "trainable", "qat_loss": "loss", "qat_steps": "steps", "qat_lr": "lr",
             "qat_batch_size": "batch_size", "qat_heldout": "heldout", "qat_topk": "topk"}


def qat_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, f) for f, k in QAT_FLAGS.items() if getattr(args, f, None) is not None}


def _method_cfg(args: argparse.Namespace, method: str):
    return C.method_config(method, act_order=args.act_order, damp=args.damp, block_size=args.block_size,
                           clip_search=args.clip_search, recon=recon_overrides(args))


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    print(line(cols))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line([_fmt(r.get(c)) for c in cols]))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.3g}"
    return "" if v is None else str(v)


def cmd_quantize(args: argparse.Namespace) -> int:
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=args.sym)
    base, qat = C.method_qat(args.method, qat_overrides(args))
    method_cfg = _method_cfg(args, base)
    engine = engine_config(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "quantization.json").exists():
        raise ValueError(f"--out {out} exists and is not a ptq output folder; choose an empty or new folder")
    parse_text_source(args.calib)
    model_dir = C.cached_model(args.model, args.trust_remote_code)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    check_spec_fits(get_adapter(model), spec.group_size)
    data = C.protocol_data(tok, args.calib, None, n=args.n_samples, seqlen=args.seqlen, seed=args.seed,
                           mirror=args.mirror)
    fp_ppl = C.eval_ppl(model, data.windows, desc="fp32 perplexity") if args.eval else None
    t0 = time.perf_counter()
    teacher = C.qat_teacher(model, data.calib, qat)  # FP logits, before quantizing
    results, stats, _ = C.quantize_loaded(model, data.calib, spec, method_cfg, engine)
    if qat is not None:
        results, _ = C.refine_qat(model, data.calib, results, qat, teacher)
    seconds = time.perf_counter() - t0
    info = {"method": args.method, "spec": C.spec_dict(spec), "model": args.model, "calib": args.calib,
            "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": args.seed, "quant_seconds": seconds,
            "layer_errors": {f"{s.index}.{k}": v for s in stats for k, v in s.layer_errors.items()}}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    C.save_quantized(tmp, model, tok, results, info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    rows = [{"model": "quantized", "method": args.method, "scheme": spec.name, "seconds": seconds}]
    if args.eval:
        rows[0]["ppl"] = C.eval_ppl(model, data.windows, desc="quantized perplexity")
        rows.insert(0, {"model": "fp32", "method": "-", "scheme": "-", "ppl": fp_ppl})
    print_table(rows, ["model", "method", "scheme", "seconds", "ppl"])
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    source = parse_text_source(args.data)
    model_dir = C.cached_model(args.model)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    ids = tokenize_text(load_text(source, args.mirror), tok)
    if args.split == "second_half":
        ids = split_halves(ids)[1]
    stride = args.stride or args.window
    windows = eval_windows(ids, args.window, args.windows or None, stride)
    ppl = C.eval_ppl(model, windows, args.batch_size, score_from=args.window - stride)
    print_table([{"model": args.model, "data": args.data, "windows": windows.shape[0], "ppl": ppl}],
                ["model", "data", "windows", "ppl"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench import run_demo

    return run_demo()


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_quality
    from .bench_kernels import run_decode, run_kernels

    if args.bench == "kernels":
        rows = run_kernels(args.out)
    elif args.bench == "decode":
        rows = run_decode(args.out, model=args.model, scheme=args.scheme, new_tokens=args.new_tokens)
    else:
        return run_quality(args)
    print(json.dumps(rows, indent=1))
    return 0


def dispatch(args: argparse.Namespace) -> int:
    return {"quantize": cmd_quantize, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench, "run": cmd_run,
            "stage": cmd_stage, "lineage": cmd_lineage}[args.command](args)


def _pipeline_env(root: Path) -> None:
    """Project-local Prefect home and result cache, quiet logs; values the user set win."""
    import logging
    import os

    os.environ.setdefault("PREFECT_HOME", str(root / ".cache" / "prefect-home"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the leaf
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ptq").setLevel(logging.INFO)


def _load_pipeline(args: argparse.Namespace):
    from flows.params import load_params

    path = Path(args.params)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found; run from the project root or pass -p PATH")
    params = load_params(path, args.overrides)
    preflight(params)
    return path.resolve().parent, params


def preflight(params) -> None:
    """Everything checkable without loading a model, before any stage runs."""
    from tasks.sources import parse_model_source
    from tasks.textdata import parse_text_source

    from .pipeline import quantize_job

    try:
        parse_model_source(params.fetch_model.source)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"fetch_model.source: {e}") from None
    for key, spec in [("prepare_data.calib_source", params.prepare_data.calib_source),
                      *[("prepare_data.eval_sources", s) for s in params.prepare_data.eval_sources]]:
        try:
            parse_text_source(spec)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{key}: {e}") from None
    quantize_job(params)


def cmd_run(args: argparse.Namespace) -> int:
    _pipeline_env(Path(args.params).resolve().parent)  # before anything imports prefect
    root, params = _load_pipeline(args)
    from .pipeline import Project, pipeline_flow

    t0 = time.perf_counter()
    results = pipeline_flow(Project(root), params)
    _summary(results, time.perf_counter() - t0, root)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    _pipeline_env(Path(args.params).resolve().parent)
    root, params = _load_pipeline(args)
    from .pipeline import Project, run_stage

    r = run_stage(Project(root), params, args.name)
    print(f"{r.name}: {r.status} in {r.seconds:.1f} s")
    return 0


def _summary(results, seconds: float, root: Path) -> None:
    from . import stages as S

    print_table([{"stage": r.name, "status": r.status, "seconds": r.seconds} for r in results],
                ["stage", "status", "seconds"])
    reg = next((r.details for r in results if r.name == "register"), {})
    ev = next((r.details for r in results if r.name == "evaluate"), {})
    print(f"\ntotal {seconds:.0f} s; ppl {ev.get('ppl', float('nan')):.2f} (fp32 {ev.get('fp32_ppl', float('nan')):.2f})")
    print(f"release: {root / S.RELEASE}\nreport:  {root / S.REPORT / 'report.md'}")
    if reg:
        print(f"mlflow:  run {reg['run_id']} at {reg['tracking_uri']}; model {reg['model_uri']} (@{reg['alias']})")
        print(f"         browse with: mlflow ui --backend-store-uri {reg['tracking_uri']}")


def cmd_lineage(args: argparse.Namespace) -> int:
    from tasks.lineage import audit, format_audit

    import os

    root = Path(args.project).resolve()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and (root / "mlflow.db").is_file():
        uri = f"sqlite:///{root / 'mlflow.db'}"
    result = audit(args.ref, uri, root)
    print(format_audit(result))
    return 0 if result.ok else 1
