"""The pipeline: one Prefect flow per DVC stage, and a parent flow that runs them in order.

Flows only wire tasks: resolve paths from flows/stages.py, call tasks (cached by content hash in
.cache/ptq, outside every DVC out), verify what a cache hit points to, and publish results into
the stage's out folder. `ptq stage NAME` runs one flow (what dvc.yaml calls); `ptq run` runs all.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger

from . import stages as S
from .params import PipelineParams

__all__ = ["Project", "StageResult", "STAGE_FLOWS", "run_stage", "pipeline_flow", "run_cached"]

log = logging.getLogger("ptq")


@dataclass(frozen=True)
class Project:
    """Where the pipeline reads and writes: root holds dvc.yaml, params.yaml, data/ and .cache/."""

    root: Path

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def cache(self) -> Path:
        from tasks.cache import CACHE_DIR

        return self.root / CACHE_DIR

    @property
    def results(self) -> Path:
        return self.cache / "prefect-results"


@dataclass
class StageResult:
    name: str
    status: str  # "run" | "cached"
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def run_cached(project: Project, task: Any, verify: Callable[[dict], bool], label: str, **kwargs) -> tuple[dict, bool]:
    """Call a cached task; if a cache hit points at missing or corrupted files, say so and recompute."""
    t = task.with_options(result_storage=project.results, persist_result=True)
    state = t(return_state=True, **kwargs)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not verify(result):
        log.warning("%s: cache entry points at missing or corrupted files; recomputing", label)
        state = t.with_options(refresh_cache=True)(return_state=True, **kwargs)
        result, cached = state.result(), False
    log.info("%s: %s", label, "cached" if cached else "computed")
    return result, cached


def _record(project: Project, result: StageResult) -> StageResult:
    from tasks.io import atomic_write_json

    atomic_write_json(project.cache / "stages" / f"{result.name}.json", result.__dict__)
    return result


def _stage(name: str):
    """Decorator: a Prefect flow for stage `name` that times itself and records its StageResult."""

    def wrap(fn):
        @flow(name=name, validate_parameters=False, log_prints=False)
        def stage_flow(project: Project, params: PipelineParams) -> StageResult:
            t0 = time.perf_counter()
            status, details = fn(project, params)
            return _record(project, StageResult(name, status, time.perf_counter() - t0, details))

        return stage_flow

    return wrap


@_stage("fetch_model")
def fetch_model_flow(project: Project, params: PipelineParams):
    from tasks.inputs import fetch_model_task, source_fingerprint
    from tasks.io import atomic_write_json, publish_dir, verify_manifest
    from tasks.sources import parse_model_source

    p = params.fetch_model
    record, cached = run_cached(
        project, fetch_model_task, lambda r: Path(r["path"]).is_dir() and not verify_manifest(r["path"]),
        "fetch_model", spec=p.source, trust_remote_code=p.trust_remote_code,
        fingerprint=source_fingerprint(parse_model_source(p.source)), cache_dir=str(project.cache))
    out = project.path(S.MODEL)
    publish_dir(record["path"], out)
    atomic_write_json(out / "source.json", {k: v for k, v in record.items() if k not in ("path", "out_dir", "manifest")})
    return ("cached" if cached else "run"), {"model_sha": record["manifest_sha"]}


def _tokens_ok(r: dict) -> bool:
    from tasks.io import sha256_file

    folder = Path(r["path"])
    files = [r["tokens"]["calib"]] + list(r["tokens"]["eval"].values())
    return all((folder / f["file"]).is_file() and sha256_file(folder / f["file"]) == f["sha256"] for f in files)


@_stage("prepare_data")
def prepare_data_flow(project: Project, params: PipelineParams):
    from tasks.inputs import manifest_sha, prepare_data_task, text_fingerprint
    from tasks.io import publish_dir

    p = params.prepare_data
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.__dict__.items()}
    sources = [p.calib_source, *p.eval_sources]
    text_shas = {s: text_fingerprint(s, p.mirror) for s in dict.fromkeys(sources)}
    model_dir = project.path(S.MODEL)
    record, cached = run_cached(project, prepare_data_task, _tokens_ok, "prepare_data",
                                model_dir=str(model_dir), model_sha=manifest_sha(model_dir), settings=settings,
                                text_shas=text_shas, cache_dir=str(project.cache))
    publish_dir(record["path"], project.path(S.TOKENS))
    return ("cached" if cached else "run"), {"calib_sha": record["tokens"]["calib"]["sha256"]}


def quantize_job(params: PipelineParams):
    """Frozen quantlib configs from the quantize section."""
    from quantlib.engine import EngineConfig
    from quantlib.spec import QuantSpec
    from tasks.quantize import QuantizeJob

    from .commands import method_config
    from .cli_impl import resolve_device

    q = params.quantize
    method = q.resolved_method
    recon = params.recon.__dict__ if method == "recon" else None
    return QuantizeJob(
        spec=QuantSpec(bits=q.bits, group_size=q.group_size, sym=q.sym),
        method=method_config(method, act_order=q.act_order, damp=q.damp, block_size=q.block_size,
                             clip_search=q.clip_search, recon=recon),
        engine=EngineConfig(batch_size=q.batch_size, true_sequential=q.true_sequential,
                            device=resolve_device(q.device), measure_block_error=True),
        stream_from_disk=q.spill_to_disk,
    )


def _tokens(project: Project) -> tuple[Path, dict]:
    folder = project.path(S.TOKENS)
    return folder, json.loads((folder / "tokens.json").read_text())


def _block_ok(r: dict) -> bool:
    from tasks.io import file_ok
    from tasks.shards import shard_ok

    return file_ok(r["qweights"], r["qweights_sha"]) and shard_ok(Path(r["out"]), r["out_sha"])


@_stage("quantize")
def quantize_flow(project: Project, params: PipelineParams):
    from quantlib.adapters import check_spec_fits, get_adapter
    from tasks.inputs import manifest_sha
    from tasks.quantize import capture_activations
    from tasks.shards import shard_ok
    from tasks.sources import load_model

    job = quantize_job(params)
    model_dir = project.path(S.MODEL)
    tokens_dir, tokens = _tokens(project)
    model = load_model(model_dir)
    adapter = get_adapter(model)
    check_spec_fits(adapter, job.spec.group_size)
    common = dict(model=model, model_sha=manifest_sha(model_dir), calib_path=str(tokens_dir / "calib.safetensors"),
                  calib_sha=tokens["calib"]["sha256"], cache_dir=str(project.cache))
    cap, cap_cached = run_cached(project, capture_activations, lambda r: shard_ok(Path(r["path"]), r["sha"]),
                                 "capture_activations", batch_size=job.engine.batch_size, **common)
    if params.quantize.resolved_method == "recon":
        blocks, all_cached, windows = _quantize_windows(project, job, len(adapter.blocks), cap, common)
    else:
        blocks, windows = _quantize_blocks(project, job, len(adapter.blocks), cap, common), []
        all_cached = all(b["cached"] for b in blocks)
    _write_quantized(project, job, blocks, windows, common)
    return ("cached" if cap_cached and all_cached else "run"), {
        "blocks": len(blocks), "computed": sum(not b["cached"] for b in blocks)}


def _quantize_blocks(project: Project, job, n: int, cap: dict, common: dict) -> list[dict]:
    """One cached task per block, each fed by the previous block's output shard."""
    from tqdm import tqdm

    from tasks.quantize import quantize_block_task

    prev, records = (cap["path"], cap["sha"]), []
    for i in tqdm(range(n), desc="quantize", unit="block"):
        rec, cached = run_cached(project, quantize_block_task, _block_ok, f"block {i}",
                                 index=i, in_path=prev[0], in_sha=prev[1], job=job, **common)
        st = rec["stats"]
        records.append({"block": i, "cached": cached, "names": rec["names"], "qweights": rec["qweights"],
                        "qweights_sha": rec["qweights_sha"], "seconds": st["seconds"], "peak_mb": st["peak_mb"],
                        "layer_errors": st["layer_errors"], "before": None, "block_error": st["block_error"]})
        prev = (rec["out"], rec["out_sha"])
    return records


def _quantize_windows(project: Project, job, n: int, cap: dict, common: dict) -> tuple[list[dict], bool, list[dict]]:
    """Cross-block reconstruction: FP targets once, then one cached task per window; a window's
    key covers its input shard, target shard and the carried state of the blocks it shares with the
    previous window, so a killed run resumes at the window it was in."""
    from tqdm import tqdm

    from tasks.quantize import fp_targets_task, recon_window_task, window_ok
    from tasks.shards import shard_ok

    cfg = job.method
    fp, fp_cached = run_cached(project, fp_targets_task, lambda r: all(shard_ok(Path(b["path"]), b["sha"]) for b in r["bounds"]),
                               "fp_targets", in_path=cap["path"], in_sha=cap["sha"], job=job, **common)
    windows = cfg.windows(n)
    prev, carry, blocks, stats, all_cached = (cap["path"], cap["sha"]), None, [], [], fp_cached
    for w, (start, end) in enumerate(tqdm(windows, desc="reconstruct", unit="window")):
        nxt = windows[w + 1][0] if w + 1 < len(windows) else n
        target = fp["bounds"][min(end + cfg.lookahead, n) - 1] if cfg.target == "fp" else None
        rec, cached = run_cached(project, recon_window_task, window_ok, f"window {w} blocks [{start}, {end})",
                                 window=(start, end), next_start=nxt, in_path=prev[0], in_sha=prev[1], target=target,
                                 carry=carry, job=job, **common)
        st = rec["stats"]
        stats.append({"window": w, "cached": cached, **st})
        share = {"cached": cached, "seconds": st["seconds"] / max(nxt - start, 1), "peak_mb": st["peak_mb"],
                 "layer_errors": {}, "names": [], "qweights": None, "qweights_sha": None}
        finished = [dict(share, block=e["block"], before=e["before"], block_error=e["after"]) for e in st["block_errors"]]
        # the window's one codes file holds every block it finished: attach it to the first of them
        finished[0] |= {k: rec[k] for k in ("names", "qweights", "qweights_sha")}
        blocks += finished
        all_cached &= cached
        prev, carry = (rec["out"], rec["out_sha"]), rec["carry"]
    return blocks, all_cached, stats


def _write_quantized(project: Project, job, blocks: list[dict], windows: list[dict], common: dict) -> None:
    from tasks.cache import plain
    from tasks.io import atomic_save_safetensors, atomic_write_json, fresh_dir
    from tasks.quantize import load_block_weights

    out = project.path(S.QUANTIZED)
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    tensors, modules = {}, []
    for b in blocks:
        if b["qweights"] is not None:
            for name, qw in load_block_weights(b).items():
                tensors.update(qw.state_dict(name))
            modules += b["names"]
    sha = atomic_save_safetensors(tmp / "quantized.safetensors", tensors)
    keep = ("block", "cached", "seconds", "peak_mb", "layer_errors", "before", "block_error")
    atomic_write_json(tmp / "quantize.json", {
        "job": plain(job), "scheme": job.spec.name, "method": type(job.method).__name__, "modules": modules,
        "model_sha": common["model_sha"], "calib_sha": common["calib_sha"], "quantized_sha256": sha,
        "quant_seconds": sum(b["seconds"] for b in blocks if not b["cached"]),
        "blocks": [{k: b[k] for k in keep} for b in blocks], "windows": windows})
    _swap(tmp, out)
    atomic_write_json(project.path(S.BLOCK_ERRORS),
                      [{"block": b["block"], "before": b["before"], "after": b["block_error"]} for b in blocks])


def _swap(tmp: Path, out: Path) -> None:
    import shutil

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


@_stage("qat")
def qat_flow(project: Project, params: PipelineParams):
    """Global QAT refinement of the quantized model on the calibration sequences; while disabled,
    the quantized state passes through unchanged."""
    from tasks.inputs import manifest_sha
    from tasks.io import atomic_save_safetensors, atomic_write_json, file_ok, fresh_dir, load_safetensors_verified, publish_dir
    from tasks.qat import qat_teacher_task, qat_train_task

    q = params.qat
    if not q.active(params.quantize.bits):
        publish_dir(project.path(S.QUANTIZED), project.path(S.QAT))
        return "run", {"enabled": False}
    cfg = qat_config(params)
    qdir, model_dir = project.path(S.QUANTIZED), project.path(S.MODEL)
    info = json.loads((qdir / "quantize.json").read_text())
    tokens_dir, tokens = _tokens(project)
    common = dict(model_dir=str(model_dir), model_sha=manifest_sha(model_dir), calib_path=str(tokens_dir / "calib.safetensors"),
                  calib_sha=tokens["calib"]["sha256"], cache_dir=str(project.cache))
    teacher, c1 = (None, True) if not cfg.needs_teacher else run_cached(
        project, qat_teacher_task, lambda r: file_ok(r["path"], r["sha"]), "qat teacher", topk=cfg.topk, **common)
    rec, c2 = run_cached(project, qat_train_task, lambda r: file_ok(r["path"], r["sha"]), "qat",
                         quantized_path=str(qdir / "quantized.safetensors"), quantized_sha=info["quantized_sha256"],
                         names=info["modules"], teacher=teacher, cfg=cfg, checkpoint_every=q.checkpoint_every, **common)
    st = rec["stats"]
    if st["kept_init"]:
        log.warning("qat: no step beat the initial held-out loss %.4g; keeping the quantized input", st["init_heldout"])
    out = project.path(S.QAT)
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    sha = atomic_save_safetensors(tmp / "quantized.safetensors", load_safetensors_verified(rec["path"], rec["sha"]))
    atomic_write_json(tmp / "quantize.json", info | {
        "quantized_sha256": sha, "quant_seconds": info["quant_seconds"] + (0.0 if c2 else st["seconds"]),
        "qat": st | {"config": cfg.__dict__, "resumed_at": rec["resumed_at"]}})
    _swap(tmp, out)
    return ("cached" if c1 and c2 else "run"), {"init_heldout": st["init_heldout"], "best_heldout": st["best_heldout"],
                                                "kept_init": st["kept_init"]}


def qat_config(params: PipelineParams):
    """The quantlib QATConfig from the qat section."""
    from quantlib.qat import QATConfig

    q = params.qat
    return QATConfig(trainable=q.trainable, loss=q.loss, kl_weight=q.kl_weight, topk=q.topk, steps=q.steps, lr=q.lr,
                     batch_size=q.batch_size, grad_accum=q.grad_accum, schedule=q.schedule, heldout=q.heldout,
                     eval_every=q.eval_every, patience=q.patience, grad_checkpoint=q.grad_checkpoint, seed=q.seed)


@_stage("pack")
def pack_flow(project: Project, params: PipelineParams):
    from quantlib.qweight import QuantizedWeight
    from tasks.io import fresh_dir, load_safetensors_verified
    from tasks.release import write_release_files
    from tasks.tracking import build_release_manifest, collect_code_lineage, collect_release_inputs

    from .params import flatten, params_to_dict

    qdir = project.path(S.QAT)
    info = json.loads((qdir / "quantize.json").read_text())
    tensors = load_safetensors_verified(qdir / "quantized.safetensors", info["quantized_sha256"])
    qweights = {n: QuantizedWeight.from_state_dict(tensors, n) for n in info["modules"]}
    out = project.path(S.RELEASE)
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    write_release_files(tmp, project.path(S.MODEL), qweights,
                        {"scheme": info["scheme"], "method": info["method"], "job": info["job"]}, fmt=params.pack.format)
    stages = {n: {"status": r["status"], "seconds": r["seconds"]} for n, r in _stage_records(project).items()
              if n in ("fetch_model", "prepare_data", "quantize", "qat")}
    build_release_manifest(
        tmp, collect_release_inputs(project.path(S.MODEL), project.path(S.TOKENS), flatten(params_to_dict(params))),
        collect_code_lineage(project.root) | {"stages": stages})
    _swap(tmp, out)
    return "run", {}


def _stage_records(project: Project) -> dict[str, dict]:
    folder = project.cache / "stages"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _eval_files(project: Project) -> tuple[dict, str]:
    from tasks.cache import stable_hash

    folder, tokens = _tokens(project)
    files = {name: [str(folder / e["file"]), e["sha256"]] for name, e in tokens["eval"].items()}
    return files, stable_hash(files and {k: v[1] for k, v in files.items()})


@_stage("evaluate")
def evaluate_flow(project: Project, params: PipelineParams):
    from tasks.cache import stable_hash
    from tasks.evaluation import lm_eval_task, ppl_task, prepare_local_tasks
    from tasks.inputs import manifest_sha
    from tasks.io import atomic_write_json, fresh_dir
    from tasks.report import write_report
    from tasks.textdata import load_text, parse_text_source, resolve_mirror

    e = params.evaluate
    release, model_dir = project.path(S.RELEASE), project.path(S.MODEL)
    files, files_sha = _eval_files(project)
    # the release's content (not its MANIFEST, which also records stage timings) identifies it
    release_sha = stable_hash(json.loads((release / "MANIFEST.json").read_text())["files"])
    model_sha = manifest_sha(model_dir)
    common = dict(eval_files=files, eval_files_sha=files_sha, batch_size=e.batch_size)
    ppl, c1 = run_cached(project, ppl_task, lambda r: True, "perplexity (release)",
                         kind="release", folder=str(release), model_sha=release_sha, **common)
    fp, c2 = run_cached(project, ppl_task, lambda r: True, "perplexity (fp source)",
                        kind="model", folder=str(model_dir), model_sha=model_sha, **common)
    lm, c3 = {}, True
    if e.lm_eval_tasks:
        text = load_text(parse_text_source(params.prepare_data.eval_sources[0]), resolve_mirror(params.prepare_data.mirror))
        include, tasks_sha = prepare_local_tasks(project.cache / "lm_eval_tasks", text, list(e.lm_eval_tasks))
        lm, c3 = run_cached(project, lm_eval_task, lambda r: True, "lm_eval", folder=str(release), model_sha=release_sha,
                            tasks=list(e.lm_eval_tasks), include_path=str(include) if include else None,
                            tasks_sha=tasks_sha, limit=e.lm_eval_limit, batch_size=e.batch_size)
    info = json.loads((project.path(S.QAT) / "quantize.json").read_text())
    label = f"{info['method'].removesuffix('Config').lower()}{'+qat' if info.get('qat') else ''} {info['scheme']}"
    metrics = {"ppl": ppl, "fp32_ppl": fp, "lm_eval": lm, "scheme": info["scheme"], "method": label,
               "quant_seconds": info["quant_seconds"]}
    atomic_write_json(project.path(S.METRICS), metrics)
    first = next(iter(ppl))
    atomic_write_json(project.path(S.PPL), [{"model": "fp32", "ppl": fp[first]}, {"model": label, "ppl": ppl[first]}])
    history = _history(project, model_sha, label, ppl[first])
    report = fresh_dir(project.path(S.REPORT))
    blocks = json.loads(project.path(S.BLOCK_ERRORS).read_text())
    write_report(report, title=f"{params.fetch_model.source} {label}",
                 metrics={"ppl": ppl[first], "fp32 ppl": fp[first], "quant seconds": info["quant_seconds"], **lm},
                 block_errors=[{"block": b["block"], "before": b.get("before"), "after": b["after"]} for b in blocks
                               if b["after"] is not None],
                 history=[h for h in history if h["label"] != label], fp32_ppl=fp[first])
    return ("cached" if c1 and c2 and c3 else "run"), {"ppl": ppl[first], "fp32_ppl": fp[first]}


def _history(project: Project, model_sha: str, label: str, ppl: float) -> list[dict]:
    """Perplexities of every configuration evaluated on this source model here (latest per label)."""
    from tasks.io import atomic_write_json

    path = project.cache / "history" / f"{model_sha[:16]}.json"
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[label] = ppl
    atomic_write_json(path, runs)
    return [{"label": k, "ppl": v} for k, v in runs.items()]


@_stage("register")
def register_flow(project: Project, params: PipelineParams):
    """One MLflow parent run with a nested run per stage; the release registered and aliased."""
    from tasks.io import atomic_write_json, sha256_file
    from tasks.tracking import Tracker, collect_code_lineage, lineage_tags, register_release, release_model_name

    from .params import flatten, params_to_dict

    r = params.register
    tracker = Tracker(r.resolved_tracking_uri(project.root), r.experiment)
    release = project.path(S.RELEASE)
    metrics = json.loads(project.path(S.METRICS).read_text())
    manifest = json.loads((release / "MANIFEST.json").read_text())
    flat = flatten(params_to_dict(params))
    tags = lineage_tags(collect_code_lineage(project.root),
                        source_model_sha256=manifest["inputs"]["model_manifest_sha256"],
                        calib_sha256=manifest["inputs"]["calib_sha256"], params_sha256=manifest["inputs"]["params_sha256"],
                        release_manifest_sha256=sha256_file(release / "MANIFEST.json"))
    parent = tracker.start_run(f"ptq {metrics['method']}", tags=tags)
    tracker.log_params(parent, flat)
    tracker.log_metrics(parent, _numeric(metrics))
    _log_stages(tracker, project, parent)
    tracker.log_artifact(parent, project.path(S.REPORT), "report")
    tracker.log_artifact(parent, release / "MANIFEST.json", "release")
    name = r.model_name or release_model_name(params.fetch_model.source, metrics["scheme"])
    name, version = register_release(tracker, parent, release, name, r.alias)
    tracker.end_run(parent)
    record = {"model_name": name, "version": version, "alias": r.alias, "run_id": parent,
              "tracking_uri": tracker.tracking_uri, "model_uri": f"models:/{name}/{version}"}
    atomic_write_json(project.path(S.REGISTRY), record)
    return "run", record


def _numeric(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _numeric(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _log_stages(tracker, project: Project, parent: str) -> None:
    for name, rec in _stage_records(project).items():
        if name == "register":
            continue
        run = tracker.start_stage_run(parent, name, rec["status"])
        tracker.log_metrics(run, {"seconds": rec["seconds"]})
        if name == "quantize":
            info = json.loads((project.path(S.QUANTIZED) / "quantize.json").read_text())
            errs = [b["block_error"] for b in info["blocks"] if b["block_error"] is not None]
            if errs:
                tracker.log_step_metric(run, "block_error", errs)
            tracker.log_metrics(run, {"peak_mb": max(b["peak_mb"] for b in info["blocks"]),
                                      "quant_seconds": info["quant_seconds"]})
            for w in info.get("windows", []):  # per-window reconstruction loss curves
                if w["curve"]:
                    tracker.log_step_metric(run, f"recon_loss_window_{w['window']:03d}", w["curve"])
            if info.get("windows"):
                tracker.log_step_metric(run, "recon_loss_final", [w["loss_final"] for w in info["windows"]])
        if name == "qat":
            info = json.loads((project.path(S.QAT) / "quantize.json").read_text())
            if info.get("qat"):
                q = info["qat"]
                tracker.log_step_metric(run, "qat_loss", q["curve"])
                for step, loss in q["heldout_curve"]:
                    tracker.log_metrics(run, {"qat_heldout_loss": loss}, step=step)
        tracker.end_run(run)


STAGE_FLOWS = {"fetch_model": fetch_model_flow, "prepare_data": prepare_data_flow, "quantize": quantize_flow,
               "qat": qat_flow, "pack": pack_flow, "evaluate": evaluate_flow, "register": register_flow}


def run_stage(project: Project, params: PipelineParams, name: str) -> StageResult:
    if name not in STAGE_FLOWS:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_FLOWS)}")
    return STAGE_FLOWS[name](project, params)


@flow(name="ptq-pipeline", validate_parameters=False)
def pipeline_flow(project: Project, params: PipelineParams) -> list[StageResult]:
    return [STAGE_FLOWS[s.name](project, params) for s in S.STAGES]
