"""What the quantize stage's task path costs over the bare engine, per block.

`run_stage_overhead` quantizes the first n blocks of the default model with the protocol's
calibration (128 x 512, seed 0) three ways, each in its own subprocess, back to back:

- bare:    quantlib.engine.quantize_model, what `ptq quantize` / `ptq bench quality` run
           (activations in memory, no block-error pass);
- task:    tasks.quantize.capture_activations.fn, then quantize_block_task.fn per block, with the
           job the pipeline builds (block error on quantize.error_sequences; shards on disk, verified);
- prefect: the same tasks called inside a Prefect flow the way flows.pipeline.run_cached calls
           them (ephemeral API server, persisted JSON results, return_state).

Per-block seconds: bare from BlockStats.seconds (the whole quantize_block call; nothing else runs
between blocks there), task/prefect as the wall time of each task call; also each side's process
CPU seconds from capture to the last block, which other load on a shared machine disturbs less.
Every side's codes are compared with the bare side's (they must be bit-identical). Records
(command, git commit, torch threads, load average, date) are appended to
docs/benchmarks/pipeline_overhead.json and pipeline_overhead.md is regenerated from it.

`run_prefect_startup` (`--prefect-startup`) measures what one stage process pays for Prefect:
import, first flow call (temporary API server), per-task cost, for several ways of reaching an API.

    python -m flows.bench_pipeline --methods gptq:w4g64,boa:w3g64 --blocks 6 --label after
    python -m flows.bench_pipeline --prefect-startup
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_stage_overhead", "render_overhead_md", "run_prefect_startup", "render_startup_md", "MODES",
           "PREFECT_VARIANTS"]

MODES = ("bare", "task", "prefect", "paired")
DEFAULT_OUT = "docs/benchmarks/pipeline_overhead.json"
CALIB = dict(n=128, seqlen=512, seed=0)


def _parse_method(text: str) -> tuple[str, str]:
    method, _, scheme = text.partition(":")
    if not method or not scheme:
        raise ValueError(f"method {text!r}: expected METHOD:SCHEME, e.g. gptq:w4g64")
    return method, scheme


# ------------------------------------------------------------------------------------- worker side


def _setup(job: dict):
    """(model truncated to n blocks, spec, method config, engine config) for one side."""
    from quantlib.adapters import get_adapter
    from quantlib.engine import EngineConfig
    from quantlib.spec import parse_scheme
    from tasks.sources import load_model

    from .methods import method_config

    model = load_model(Path(job["model_dir"]))
    del get_adapter(model).blocks[job["n_blocks"]:]  # both sides quantize the same first n blocks
    engine = EngineConfig(batch_size=job["batch_size"], true_sequential=True, device="cpu",
                          measure_block_error=job["mode"] != "bare", **_error_batches(job))
    return model, parse_scheme(job["scheme"]), method_config(job["method"]), engine


def _error_batches(job: dict) -> dict:
    """block_error_batches only where set: the engine of an older checkout may not know it."""
    return {"block_error_batches": job["block_error_batches"]} if job.get("block_error_batches") else {}


def _bare(job: dict) -> tuple[dict, dict]:
    from quantlib.adapters import get_adapter
    from quantlib.engine import quantize_model
    from tasks.textdata import read_token_ids

    model, spec, cfg, engine = _setup(job)
    ids = read_token_ids(job["calib_path"], job["calib_sha"])["calib"]
    t0, c0 = time.perf_counter(), time.process_time()
    results, stats = quantize_model(get_adapter(model), ids, spec, cfg, engine)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    blocks = [st.seconds for st in stats]
    codes = {k: v for name, qw in results.items() for k, v in qw.state_dict(name).items()}
    return {"blocks": blocks, "capture": total - sum(blocks), "total": total, "cpu_total": cpu}, codes


def _task_calls(job: dict, call) -> tuple[dict, dict]:
    """capture_activations, then quantize_block_task per block, each through call(task, label, **kw)."""
    from tasks.quantize import QuantizeJob, capture_activations, load_block_weights, quantize_block_task

    _, spec, cfg, engine = _setup(job)
    qjob = QuantizeJob(spec, cfg, engine, stream_from_disk=job["stream_from_disk"])
    # the tasks read the model folder (the skeleton and their own block), as in the pipeline
    common = dict(model_dir=job["model_dir"], model_sha=job["model_sha"], calib_path=job["calib_path"],
                  calib_sha=job["calib_sha"], cache_dir=job["cache_dir"])
    t0, c0 = time.perf_counter(), time.process_time()
    cap = call(capture_activations, "capture", batch_size=engine.batch_size, **common)
    capture = time.perf_counter() - t0
    prev, blocks, errors, codes = (cap["path"], cap["sha"]), [], [], {}
    for i in range(job["n_blocks"]):
        t = time.perf_counter()
        rec = call(quantize_block_task, f"block {i}", index=i, in_path=prev[0], in_sha=prev[1], job=qjob, **common)
        blocks.append(time.perf_counter() - t)
        errors.append(rec["stats"]["block_error"])
        codes |= {k: v for name, qw in load_block_weights(rec).items() for k, v in qw.state_dict(name).items()}
        prev = (rec["out"], rec["out_sha"])
    return {"blocks": blocks, "capture": capture, "total": time.perf_counter() - t0,
            "cpu_total": time.process_time() - c0, "block_errors": errors}, codes


def _task(job: dict) -> tuple[dict, dict]:
    return _task_calls(job, lambda task, _label, **kw: task.fn(**kw))


def _paired(job: dict) -> tuple[dict, dict]:
    """Bare and task path in one process, block by block, alternating which goes first, so both
    see the same load on a shared machine. The bare side is quantize_model's own loop, stepped."""
    from quantlib.activations import ActivationStore
    from quantlib.adapters import get_adapter
    from quantlib.capture import capture_block_inputs
    from quantlib.engine import quantize_block
    from tasks.quantize import QuantizeJob, capture_activations, load_block_weights, quantize_block_task
    from tasks.textdata import read_token_ids

    bare_model, spec, cfg, bare_engine = _setup(dict(job, mode="bare"))
    _, _, _, task_engine = _setup(dict(job, mode="task"))
    adapter, ids = get_adapter(bare_model), read_token_ids(job["calib_path"], job["calib_sha"])["calib"]
    batches, calls = capture_block_inputs(adapter, ids, bare_engine.batch_size)
    acts = ActivationStore.from_batches(batches, None)
    common = dict(model_dir=job["model_dir"], model_sha=job["model_sha"], calib_path=job["calib_path"],
                  calib_sha=job["calib_sha"], cache_dir=job["cache_dir"])
    cap = capture_activations.fn(batch_size=task_engine.batch_size, **common)
    qjob = QuantizeJob(spec, cfg, task_engine, stream_from_disk=job["stream_from_disk"])
    prev = (cap["path"], cap["sha"])
    seconds: dict[str, list[float]] = {"bare": [], "task": []}
    codes: dict[str, dict] = {"bare": {}, "task": {}}
    for i in range(job["n_blocks"]):
        for side in (("bare", "task") if i % 2 == 0 else ("task", "bare")):
            t = time.perf_counter()
            if side == "bare":
                res, acts, _ = quantize_block(adapter, i, acts, calls[i], spec, cfg, bare_engine)
            else:
                rec = quantize_block_task.fn(index=i, in_path=prev[0], in_sha=prev[1], job=qjob, **common)
                res, prev = load_block_weights(rec), (rec["out"], rec["out_sha"])
            seconds[side].append(time.perf_counter() - t)
            codes[side] |= {k: v for name, qw in res.items() for k, v in qw.state_dict(name).items()}
    ratios = [t / b for b, t in zip(seconds["bare"], seconds["task"])]
    return {"blocks": seconds["task"], "bare_blocks": seconds["bare"], "ratios": ratios}, codes["task"] | {
        f"bare/{k}": v for k, v in codes["bare"].items()}


def _prefect(job: dict) -> tuple[dict, dict]:
    """The task path inside a Prefect flow, each task called as flows.pipeline.run_cached calls it
    (persisted JSON results in the cache folder, return_state); also times the flow start
    (ephemeral API server and flow-run creation) until its body runs."""
    from prefect import flow

    storage = Path(job["cache_dir"]) / "prefect-results"

    def call(task, _label, **kw):
        t = task.with_options(result_storage=storage, persist_result=True, result_serializer="json")
        return t(return_state=True, **kw).result()

    @flow(name="bench_pipeline_overhead", validate_parameters=False, log_prints=False)
    def bench_flow(t_call: float):
        started = time.perf_counter() - t_call
        side, codes = _task_calls(job, call)
        return side | {"flow_start": started}, codes

    t0 = time.perf_counter()
    side, codes = bench_flow(t0)
    return side | {"flow_total": time.perf_counter() - t0}, codes


def _worker(job: dict, out_json: Path, out_codes: Path) -> None:
    import torch
    from safetensors.torch import save_file

    load_before = os.getloadavg()
    side, codes = {"bare": _bare, "task": _task, "prefect": _prefect, "paired": _paired}[job["mode"]](job)
    side |= {"threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    save_file({k: v.contiguous() for k, v in codes.items()}, str(out_codes))
    out_json.write_text(json.dumps(side))


# ------------------------------------------------------------------------------------- driver side


def _worker_env(work: Path) -> dict:
    """The quantize stage's Prefect environment (as `ptq run` sets it), in a fresh Prefect home."""
    env = dict(os.environ)
    for k, v in {"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                 "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "WARNING",
                 "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING"}.items():
        env.setdefault(k, v)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def _run_side(job: dict, work: Path) -> tuple[dict, Path]:
    """One side in a fresh process (its own memory, its own Prefect server); returns its timings
    and the file holding its codes."""
    tag = f"{job['mode']}-{job['repeat']}"
    out_json, out_codes = work / f"{tag}.json", work / f"{tag}.safetensors"
    job = dict(job, cache_dir=str(work / f"cache-{tag}"))
    r = subprocess.run([sys.executable, "-m", "flows.bench_pipeline", "--worker", json.dumps(job), str(out_json),
                        str(out_codes)], env=_worker_env(work))
    if r.returncode != 0:
        raise RuntimeError(f"pipeline-overhead worker {tag} for {job['method']} {job['scheme']} failed "
                           f"(exit {r.returncode})")
    return json.loads(out_json.read_text()), out_codes


def _same_codes(a: Path, b: Path) -> bool:
    """b's codes (and, for a paired side, its own bare codes) equal a's, bit for bit."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    groups = [{k: v for k, v in y.items() if not k.startswith("bare/")},
              {k[5:]: v for k, v in y.items() if k.startswith("bare/")}]
    return all(x.keys() == g.keys() and all(torch.equal(x[k], g[k]) for k in x) for g in groups if g)


def _calibration(model_dir: Path, work: Path, mirror: str | None) -> tuple[str, str]:
    from tasks.sources import load_tokenizer
    from tasks.textdata import write_token_ids

    from .commands import protocol_data

    data = protocol_data(load_tokenizer(model_dir), "wikitext2", None, mirror=mirror, window=1024, n_windows=1, **CALIB)
    path = work / "calib.safetensors"
    return str(path), write_token_ids(path, {"calib": data.calib})


def _summary(sides: dict[str, list[dict]]) -> dict:
    """Per mode: median over repeats of the mean seconds per block, and the fastest block over all
    repeats (the blocks are alike: the least disturbed by other load on the machine); ratios to bare.
    A paired side's ratio is the median of its per-block ratios to its own bare blocks."""
    per_block = {m: statistics.median(statistics.fmean(s["blocks"]) for s in runs) for m, runs in sides.items()}
    fastest = {m: min(min(s["blocks"]) for s in runs) for m, runs in sides.items()}
    ratio = {m: per_block[m] / per_block["bare"] for m in per_block}
    if "paired" in sides:
        ratio["paired"] = statistics.median(x for s in sides["paired"] for x in s["ratios"])
        per_block["paired_bare"] = statistics.median(statistics.fmean(s["bare_blocks"]) for s in sides["paired"])
    return {"per_block_s": per_block, "ratio": ratio, "fastest_block_s": fastest,
            "ratio_fastest": {m: fastest[m] / fastest["bare"] for m in fastest}}


def _measure(method_spec: str, base: dict, modes: tuple[str, ...], repeats: int) -> dict:
    method, scheme = _parse_method(method_spec)
    sides: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="ptq-bench-pipeline-") as tmp:
        work = Path(tmp)
        calib_path, calib_sha = _calibration(Path(base["model_dir"]), work, base["mirror"])
        codes: dict[str, list[Path]] = {m: [] for m in modes}
        for r in range(repeats):
            for mode in modes:  # the sides back to back, alternating over repeats
                job = dict(base, method=method, scheme=scheme, mode=mode, repeat=r, calib_path=calib_path,
                           calib_sha=calib_sha)
                side, path = _run_side(job, work)
                sides[mode].append(side)
                codes[mode].append(path)
                print(f"{method_spec} {mode} #{r}: {statistics.fmean(side['blocks']):.2f} s/block "
                      f"(load {side['loadavg_before'][0]:.2f})", flush=True)
        same = {m: all(_same_codes(codes["bare"][0], p) for p in paths) for m, paths in codes.items()}
    return {"method": method, "scheme": scheme, "sides": sides, "codes_identical": same} | _summary(sides)


def _git() -> dict:
    from tasks.codeid import code_fingerprint, git_state

    return git_state(Path.cwd()) | {"code_fingerprint": code_fingerprint()}


def run_stage_overhead(out: str = DEFAULT_OUT, methods=("gptq:w4g64", "boa:w3g64"), n_blocks: int = 6, *,
                       model: str = "smollm2-135m", modes: tuple[str, ...] = MODES, repeats: int = 1,
                       batch_size: int = 8, stream_from_disk: bool = False, mirror: str | None = None,
                       block_error_batches: int | None = None, label: str | None = None,
                       command: str | None = None) -> list[dict]:
    """Time the first n_blocks blocks of `model` per method ("gptq:w4g64") on every side in
    `modes`; append one record per method to `out` and regenerate the markdown table beside it.
    block_error_batches: the task sides measure the block error on that many batches (None: all)."""
    import torch

    from tasks.inputs import manifest_sha
    from tasks.io import atomic_write_bytes, atomic_write_json

    from .commands import cached_model

    if n_blocks < 1 or repeats < 1 or "bare" not in modes or set(modes) - set(MODES):
        raise ValueError(f"need n_blocks >= 1, repeats >= 1 and modes from {MODES} including bare; got "
                         f"{n_blocks}, {repeats}, {modes}")
    model_dir = cached_model(model)
    modes = ("bare", *[m for m in modes if m != "bare"])
    base = {"model_dir": str(model_dir), "model_sha": manifest_sha(model_dir), "n_blocks": n_blocks,
            "batch_size": batch_size, "stream_from_disk": stream_from_disk, "block_error_batches": block_error_batches,
            "mirror": mirror or os.environ.get("PTQ_DATA_MIRROR")}
    command = command or "python -m flows.bench_pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    records = []
    for m in methods:
        load_before = os.getloadavg()
        rec = _measure(m, base, modes, repeats)
        records.append(rec | {"label": label, "model": model, "n_blocks": n_blocks, "calib": CALIB,
                              "batch_size": batch_size, "stream_from_disk": stream_from_disk,
                              "block_error_batches": block_error_batches, "command": command,
                              "git": _git(), "threads": torch.get_num_threads(),
                              "loadavg": {"before": load_before, "after": os.getloadavg()},
                              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        path = Path(out)
        old = json.loads(path.read_text()) if path.exists() else []  # re-read: another run may have appended
        atomic_write_json(path, old + [records[-1]])
        atomic_write_bytes(path.with_suffix(".md"), render_overhead_md(old + [records[-1]]).encode())
    return records


def render_overhead_md(records: list[dict]) -> str:
    """Latest record per (label, model, method, scheme, n_blocks, variant), one row per side."""
    latest = {(r.get("label"), r["model"], r["method"], r["scheme"], r["n_blocks"], r["stream_from_disk"],
               r.get("block_error_batches")): r for r in records}
    lines = ["# Quantize stage overhead: pipeline task path vs bare engine", "",
             "First n blocks of the model, protocol calibration (128 x 512, seed 0), fp32 on CPU, seconds per block.",
             "bare = quantlib.engine.quantize_model; task = the tasks' .fn as the pipeline's job runs them",
             "(measure_block_error=True, shards on disk); prefect = the same called as flows.pipeline.run_cached",
             "does, inside a flow (flow start excluded); each in its own process, back to back. paired = bare and",
             "task in one process, block by block, alternating which runs first; its ratio is the median of the",
             "per-block ratios, the one least disturbed by other load on a shared machine. fastest = a side's",
             "fastest block (the blocks are alike). CPU = process CPU seconds from capture to the last block.",
             "Generated from pipeline_overhead.json by `python -m flows.bench_pipeline`.", "",
             "| label | method | scheme | blocks | side | s/block | fastest s | / bare | / bare (fastest) | "
             "/ bare (CPU) | flow start s | codes = bare | load avg | threads | commit | date |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for key, r in latest.items():
        lines += ["| " + " | ".join(cells) + " |" for cells in _md_rows(key, r)]
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in latest.values())]
    return "\n".join(lines) + "\n"


def _side_stats(runs: list[dict], bare_runs: list[dict] | None) -> dict:
    """s/block, fastest block and the ratios of one side (over its repeats) to `bare_runs`."""
    mean = statistics.median(statistics.fmean(s["blocks"]) for s in runs)
    fastest = min(min(s["blocks"]) for s in runs)
    if bare_runs is None:  # paired: its own bare blocks
        base = [{"blocks": s["bare_blocks"]} for s in runs]
        ratio = statistics.median(x for s in runs for x in s["ratios"])
    else:
        base = bare_runs
        ratio = mean / statistics.median(statistics.fmean(s["blocks"]) for s in base)
    cpu = [s.get("cpu_total") for s in runs + base]
    return {"mean": mean, "fastest": fastest, "ratio": ratio,
            "ratio_fastest": fastest / min(min(s["blocks"]) for s in base),
            "ratio_cpu": statistics.median(s["cpu_total"] for s in runs) / statistics.median(
                s["cpu_total"] for s in base) if None not in cpu else None}


def _md_rows(key: tuple, r: dict) -> list[list[str]]:
    git, variant = r["git"], (" (streamed)" if key[5] else "") + (f" (error on {key[6]} batches)" if key[6] else "")
    commit = (git.get("git_commit") or "")[:9] + ("+dirty" if git.get("git_dirty") else "")
    rows = []
    for m in (m for m in MODES if m in r["sides"]):
        runs = r["sides"][m]
        st = _side_stats(runs, None if m == "paired" else r["sides"]["bare"])
        starts = [s["flow_start"] for s in runs if "flow_start" in s]
        load = f"{runs[0]['loadavg_before'][0]:.2f} -> {runs[-1]['loadavg_after'][0]:.2f}"
        rows.append([key[0] or "", r["method"], r["scheme"] + variant, str(r["n_blocks"]),
                     "paired task (vs its bare)" if m == "paired" else m, f"{st['mean']:.2f}", f"{st['fastest']:.2f}",
                     f"{st['ratio']:.3f}", f"{st['ratio_fastest']:.3f}",
                     "" if st["ratio_cpu"] is None else f"{st['ratio_cpu']:.3f}",
                     f"{statistics.median(starts):.1f}" if starts else "",
                     "yes" if r["codes_identical"].get(m, True) else "NO", load, str(runs[0].get("threads", "")),
                     commit, r["date"][:16]])
    return rows


# ------------------------------------------------------------------------------------ Prefect start-up

# How a stage process can reach a Prefect API: each variant is a set of environment variables over
# the ones `ptq run` sets (flows/cli_pipeline.py); "server" points PREFECT_API_URL at one `prefect
# server start` the driver runs for all its probes (its own start-up is recorded apart).
PREFECT_VARIANTS = {
    "fresh-home": {},  # a new PREFECT_HOME: first run of a project (creates and migrates prefect.db)
    "warm-home": {},  # the PREFECT_HOME of an earlier run (what every later stage process finds)
    "warm-home-no-migrate": {"PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
                             "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"},
    # not here: an in-memory SQLite database (sqlite+aiosqlite:///:memory:) fails, every pooled
    # connection of the server gets its own empty database ("no such table: flow")
    "server": {},
}
STARTUP_OUT = "docs/benchmarks/prefect_startup.json"


def _prefect_probe(n_tasks: int, storage: str) -> dict:
    """Run in a fresh process: the cost of importing prefect, of the first flow call until its body
    runs (ephemeral API server start, flow-run creation), and of one task call made the way
    flows.pipeline.run_cached makes it, against the task's plain .fn."""
    import uuid

    t0 = time.perf_counter()
    from prefect import flow, task

    imported = time.perf_counter() - t0
    nonce = uuid.uuid4().hex  # every call computes: no cache hit from an earlier probe

    @task(name="probe", cache_key_fn=lambda _c, p: f"probe-{nonce}-{p['i']}", persist_result=True)
    def probe_task(i: int) -> dict:
        return {"i": i}

    @flow(name="prefect_startup_probe", validate_parameters=False, log_prints=False)
    def probe_flow(t_call: float) -> dict:
        started = time.perf_counter() - t_call
        t = time.perf_counter()
        for i in range(n_tasks):
            probe_task.with_options(result_storage=Path(storage), result_serializer="json")(i=i, return_state=True).result()
        per_task = (time.perf_counter() - t) / n_tasks
        t = time.perf_counter()
        for i in range(n_tasks):
            probe_task.fn(i=i)
        return {"flow_start": started, "per_task": per_task, "per_fn": (time.perf_counter() - t) / n_tasks}

    t = time.perf_counter()
    out = probe_flow(t)
    return {"import_prefect": imported, "flow_call": time.perf_counter() - t} | out


def _start_server(env: dict) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` on a free port in its own session; (process, API URL, seconds to healthy)."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    while time.perf_counter() - t0 < 300:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    _stop_server(proc)
    raise RuntimeError("prefect server start did not become healthy within 300 s")


def _stop_server(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: it and its uvicorn child
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _probe(env: dict, n_tasks: int, storage: Path) -> dict:
    """One probe process, timed from spawn to exit (interpreter start and server stop included)."""
    out = storage / f"probe-{time.monotonic_ns()}.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.bench_pipeline", "--prefect-probe", str(n_tasks), str(storage),
                        str(out)], env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"prefect probe failed (exit {r.returncode})")
    return json.loads(out.read_text()) | {"process": wall, "loadavg": os.getloadavg()}


def _startup_variant(name: str, work: Path, repeats: int, n_tasks: int) -> dict:
    env = _worker_env(work / name) | PREFECT_VARIANTS[name]
    server, extra = None, {}
    if name == "server":
        server, env["PREFECT_API_URL"], extra["server_start"] = _start_server(env)
    try:
        if name.startswith("warm-home"):
            _probe(_worker_env(work / name), 1, work)  # the earlier, plain run that created and migrated prefect.db
        runs = []
        for _ in range(repeats):
            if name == "fresh-home":
                env = _worker_env(work / f"{name}-{len(runs)}") | PREFECT_VARIANTS[name]
            runs.append(_probe(env, n_tasks, work))
    finally:
        if server is not None:
            _stop_server(server)
    keys = ("import_prefect", "flow_start", "flow_call", "per_task", "per_fn", "process")
    return {"variant": name, "env": PREFECT_VARIANTS[name], "runs": runs, **extra,
            "median": {k: statistics.median(r[k] for r in runs) for k in keys}}


def run_prefect_startup(out: str = STARTUP_OUT, variants=tuple(PREFECT_VARIANTS), repeats: int = 3,
                        n_tasks: int = 50, command: str | None = None) -> list[dict]:
    """What a stage process pays for Prefect, per way of reaching an API: a bare `python -c pass`,
    then per variant `repeats` probe processes (import, first flow call, per-task cost); appends a
    record to `out` and regenerates the markdown beside it."""
    from tasks.io import atomic_write_bytes, atomic_write_json

    unknown = set(variants) - set(PREFECT_VARIANTS)
    if unknown or repeats < 1 or n_tasks < 1:
        raise ValueError(f"variants from {tuple(PREFECT_VARIANTS)}, repeats and n_tasks >= 1; got {variants}, "
                         f"{repeats}, {n_tasks}")
    with tempfile.TemporaryDirectory(prefix="ptq-prefect-startup-") as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python = time.perf_counter() - t0
        load_before = os.getloadavg()
        results = [_startup_variant(v, Path(tmp), repeats, n_tasks) for v in variants]
    import prefect

    record = {"prefect": prefect.__version__, "python_start": python, "variants": results, "n_tasks": n_tasks,
              "repeats": repeats, "git": _git(), "loadavg": {"before": load_before, "after": os.getloadavg()},
              "command": command or "python -m flows.bench_pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    path = Path(out)
    records = (json.loads(path.read_text()) if path.exists() else []) + [record]
    atomic_write_json(path, records)
    atomic_write_bytes(path.with_suffix(".md"), render_startup_md(records).encode())
    return results


def render_startup_md(records: list[dict]) -> str:
    """The latest record as a markdown table (medians over its probe processes)."""
    r = records[-1]
    lines = ["# Prefect start-up cost of one stage process", "",
             f"Prefect {r['prefect']}; medians of {r['repeats']} probe processes per variant, "
             f"{r['n_tasks']} task calls each;",
             f"`python -c pass` takes {r['python_start']:.2f} s here. flow start = first flow call until its body runs",
             "(temporary API server start, flow-run creation); task call = one call as flows.pipeline.run_cached",
             "makes it (persisted JSON result, custom cache key), against the plain .fn; process = spawn to exit.",
             "Generated by `python -m flows.bench_pipeline --prefect-startup`.", "",
             "| variant | env over `ptq run`'s | import prefect s | flow start s | flow call s | task call ms | "
             ".fn ms | process s | server start s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in r["variants"]:
        m = v["median"]
        env = ", ".join(f"{k}={x}" for k, x in v["env"].items()) or ("PREFECT_API_URL=<running server>"
                                                                    if v["variant"] == "server" else "")
        lines.append(f"| {v['variant']} | {env} | {m['import_prefect']:.2f} | {m['flow_start']:.2f} | "
                     f"{m['flow_call']:.2f} | {1e3 * m['per_task']:.1f} | {1e3 * m['per_fn']:.3f} | "
                     f"{m['process']:.2f} | {v.get('server_start', float('nan')):.1f} |")
    git = r["git"]
    lines += ["", f"Load average {r['loadavg']['before'][0]:.2f} -> {r['loadavg']['after'][0]:.2f}; commit "
              f"{(git.get('git_commit') or '')[:9]}{'+dirty' if git.get('git_dirty') else ''}; {r['date']}.", "",
              f"Command: `{r['command']}`"]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="gptq:w4g64,boa:w3g64", help="comma-separated METHOD:SCHEME")
    p.add_argument("--blocks", type=int, default=6, help="first N blocks of the model")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, from {','.join(MODES)} (bare always runs)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all modes, back to back")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stream-from-disk", action="store_true",
                   help="the task sides stream shards (quantize.spill_to_disk)")
    p.add_argument("--mirror", default=None, help="offline data mirror (default $PTQ_DATA_MIRROR)")
    p.add_argument("--block-error-batches", default="pipeline",
                   help="the task sides measure the block error on the first K batches, 'all', or 'pipeline' "
                        "(default: as the pipeline's quantize.error_sequences default does)")
    p.add_argument("--label", default=None, help="a name for these records in the table (e.g. before, after)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--prefect-startup", action="store_true",
                   help=f"instead: what a stage process pays for Prefect, per variant; appends to {STARTUP_OUT}")
    p.add_argument("--startup-out", default=STARTUP_OUT)
    p.add_argument("--startup-repeats", type=int, default=3, help="probe processes per Prefect variant")
    return p


def _error_batches_arg(text: str, batch_size: int) -> int | None:
    """'all' -> None, 'pipeline' -> the batches the pipeline's default error_sequences fill, else K."""
    from .params import QuantizeParams
    from .pipeline import error_batches as pipeline_error_batches

    if text == "all":
        return None
    if text == "pipeline":
        return pipeline_error_batches(QuantizeParams().error_sequences, batch_size)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(json.loads(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    if argv[:1] == ["--prefect-probe"]:
        Path(argv[3]).write_text(json.dumps(_prefect_probe(int(argv[1]), argv[2])))
        return 0
    a = _parser().parse_args(argv)
    if a.prefect_startup:
        run_prefect_startup(a.startup_out, repeats=a.startup_repeats)
        return 0
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    run_stage_overhead(a.out, [m.strip() for m in a.methods.split(",") if m.strip()], a.blocks, model=a.model,
                       modes=modes if "bare" in modes else ("bare", *modes), repeats=a.repeats,
                       batch_size=a.batch_size, stream_from_disk=a.stream_from_disk, mirror=a.mirror,
                       block_error_batches=_error_batches_arg(a.block_error_batches, a.batch_size), label=a.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
