"""The stages: each reads only what flows/stages.py declares for it (through a StageContext) and
writes only its declared outputs; flows/runner.py runs them, in one process (`ptq run`) or one
process per stage (`dvc repro` calling `ptq stage NAME`).

Stages only wire tasks: call cached tasks (content-hash keys, results under .cache/ptq, outside
every DVC out), verify what a cache hit points to, and publish results into the stage's outputs.
The stages that call tasks are Prefect flows. Every output is a function of the declared inputs
only: no timing, date, host or cached/run flag is written to one (those go to the stage's metrics
file and to MLflow, which nothing downstream reads). Each stage returns its metrics for those.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import stages as S
from .context import StageContext

__all__ = ["STAGE_FUNCTIONS", "error_batches", "quantize_job", "qat_config", "release_label", "run_cached",
           "run_cached_many"]

log = logging.getLogger("ptq")


def run_cached(ctx: StageContext, task: Any, verify: Callable[[dict], bool], label: str, on: str = "cpu",
               **kwargs) -> tuple[dict, bool]:
    """Call a cached task; if a cache hit points at missing or corrupted files, say so and recompute.
    Results are small JSON records (paths + sha256), never pickles. `on`: the device it computes on
    (a cuda task asks a Dask/Ray worker for a GPU)."""
    return run_cached_many(ctx, task, verify, [(label, kwargs)], on)[0]


def run_cached_many(ctx: StageContext, task: Any, verify: Callable[[dict], bool], calls: list[tuple[str, dict]],
                    on: str = "cpu") -> list[tuple[dict, bool]]:
    """run_cached over independent calls (label, kwargs): on a parallel runner all are submitted
    before any is waited for; in order, one after the other, on the sequential one."""
    from .orchestration import gpu_resources

    t = task.with_options(result_storage=ctx.cache / "prefect-results", persist_result=True,
                          result_serializer="json")
    engine = ctx.engine()

    def launch(tk: Any, kwargs: dict) -> Any:
        if not engine.parallel:
            return tk(return_state=True, **kwargs)
        with gpu_resources(engine, on):
            return tk.submit(**kwargs)

    pending = [launch(t, kwargs) for _, kwargs in calls]
    out = []
    for (label, kwargs), p in zip(calls, pending):
        state = _final_state(p)
        result, cached = state.result(), state.name == "Cached"
        if cached and not verify(result):
            log.warning("%s: cache entry points at missing or corrupted files; recomputing", label)
            state = _final_state(launch(t.with_options(refresh_cache=True), kwargs))
            result, cached = state.result(), False
        log.info("%s: %s", label, "cached" if cached else "computed")
        out.append((result, cached))
    return out


def _final_state(pending: Any) -> Any:
    """The final State of a direct call (already one) or of a submitted task's future."""
    if hasattr(pending, "wait"):
        pending.wait()
        return pending.state
    return pending


_BODIES: dict[str, tuple[Callable[..., Any], tuple]] = {}  # token -> (stage function, its arguments)


def _flow_body(token: str) -> Any:
    """The body of every stage flow. A module-level function taking a token: Prefect serializes a
    flow (its function) and its parameters into the run context it sends to Dask/Ray workers, and
    the StageContext (MLflow client, closures) must stay in this process."""
    fn, args = _BODIES[token]
    return fn(*args)


def _prefect_flow(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the function as a Prefect flow on the task runner of ctx.engine(); Prefect is imported
    (and its API server started) only when tasks actually run, so light stages and up-to-date checks
    never pay for it."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(ctx: StageContext, *args: Any) -> Any:
            import uuid

            from prefect import flow

            from .orchestration import task_runner

            runner = task_runner(ctx.engine())  # where the flow's submitted tasks run
            options = {} if runner is None else {"task_runner": runner}
            token = uuid.uuid4().hex
            _BODIES[token] = (fn, (ctx, *args))
            try:
                return flow(name=name, validate_parameters=False, **options)(_flow_body)(token)
            finally:
                del _BODIES[token]

        return run

    return wrap


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _swap(tmp: Path, out: Path) -> None:
    from tasks.io import swap_dir

    swap_dir(tmp, out)


def _fresh_tmp(out: Path) -> Path:
    from tasks.io import temp_dir_beside

    return temp_dir_beside(out)


# ----------------------------------------------------------------------------------- inputs


def inputs_stage(ctx: StageContext) -> dict:
    """Content hashes of the model source and of every text source (they live outside the project,
    where DVC cannot hash them): the declared file that fetch_model and prepare_data depend on."""
    from tasks.fingerprints import source_fingerprint, text_fingerprint
    from tasks.io import atomic_write_json
    from tasks.specs import parse_model_source

    p, d = ctx.params.fetch_model, ctx.params.prepare_data
    texts = dict.fromkeys([d.calib_source, *d.eval_sources])
    atomic_write_json(ctx.path(S.INPUTS), {
        "model": {"source": p.source, "fingerprint": source_fingerprint(parse_model_source(p.source))},
        "texts": {spec: text_fingerprint(spec, d.mirror) for spec in texts}})
    return {}


# ------------------------------------------------------------------------ fetch and prepare


@_prefect_flow("fetch_model")
def fetch_model_stage(ctx: StageContext) -> dict:
    from tasks.inputs import fetch_model_task, rotate_model_task
    from tasks.io import atomic_write_json, publish_dir

    p = ctx.params.fetch_model
    fingerprint = _read_json(ctx.path(S.INPUTS))["model"]["fingerprint"]
    record, cached = run_cached(
        ctx, fetch_model_task, _folder_ok, "fetch_model",
        spec=p.source, trust_remote_code=p.trust_remote_code, fingerprint=fingerprint, cache_dir=str(ctx.cache))
    source = {k: v for k, v in record.items() if k not in ("path", "out_dir", "manifest", "manifest_sha")}
    folder, computed = record["path"], int(not cached)
    if p.rotate is not None:  # what every later stage reads is the rotated model
        _check_rotatable(folder, p)
        rotated, rot_cached = run_cached(ctx, rotate_model_task, _folder_ok, "rotate_model", model_dir=folder,
                                         model_sha=record["manifest_sha"], mode=p.rotate, seed=p.rotate_seed,
                                         cache_dir=str(ctx.cache), trust_remote_code=p.trust_remote_code)
        folder, computed = rotated["path"], computed + int(not rot_cached)
        source |= {"rotation": rotated["rotation"]}
    out = ctx.path(S.MODEL)
    publish_dir(folder, out)
    atomic_write_json(out / "source.json", source | {"source": p.source})
    return {"computed": computed}


def _folder_ok(r: dict) -> bool:
    """A cached model folder is whole and still the one its record names."""
    from tasks.inputs import manifest_sha
    from tasks.io import verify_manifest

    return Path(r["path"]).is_dir() and not verify_manifest(r["path"]) and manifest_sha(r["path"]) == r["manifest_sha"]


def _check_rotatable(folder: str, p: Any) -> None:
    """Refuse, before rotating, a family whose norms do not commute with a rotation (shapes only)."""
    from quantlib.adapters import UnsupportedModelError, get_adapter
    from quantlib.rotation import ROTATABLE, check_rotatable
    from tasks.partial import meta_model

    try:
        check_rotatable(get_adapter(meta_model(Path(folder), p.trust_remote_code)))
    except UnsupportedModelError:
        raise ValueError(f"fetch_model.rotate: {p.source} cannot be rotated: rotation supports the "
                         f"{', '.join(ROTATABLE)} families (RMSNorm decoders whose norms feed only Linears); set "
                         "fetch_model.rotate: null") from None


def _tokens_ok(r: dict) -> bool:
    from tasks.io import file_ok

    folder = Path(r["path"])
    files = [r["tokens"]["calib"]] + list(r["tokens"]["eval"].values())
    return all(file_ok(folder / f["file"], f["sha256"]) for f in files)


@_prefect_flow("prepare_data")
def prepare_data_stage(ctx: StageContext) -> dict:
    from tasks.inputs import manifest_sha, prepare_data_task
    from tasks.io import publish_dir

    settings = dict(ctx.params.declared()["prepare_data"])
    mirror = settings.pop("mirror")  # a folder: the texts it holds are keyed by content (inputs.json)
    model_dir = ctx.path(S.MODEL)
    record, cached = run_cached(ctx, prepare_data_task, _tokens_ok, "prepare_data", model_dir=str(model_dir),
                                model_sha=manifest_sha(model_dir), settings=settings, mirror=mirror,
                                text_shas=_read_json(ctx.path(S.INPUTS))["texts"], cache_dir=str(ctx.cache),
                                trust_remote_code=ctx.params.fetch_model.trust_remote_code)
    publish_dir(record["path"], ctx.path(S.TOKENS))
    return {"computed": int(not cached)}


# ----------------------------------------------------------------------------------- quantize


def quantize_job(quantize: Any, recon: Any, dtype: str = "float32"):
    """Frozen quantlib configs from the quantize and recon sections (params or their views) and the
    model's compute dtype (fetch_model.dtype)."""
    from quantlib.engine import EngineConfig
    from quantlib.spec import QuantSpec
    from tasks.quantize import QuantizeJob

    from .methods import method_config

    method = quantize.resolved_method
    return QuantizeJob(
        spec=QuantSpec(bits=quantize.bits, group_size=quantize.group_size, sym=quantize.sym),
        method=method_config(method, act_order=quantize.act_order, damp=quantize.resolved_damp,
                             block_size=quantize.block_size, clip_search=quantize.clip_search,
                             recon={f: getattr(recon, f) for f in _recon_keys()} if method == "recon" else None),
        engine=EngineConfig(batch_size=quantize.batch_size, true_sequential=quantize.true_sequential,
                            device=quantize.device, measure_block_error=True,  # resolved by each task
                            block_error_batches=error_batches(quantize.error_sequences, quantize.batch_size),
                            moe_min_tokens=quantize.moe_min_tokens,
                            act_inputs=quantize.activations if quantize.quantized_inputs else None),
        stream_from_disk=quantize.spill_to_disk,
        dtype=dtype,
    )


def error_batches(sequences: int | None, batch_size: int) -> int | None:
    """Input batches holding the first `sequences` calibration sequences (None: all)."""
    return None if sequences is None else -(-sequences // batch_size)


def _recon_keys() -> list[str]:
    from .params import section_keys

    return [k.split(".", 1)[1] for k in section_keys("recon")]


def _tokens(ctx: StageContext) -> tuple[Path, dict]:
    folder = ctx.path(S.TOKENS)
    return folder, _read_json(folder / "tokens.json")


def _block_ok(r: dict) -> bool:
    from tasks.io import file_ok
    from tasks.shards import shard_ok

    return file_ok(r["qweights"], r["qweights_sha"]) and shard_ok(Path(r["out"]), r["out_sha"])


@_prefect_flow("quantize")
def quantize_stage(ctx: StageContext) -> dict:
    from quantlib.adapters import check_spec_fits, get_adapter
    from quantlib.mixed import check_target
    from tasks.inputs import manifest_sha
    from tasks.io import file_ok
    from quantlib.mixed import plan_from_json
    from tasks.io import read_json_verified
    from tasks.quantize import capture_activations, mixed_plan_task
    from tasks.partial import meta_model
    from tasks.shards import shard_ok

    job = quantize_job(ctx.params.quantize, ctx.params.recon, ctx.params.fetch_model.dtype)
    model_dir = ctx.path(S.MODEL)
    tokens_dir, tokens = _tokens(ctx)
    trust = ctx.params.fetch_model.trust_remote_code
    adapter = get_adapter(meta_model(model_dir, trust))  # shapes only: the tasks load what they need
    mixed = mixed_config(ctx.params.quantize)
    check_spec_fits(adapter, job.spec.group_size)
    if mixed is not None:  # group sizes and a plan that fits, from shapes, before any task
        check_target(adapter, mixed, job.spec)
    common = dict(model_dir=str(model_dir), model_sha=manifest_sha(model_dir), trust_remote_code=trust,
                  calib_path=str(tokens_dir / "calib.safetensors"), calib_sha=tokens["calib"]["sha256"],
                  cache_dir=str(ctx.cache))
    plan = None
    if mixed is not None:  # every block task then gets each Linear's scheme from the plan
        plan, plan_cached = run_cached(ctx, mixed_plan_task, lambda r: file_ok(r["path"], r["sha"]), "mixed_plan",
                                       on=job.engine.device, cfg=mixed, default=job.spec, dtype=job.dtype,
                                       device=job.engine.device, **common)
        plan = {"sha": plan["sha"], "data": read_json_verified(plan["path"], plan["sha"])}
        job = replace(job, spec=plan_from_json(plan["data"]))
    cap, cap_cached = run_cached(ctx, capture_activations, lambda r: shard_ok(Path(r["path"]), r["sha"]),
                                 "capture_activations", on=job.engine.device, batch_size=job.engine.batch_size,
                                 dtype=job.dtype, **common)
    n = len(adapter.blocks)
    if ctx.params.quantize.resolved_method == "recon":
        blocks, windows, computed, last = _quantize_windows(ctx, job, n, cap, common)
    elif ctx.params.quantize.inputs == "fp":
        (blocks, computed, last), windows = _quantize_blocks_fp(ctx, job, n, cap, common), []
    else:
        (blocks, computed, last), windows = _quantize_blocks(ctx, job, n, cap, common), []
    head = None
    if "lm_head" in ctx.params.quantize.targets:
        head, head_cached = _quantize_head(ctx, job, last, common)
        computed += not head_cached
    _write_quantized(ctx, job, blocks, windows, common, head, plan)
    threads = sorted({b["threads"] for b in blocks if b.get("threads")})
    computed += 0 if plan is None else int(not plan_cached)
    return {"blocks": n, "computed": computed + int(not cap_cached), "task_processes_elsewhere": _elsewhere(blocks),
            "task_threads_min": threads[0] if threads else 0, "task_threads_max": threads[-1] if threads else 0}


def _elsewhere(records: list[dict]) -> int:
    """How many processes other than this one computed the stage's block or window tasks (0 on the
    sequential runner; the workers used on a cluster). Cached tasks count where they once ran."""
    from tasks.quantize import ran_on

    return len({r["ran_on"] for r in records if r.get("ran_on")} - {ran_on()})


def _quantize_blocks(ctx: StageContext, job, n: int, cap: dict, common: dict) -> tuple[list[dict], int, dict]:
    """One cached task per block, each fed by the previous block's output shard; also returns the
    last block's output shard ({path, sha})."""
    from tqdm import tqdm

    from tasks.quantize import quantize_block_task

    prev, records, computed = (cap["path"], cap["sha"]), [], 0
    for i in tqdm(range(n), desc="quantize", unit="block"):
        rec, cached = run_cached(ctx, quantize_block_task, _block_ok, f"block {i}", on=job.engine.device,
                                 index=i, in_path=prev[0], in_sha=prev[1], job=job, **common)
        records.append(_block_record(ctx, i, rec))
        computed += not cached
        prev = (rec["out"], rec["out_sha"])
    return records, computed, {"path": prev[0], "sha": prev[1]}


def _block_record(ctx: StageContext, i: int, rec: dict) -> dict:
    st = rec["stats"]
    if st["block_error"] is not None:
        ctx.log_metrics({"block_error": st["block_error"]}, i)
    routed = st.get("expert_tokens") or {}
    if routed:  # per expert: the calibration tokens its router sent it (gate/up's count), and the shrunk ones
        ctx.log_metrics({f"expert_tokens.{i}.{n.rpartition('.')[0]}": c for n, c in routed.items()
                         if n.endswith("gate_proj")} | {"experts_shrunk": len(st["shrunk_experts"])}, i)
    return {"block": i, "names": rec["names"], "qweights": rec["qweights"], "qweights_sha": rec["qweights_sha"],
            "layer_errors": st["layer_errors"], "before": None, "block_error": st["block_error"],
            "expert_tokens": routed, "shrunk_experts": st.get("shrunk_experts") or [],
            "ran_on": st.get("ran_on"), "threads": st.get("threads")}


def _fp_targets(ctx: StageContext, job, cap: dict, common: dict) -> tuple[dict, bool]:
    """The FP output shard of every block (recon targets; block inputs for quantize.inputs fp)."""
    from tasks.quantize import fp_targets_task
    from tasks.shards import shard_ok

    return run_cached(ctx, fp_targets_task, lambda r: all(shard_ok(Path(b["path"]), b["sha"]) for b in r["bounds"]),
                      "fp_targets", on=job.engine.device, in_path=cap["path"], in_sha=cap["sha"], job=job, **common)


def _quantize_blocks_fp(ctx: StageContext, job, n: int, cap: dict, common: dict) -> tuple[list[dict], int, dict]:
    """quantize.inputs fp: every block calibrated on the FP model's activations at its input, so
    the n block tasks are independent and are all submitted at once (in parallel on a task runner)."""
    from tasks.quantize import quantize_block_task

    fp, fp_cached = _fp_targets(ctx, job, cap, common)
    inputs = [cap] + fp["bounds"][:-1]  # block i reads the FP output of block i - 1
    calls = [(f"block {i}", dict(index=i, in_path=x["path"], in_sha=x["sha"], job=job, **common))
             for i, x in enumerate(inputs)]
    done = run_cached_many(ctx, quantize_block_task, _block_ok, calls, on=job.engine.device)
    records = [_block_record(ctx, i, rec) for i, (rec, _) in enumerate(done)]
    last = {"path": done[-1][0]["out"], "sha": done[-1][0]["out_sha"]}  # the last block on FP inputs
    return records, int(not fp_cached) + sum(not cached for _, cached in done), last


def _quantize_windows(ctx: StageContext, job, n: int, cap: dict, common: dict) -> tuple[list[dict], list[dict], int, dict]:
    """Cross-block reconstruction: FP targets once, then one cached task per window; a window's
    key covers its input shard, target shard and the carried state of the blocks it shares with the
    previous window, so a killed run resumes at the window it was in."""
    from tqdm import tqdm

    from tasks.quantize import recon_window_task, window_ok

    cfg = job.method
    fp, fp_cached = _fp_targets(ctx, job, cap, common)
    windows = cfg.windows(n)
    prev, carry, blocks, stats, computed = (cap["path"], cap["sha"]), None, [], [], int(not fp_cached)
    for w, (start, end) in enumerate(tqdm(windows, desc="reconstruct", unit="window")):
        nxt = windows[w + 1][0] if w + 1 < len(windows) else n
        target = fp["bounds"][min(end + cfg.lookahead, n) - 1] if cfg.target == "fp" else None
        rec, cached = run_cached(ctx, recon_window_task, window_ok, f"window {w} blocks [{start}, {end})",
                                 on=job.engine.device, window=(start, end), next_start=nxt, in_path=prev[0], in_sha=prev[1], target=target,
                                 carry=carry, job=job, **common)
        st = rec["stats"]
        stats.append({"window": w, **{k: st[k] for k in ("start", "end", "loss_init", "loss_final", "kept_init", "curve",
                                                         "skipped_steps", "heldout_batches", "heldout_curve",
                                                         "best_iter", "stopped_early")}})
        if st["skipped_steps"]:
            log.warning("window %d: steps %s had a non-finite loss or gradient and were not applied", w,
                        st["skipped_steps"])
        ctx.log_metrics({"recon_skipped_steps": len(st["skipped_steps"])}, w)
        for step, loss in enumerate(st["curve"]):
            ctx.log_metrics({f"recon_loss_window_{w:03d}": loss}, step)
        for step, loss in st["heldout_curve"]:
            ctx.log_metrics({f"recon_heldout_loss_window_{w:03d}": loss}, step)
        ctx.log_metrics({"recon_loss_final": st["loss_final"]}, w)
        share = {"layer_errors": {}, "names": [], "qweights": None, "qweights_sha": None}
        finished = [dict(share, block=e["block"], before=e["before"], block_error=e["after"]) for e in st["block_errors"]]
        # the window's one codes file holds every block it finished: attach it to the first of them
        finished[0] |= {k: rec[k] for k in ("names", "qweights", "qweights_sha")} | {
            "ran_on": st.get("ran_on"), "threads": st.get("threads")}
        blocks += finished
        computed += not cached
        prev, carry = (rec["out"], rec["out_sha"]), rec["carry"]
    return blocks, stats, computed, {"path": prev[0], "sha": prev[1]}


def _quantize_head(ctx: StageContext, job, last: dict, common: dict) -> tuple[dict, bool]:
    """quantize.targets lm_head: one cached task on the last block's output shard."""
    from tasks.io import file_ok
    from tasks.quantize import quantize_head_task

    keep = ("model_dir", "model_sha", "cache_dir", "trust_remote_code")
    rec, cached = run_cached(ctx, quantize_head_task, lambda r: file_ok(r["qweights"], r["qweights_sha"]), "lm_head",
                             on=job.engine.device, in_path=last["path"], in_sha=last["sha"], job=job,
                             **{k: common[k] for k in keep})
    if rec["error"] is not None:
        ctx.log_metrics({"head_error": rec["error"]}, 0)
    return rec, cached


def _write_quantized(ctx: StageContext, job, blocks: list[dict], windows: list[dict], common: dict,
                     head: dict | None = None, plan: dict | None = None) -> None:
    """data/quantized: every Linear's codes, quantize.json (job, scheme, per-block records) and, for a
    mixed-precision job, mixed_plan.json (each Linear's scheme and the costs it was chosen from)."""
    from quantlib.mixed import plan_split
    from tasks.cache import plain
    from tasks.io import atomic_save_safetensors, atomic_write_json
    from tasks.quantize import load_block_weights

    out = ctx.path(S.QUANTIZED)
    tmp = _fresh_tmp(out)
    tensors, modules = {}, []
    for b in blocks + ([head] if head else []):
        if b["qweights"] is not None:
            for name, qw in load_block_weights(b).items():
                tensors.update(qw.state_dict(name))
            modules += b["names"]
    sha = atomic_save_safetensors(tmp / "quantized.safetensors", tensors)
    mixed = {}
    if plan is not None:  # {"sha", "data"}: the plan file's hash and content, as the stage read it
        atomic_write_json(tmp / "mixed_plan.json", plan["data"])
        mixed = {"mixed": {"plan_sha256": plan["sha"], "target_bpw": plan["data"]["target_bpw"],
                           "linears": plan_split(job.spec)}}
    keep = ("block", "layer_errors", "before", "block_error")
    atomic_write_json(tmp / "quantize.json", {
        "job": plain(job), "scheme": scheme_label(ctx.params.quantize), "method": type(job.method).__name__,
        "modules": modules, **mixed,
        "model_sha": common["model_sha"], "calib_sha": common["calib_sha"], "quantized_sha256": sha,
        "blocks": [{k: b[k] for k in keep} | _routing(b) for b in blocks], "windows": windows,
        **({"head": {"module": head["names"][0], "error": head["error"]}} if head else {})})
    _swap(tmp, out)
    atomic_write_json(ctx.path(S.BLOCK_ERRORS),
                      [{"block": b["block"], "before": b["before"], "after": b["block_error"]} for b in blocks])


def _routing(block: dict) -> dict:
    """A mixture-of-experts block's routed calibration tokens per expert Linear and the shrunk ones."""
    if not block.get("expert_tokens"):
        return {}
    return {"expert_tokens": block["expert_tokens"], "shrunk_experts": block["shrunk_experts"]}


# ---------------------------------------------------------------------------------------- qat


def qat_config(qat: Any, bits: int):
    """The quantlib QATConfig from the qat section (params or its view) for a scheme whose fewest bits
    are `bits` (steps and lr auto resolve by them)."""
    from quantlib.qat import QATConfig

    return QATConfig(trainable=qat.trainable, loss=qat.loss, kl_weight=qat.kl_weight, topk=qat.topk,
                     steps=qat.resolved_steps(bits), lr=qat.resolved_lr(bits), batch_size=qat.batch_size,
                     grad_accum=qat.grad_accum, schedule=qat.schedule,
                     heldout=qat.heldout, eval_every=qat.eval_every, patience=qat.patience,
                     grad_checkpoint=qat.grad_checkpoint, seed=qat.seed, amp=qat.amp)


def qat_stage(ctx: StageContext) -> dict:
    """Global QAT refinement of the quantized model on the calibration sequences; while inactive,
    the quantized state passes through unchanged. Records the block-wise state's sha256 (the chain
    link from quantized codes to QAT codes)."""
    from tasks.io import atomic_save_safetensors, atomic_write_json, load_safetensors_verified

    from .params import fewest_bits

    q = ctx.params.quantize
    bits = fewest_bits(q.bits, q.mixed_from)  # the keys the stage declares
    active = ctx.params.qat.active(bits)
    qdir, out = ctx.path(S.QUANTIZED), ctx.path(S.QAT)
    info = _read_json(qdir / "quantize.json")
    tmp = _fresh_tmp(out)
    chain = {"block_quantized_sha256": info["quantized_sha256"]}
    if not active:
        tensors = load_safetensors_verified(qdir / "quantized.safetensors", info["quantized_sha256"])
        atomic_save_safetensors(tmp / "quantized.safetensors", tensors)
        atomic_write_json(tmp / "quantize.json", info | chain | {"qat": None})
        _swap(tmp, out)
        return {"enabled": 0}
    rec, computed = _train_qat(ctx, qdir, info, bits)
    st = rec["stats"]
    for step, loss in enumerate(st["curve"]):
        if loss is not None:
            ctx.log_metrics({"qat_loss": loss}, step)
    if st["skipped_steps"]:
        log.warning("qat: steps %s had a non-finite loss or gradient and were not applied", st["skipped_steps"])
    ctx.log_metrics({"qat_skipped_steps": len(st["skipped_steps"])}, 0)
    for step, loss in st["heldout_curve"]:
        ctx.log_metrics({"qat_heldout_loss": loss}, step)
    if st["kept_init"]:
        log.warning("qat: no step beat the initial held-out loss %.4g; keeping the quantized input", st["init_heldout"])
    sha = atomic_save_safetensors(tmp / "quantized.safetensors", load_safetensors_verified(rec["path"], rec["sha"]))
    stats = {k: v for k, v in st.items() if k not in ("seconds", "peak_mb")}
    atomic_write_json(tmp / "quantize.json", info | chain | {
        "quantized_sha256": sha, "qat": stats | {"config": qat_config(ctx.params.qat, bits).__dict__}})
    _swap(tmp, out)
    return {"enabled": 1, "computed": computed, "init_heldout": st["init_heldout"], "best_heldout": st["best_heldout"],
            "resumed_at_step": -1 if rec["resumed_at"] is None else rec["resumed_at"]}


@_prefect_flow("qat")
def _train_qat(ctx: StageContext, qdir: Path, info: dict, bits: int) -> tuple[dict, int]:
    """The teacher and QAT tasks (a Prefect flow: only an active qat stage starts Prefect)."""
    from tasks.inputs import manifest_sha
    from tasks.io import file_ok
    from tasks.qat import qat_teacher_task, qat_train_task

    cfg, model_dir = qat_config(ctx.params.qat, bits), ctx.path(S.MODEL)
    tokens_dir, tokens = _tokens(ctx)
    common = dict(model_dir=str(model_dir), model_sha=manifest_sha(model_dir), calib_path=str(tokens_dir / "calib.safetensors"),
                  calib_sha=tokens["calib"]["sha256"], cache_dir=str(ctx.cache),
                  trust_remote_code=ctx.params.fetch_model.trust_remote_code, dtype=ctx.params.fetch_model.dtype)
    teacher, c1 = (None, True) if not cfg.needs_teacher else run_cached(
        ctx, qat_teacher_task, lambda r: file_ok(r["path"], r["sha"]), "qat teacher", topk=cfg.topk, **common)
    rec, c2 = run_cached(ctx, qat_train_task, lambda r: file_ok(r["path"], r["sha"]), "qat",
                         quantized_path=str(qdir / "quantized.safetensors"), quantized_sha=info["quantized_sha256"],
                         names=info["modules"], teacher=teacher, teacher_sha=teacher and teacher["sha"], cfg=cfg,
                         checkpoint_every=ctx.params.qat.checkpoint_every, activations=ctx.params.quantize.activations,
                         **common)
    return rec, int(not c1) + int(not c2)


# --------------------------------------------------------------------------------------- pack


def pack_stage(ctx: StageContext) -> dict:
    """The release folder and its MANIFEST: every file's sha256, the params of every stage that made
    it, the hash chain source -> model -> tokens -> quantized -> qat codes, and the code identity."""
    from quantlib.qweight import QuantizedWeight
    from tasks.card import render_card
    from tasks.codeid import code_identity
    from tasks.faults import failpoint
    from tasks.io import atomic_write_bytes, load_safetensors_verified
    from tasks.manifest import build_release_manifest
    from tasks.release import write_release_files

    qdir, model_dir = ctx.path(S.QAT), ctx.path(S.MODEL)
    info = _read_json(qdir / "quantize.json")
    tensors = load_safetensors_verified(qdir / "quantized.safetensors", info["quantized_sha256"])
    qweights = {n: QuantizedWeight.from_state_dict(tensors, n) for n in info["modules"]}
    out = ctx.path(S.RELEASE)
    tmp = _fresh_tmp(out)
    act = ctx.params.quantize.activations
    fmt = ctx.params.pack.resolved(ctx.params.quantize.all_sym, act)
    write_release_files(tmp, model_dir, qweights, {"scheme": info["scheme"], "method": info["method"], "job": info["job"],
                                                   **({"activations": act} if act else {})},
                        fmt=fmt, trust_remote_code=ctx.params.fetch_model.trust_remote_code,
                        gguf_type=ctx.params.pack.gguf_type, input_scales=_static_scales(ctx, qweights))
    params, chain, code = ctx.params.declared(), _chain(ctx, info), code_identity()
    source = _read_json(model_dir / "source.json")
    card = render_card(name=f"{source['source']} {info['scheme']}", source=source, params=params, info=info,
                       fmt=fmt, chain=chain, code=code)
    atomic_write_bytes(tmp / "README.md", card.encode())
    build_release_manifest(tmp, params=params, chain=chain, code=code)
    failpoint("pack.written")
    _swap(tmp, out)
    return {"files": sum(1 for p in out.rglob("*") if p.is_file())}


def _static_scales(ctx: StageContext, qweights: dict) -> dict | None:
    """Static activations (quantize.activations a8s / a4s): every quantized module's input scale,
    calibrated on the calibration ids with the final (post-QAT) weights; None otherwise."""
    import torch

    from quantlib.actquant import parse_activations
    from tasks.release import static_input_scales
    from tasks.textdata import read_token_ids

    act = parse_activations(ctx.params.quantize.activations)
    if act is None or not act.static:
        return None
    tokens_dir, tokens = _tokens(ctx)
    calib = read_token_ids(tokens_dir / "calib.safetensors", tokens["calib"]["sha256"])["calib"]
    return static_input_scales(ctx.path(S.MODEL), qweights, calib, act.name, getattr(torch, ctx.params.fetch_model.dtype),
                               ctx.params.quantize.batch_size, ctx.params.fetch_model.trust_remote_code)


def _chain(ctx: StageContext, info: dict) -> dict:
    from tasks.inputs import manifest_sha

    model_dir = ctx.path(S.MODEL)
    _, tokens = _tokens(ctx)
    source = _read_json(model_dir / "source.json")
    return {"source": source, "model": manifest_sha(model_dir), "calib": tokens["calib"]["sha256"],
            "eval": {name: e["sha256"] for name, e in tokens["eval"].items()},
            "quantized": info["block_quantized_sha256"], "qat": info["quantized_sha256"]}


def release_label(manifest: dict) -> tuple[str, str]:
    """(method label, scheme name) of a release from the params its MANIFEST records, e.g.
    ("boa+qat", "w3g64")."""
    from .params import params_from_dict

    params = params_from_dict(manifest["params"])
    q = params.quantize
    qat = "+qat" if params.qat.active(q.min_bits) else ""
    return f"{q.resolved_method}{qat}", scheme_label(q)


def mixed_config(quantize: Any):
    """quantize.mixed_* as a quantlib MixedConfig (None when mixed_from is empty)."""
    from quantlib.mixed import MixedConfig
    from quantlib.spec import parse_scheme

    if not quantize.mixed_from:
        return None
    return MixedConfig(tuple(map(parse_scheme, quantize.mixed_from)), quantize.mixed_bits, quantize.mixed_samples)


def scheme_label(quantize: Any) -> str:
    """w3g64, or for mixed precision mix(w2g192+w3g64)@w2g64 (quantlib.mixed.MixedConfig.label)."""
    from quantlib.spec import QuantSpec

    base = QuantSpec(bits=quantize.bits, group_size=quantize.group_size, sym=quantize.sym)
    mixed = mixed_config(quantize)
    return base.name if mixed is None else mixed.label(base)


# ----------------------------------------------------------------------------------- evaluate


def _eval_files(ctx: StageContext) -> tuple[dict, str]:
    from tasks.cache import stable_hash

    folder, tokens = _tokens(ctx)
    files = {name: [str(folder / e["file"]), e["sha256"]] for name, e in tokens["eval"].items()}
    return files, stable_hash({k: v[1] for k, v in files.items()})


@_prefect_flow("evaluate")
def evaluate_stage(ctx: StageContext) -> dict:
    from tasks.evaluation import ppl_task
    from tasks.faults import failpoint
    from tasks.inputs import manifest_sha, source_name
    from tasks.io import atomic_write_json, sha256_file

    e, release, model_dir = ctx.params.evaluate, ctx.path(S.RELEASE), ctx.path(S.MODEL)
    files, files_sha = _eval_files(ctx)
    release_sha = sha256_file(release / "MANIFEST.json")  # deterministic: identifies the release
    common = dict(eval_files=files, eval_files_sha=files_sha, batch_size=e.batch_size,
                  trust_remote_code=ctx.params.fetch_model.trust_remote_code, dtype=ctx.params.fetch_model.dtype)
    # independent: submitted together on a parallel runner, in this order on the sequential one
    (ppl, c1), (fp, c2) = run_cached_many(ctx, ppl_task, lambda r: True, [
        ("perplexity (release)", dict(kind="release", folder=str(release), model_sha=release_sha, **common)),
        ("perplexity (fp source)", dict(kind="model", folder=str(model_dir), model_sha=manifest_sha(model_dir),
                                        **common))])
    failpoint("evaluate.scored")
    lm, c3 = _lm_eval(ctx, release, release_sha)
    manifest = _read_json(release / "MANIFEST.json")
    method, scheme = release_label(manifest)
    first = ctx.params.prepare_data.eval_sources[0]  # the gate's text (JSON files keep keys sorted, not in order)
    metrics = {"ppl": ppl, "fp32_ppl": fp, "lm_eval": lm, "scheme": scheme, "method": method, "primary": first}
    atomic_write_json(ctx.path(S.METRICS), metrics)
    atomic_write_json(ctx.path(S.PPL), [{"model": "fp32", "ppl": fp[first]}, {"model": method, "ppl": ppl[first]}])
    _report(ctx, f"{manifest['params']['fetch_model']['source']} {method} {scheme}", ppl[first], fp[first], lm)
    others = {f"{k}.{source_name(name)}": v[name] for name in ppl if name != first for k, v in (("ppl", ppl), ("fp32_ppl", fp))}
    ctx.log_metrics({"ppl": ppl[first], "fp32_ppl": fp[first], **others, **lm}, 0)  # e.g. ppl.python-docs
    return {"computed": int(not c1) + int(not c2) + int(not c3)}


def _lm_eval(ctx: StageContext, release: Path, release_sha: str) -> tuple[dict, bool]:
    from tasks.evaluation import lm_eval_task, prepare_local_tasks
    from tasks.textdata import load_text, parse_text_source, resolve_mirror

    e, d = ctx.params.evaluate, ctx.params.prepare_data
    if not e.lm_eval_tasks:
        return {}, True
    text = load_text(parse_text_source(d.eval_sources[0]), resolve_mirror(d.mirror))
    include, tasks_sha = prepare_local_tasks(ctx.cache / "lm_eval_tasks", text, list(e.lm_eval_tasks))
    # one mapped task per lm-eval task: in parallel on a task runner, each cached on its own
    done = run_cached_many(ctx, lm_eval_task, lambda r: True, [
        (f"lm_eval {name}", dict(folder=str(release), model_sha=release_sha, tasks=[name],
                                 include_path=str(include) if include else None, tasks_sha=tasks_sha,
                                 limit=e.lm_eval_limit, batch_size=e.batch_size,
                                 trust_remote_code=ctx.params.fetch_model.trust_remote_code,
                                 dtype=ctx.params.fetch_model.dtype))
        for name in e.lm_eval_tasks])
    merged: dict = {}
    for result, _ in done:
        merged |= result
    return merged, all(cached for _, cached in done)


def _report(ctx: StageContext, title: str, ppl: float, fp: float, lm: dict) -> None:
    from tasks.report import write_report

    out = ctx.path(S.REPORT)
    tmp = _fresh_tmp(out)
    blocks = _read_json(ctx.path(S.BLOCK_ERRORS))
    write_report(tmp, title=title, metrics={"ppl": ppl, "fp32 ppl": fp, **lm},
                 block_errors=[b for b in blocks if b["after"] is not None], history=[], fp32_ppl=fp)
    _swap(tmp, out)


# ----------------------------------------------------------------------------------- register


class GateError(RuntimeError):
    """The release did not pass register.max_ppl_ratio: registered, but the alias was not moved."""


def register_stage(ctx: StageContext) -> dict:
    """Register the release once per MANIFEST (a version already registered is reused), and move the
    alias only when the quality gate passes; the outcome is written to metrics/registry.json."""
    from tasks.card import card_with_metrics
    from tasks.io import atomic_write_json
    from tasks.registry import register_release, release_model_name

    r, release = ctx.params.register, ctx.path(S.RELEASE)
    if ctx.tracking is None:
        raise RuntimeError("the register stage needs MLflow tracking (register.tracking_uri)")
    metrics = _read_json(ctx.path(S.METRICS))
    passed, reason = _gate(metrics, r.max_ppl_ratio)
    source = _read_json(release / "MANIFEST.json")["params"]["fetch_model"]["source"]
    name = r.model_name or release_model_name(source, metrics["scheme"])
    card = release / "README.md"  # the registry entry's description: the card and the release's perplexity
    description = card_with_metrics(card.read_text(), metrics) if card.is_file() else None
    reg = register_release(ctx.tracking.tracker, ctx.tracking.parent_run_id, release, name, r.alias,
                           move_alias=passed, reason=reason, description=description)
    atomic_write_json(ctx.path(S.REGISTRY), {
        "model_name": reg.name, "version": reg.version, "new_version": reg.new, "alias": r.alias,
        "alias_moved": reg.alias_moved, "gate": reason or "passed", "model_uri": f"models:/{reg.name}/{reg.version}",
        "tracking_uri": ctx.tracking.tracker.tracking_uri})
    if not passed:
        raise GateError(f"register: {reason}; version {reg.version} is registered, alias {r.alias!r} not moved")
    return {"version": reg.version, "new_version": int(reg.new)}


def _gate(metrics: dict, max_ratio: float | None) -> tuple[bool, str]:
    first = S.primary_source(metrics)
    ratio = metrics["ppl"][first] / metrics["fp32_ppl"][first]
    if max_ratio is None or ratio <= max_ratio:
        return True, ""
    return False, f"quality gate failed: ppl ratio {ratio:.4f} on {first} exceeds register.max_ppl_ratio {max_ratio}"


STAGE_FUNCTIONS: dict[str, Callable[[StageContext], dict]] = {
    "inputs": inputs_stage, "fetch_model": fetch_model_stage, "prepare_data": prepare_data_stage,
    "quantize": quantize_stage, "qat": qat_stage, "pack": pack_stage, "evaluate": evaluate_stage,
    "register": register_stage}
