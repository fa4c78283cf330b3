"""The pipeline commands behind flows/cli.py: `ptq run`, `ptq stage NAME`, `ptq lineage REF`.

Light at import: torch, Prefect and MLflow load only when a stage that needs them runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .table import print_table

__all__ = ["dispatch"]


def _pipeline_env(root: Path) -> None:
    """Project-local Prefect home, quiet logs; values the user set win."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".cache" / "prefect-home"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the leaf
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ptq").setLevel(logging.INFO)


def _write_overrides(args: argparse.Namespace, params) -> None:
    """Write the -S overrides into params.yaml (as `dvc exp run -S` does), so that DVC, dvc.lock and
    later runs see the values this run used."""
    if args.overrides:
        from tasks.io import atomic_write_bytes

        from .params import dump_params

        atomic_write_bytes(Path(args.params), dump_params(params).encode("utf-8"))
        print(f"params.yaml: {', '.join(args.overrides)} written", file=sys.stderr)


def _checked_params(args: argparse.Namespace) -> tuple[bytes, Any]:
    """(params.yaml's bytes, params with the -S overrides), validated and preflighted; writes nothing."""
    from .params import load_params

    path = Path(args.params)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found; run from the project root or pass -p PATH")
    text = path.read_bytes()
    params = load_params(path, args.overrides)
    preflight(params)
    return text, params


def preflight(params) -> None:
    """Everything checkable without loading a model, before any stage runs."""
    from tasks.specs import parse_model_source
    from tasks.textdata import parse_calibration_source, parse_text_source

    from .methods import method_config

    try:
        source = parse_model_source(params.fetch_model.source)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"fetch_model.source: {e}") from None
    if source.kind == "hf" and source.revision is None:
        print(f"warning: fetch_model.source {source.spec!r} names no revision: the Hub may serve other files "
              f"tomorrow, so a rerun (or `ptq lineage --rebuild`) may not find the same model; pin one with "
              f"{source.spec}@<commit sha>", file=sys.stderr)
    for key, spec, parse in [("prepare_data.calib_source", params.prepare_data.calib_source, parse_calibration_source),
                             *[("prepare_data.eval_sources", s, parse_text_source) for s in params.prepare_data.eval_sources]]:
        try:
            parse(spec)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{key}: {e}") from None
    q = params.quantize
    method_config(q.resolved_method, act_order=q.act_order, damp=q.resolved_damp, block_size=q.block_size,
                  clip_search=q.clip_search, recon=params.recon.__dict__ if q.resolved_method == "recon" else None)
    from quantlib.spec import parse_scheme

    if source.kind == "local":
        if q.group_size is not None:
            _check_group_size(source.path / "config.json", q.group_size)
        for scheme in q.mixed_from:
            if (group_size := parse_scheme(scheme).group_size) is not None:
                _check_group_size(source.path / "config.json", group_size, f"quantize.mixed_from: {scheme}: group size")
    if source.kind == "local" and params.pack.format == "gguf":  # other sources: the pack stage refuses
        _check_gguf(source.path / "config.json")


def _check_gguf(config_path: Path) -> None:
    import json

    from tasks.specs import gguf_refusal

    if (why := gguf_refusal(json.loads(config_path.read_text(encoding="utf-8")))) is not None:
        raise ValueError(why)


def _check_group_size(config_path: Path, group_size: int, key: str = "quantize.group_size:") -> None:
    """A group size that does not divide a Linear's input size, refused from config.json alone (no
    torch import: this runs before every `ptq run`); sources without a local config are checked at
    the start of the quantize stage, on the model's shapes, before any block is quantized."""
    import json

    c = json.loads(config_path.read_text(encoding="utf-8"))
    c = c.get("text_config", c)
    hidden = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    heads = c.get("num_attention_heads") or c.get("n_head")
    inner = c.get("intermediate_size") or c.get("ffn_dim") or c.get("n_inner") or (4 * hidden if c.get("n_embd") else None)
    sizes = {"hidden_size (q/k/v, gate/up inputs)": hidden, "intermediate size (down_proj input)": inner}
    if heads and c.get("head_dim"):
        sizes["num_attention_heads * head_dim (o_proj input)"] = heads * c["head_dim"]
    for what, n in sizes.items():
        if isinstance(n, int) and n % group_size:
            raise ValueError(f"{key} {group_size} does not divide the model's {what} {n}; choose a "
                             f"divisor of every Linear's input size (e.g. 32 or 64) or null (per output channel)")


def _locked(command):
    """Run `command(args, params)` holding the project lock (waiting for it unless --no-wait), after
    removing the temporaries killed runs left behind (no other writer can be active then)."""
    def run(args: argparse.Namespace) -> int:
        from tasks.io import sweep_temporaries

        from .lock import project_lock
        from .runner import CACHE_DIR

        root = Path(args.params).resolve().parent
        text, params = _checked_params(args)  # bad input fails before anything (the lock file included) is made
        with project_lock(root, wait=not args.no_wait):
            if Path(args.params).read_bytes() != text:  # another run wrote params.yaml while this one waited
                text, params = _checked_params(args)
            # a storage root outside the project may be shared with other projects' running writers
            for folder in (root / CACHE_DIR, root / "data"):
                for p in sweep_temporaries(folder):
                    print(f"removed {p.relative_to(root)} (left by a killed run)", file=sys.stderr)
            return command(args, params)

    return run


def cmd_run(args: argparse.Namespace, params) -> int:
    root = Path(args.params).resolve().parent
    _pipeline_env(root)  # before anything imports prefect
    from . import stages as S

    if args.to is not None:
        S.get_stage(args.to)  # an unknown stage fails before any work
    _write_overrides(args, params)
    from .runner import run_pipeline

    t0 = time.perf_counter()
    outcomes = run_pipeline(root, params, to=args.to)
    _summary(outcomes, time.perf_counter() - t0, root)
    return 0


def cmd_stage(args: argparse.Namespace, params) -> int:
    """One stage, as `dvc repro` runs it: DVC decides whether it runs and records it afterwards."""
    root = Path(args.params).resolve().parent
    _pipeline_env(root)
    from . import stages as S

    missing = S.missing_inputs(root, args.name)
    if missing:  # before params are written or MLflow is opened
        first = missing[0][1]
        raise FileNotFoundError(
            f"stage {args.name} needs {', '.join(d for d, _ in missing)}, made by stage(s) "
            f"{', '.join(dict.fromkeys(m for _, m in missing))}; run `ptq stage {first}` first, or `ptq run --to "
            f"{args.name}` (or `dvc repro {args.name}`) to run every stage it needs")
    _write_overrides(args, params)
    from tasks.mlflow_runs import close_run

    from .runner import open_tracking, run_one_stage

    tracking = open_tracking(root, params)
    r = run_one_stage(root, params, args.name, tracking)
    if args.name == S.STAGES[-1].name:
        close_run(tracking.tracker, tracking.parent_run_id)
    print(f"{r.name}: ran in {r.seconds:.1f} s", file=sys.stderr)
    return 0


def _summary(outcomes, seconds: float, root: Path) -> None:
    import json

    from . import stages as S

    print_table([{"stage": o.name, "status": o.status, "seconds": o.seconds} for o in outcomes],
                ["stage", "status", "seconds"])
    metrics, registry = root / S.METRICS, root / S.REGISTRY
    print(f"\ntotal {seconds:.1f} s")
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        first = S.primary_source(m)
        print(f"{m['method']} {m['scheme']}: ppl {m['ppl'][first]:.2f} (fp32 {m['fp32_ppl'][first]:.2f}) on {first}")
    print(f"release: {root / S.RELEASE}\nreport:  {root / S.REPORT / 'report.md'}")
    if registry.is_file():
        reg = json.loads(registry.read_text())
        print(f"mlflow:  model {reg['model_uri']} (alias {reg['alias']}: {'moved' if reg['alias_moved'] else 'not moved'})"
              f"\n         browse with: mlflow ui --backend-store-uri {reg['tracking_uri']}")


def cmd_lineage(args: argparse.Namespace) -> int:
    from tasks.lineage import audit, format_audit

    root = Path(args.project).resolve()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and (root / "mlflow.db").is_file():
        uri = f"sqlite:///{root / 'mlflow.db'}"
    result = audit(args.ref, uri, workspace=root if args.workspace else None)
    print(format_audit(result))
    if not result.ok or not args.rebuild:
        return 0 if result.ok else 1
    from .rebuild import rebuild

    return rebuild(args.ref, uri)


def cmd_sweep(args: argparse.Namespace, params) -> int:
    """`ptq sweep`: every config of the grid validated first, then run (see flows/sweep.py)."""
    root = Path(args.params).resolve().parent
    _pipeline_env(root)
    from .sweep import expand_grid, parse_grid, render_table, run_sweep, split_orchestration

    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        raise ValueError(f"--name {args.name!r}: use letters, digits, '.', '_' or '-' (it names sweeps/NAME/)")
    params, grid = split_orchestration(params, parse_grid(args.grid, args.axes))
    for config in expand_grid(params, grid, params.orchestration.storage_root(root)):
        preflight(config.params)
    record = run_sweep(root, params, grid, args.name)
    print(render_table(record))
    print(f"sweep {args.name}: {len(record['rows'])} configs; results in sweeps/{args.name}/", file=sys.stderr)
    return 0


def dispatch(args: argparse.Namespace) -> int:
    return {"run": _locked(cmd_run), "stage": _locked(cmd_stage), "lineage": cmd_lineage,
            "sweep": _locked(cmd_sweep)}[args.command](args)
