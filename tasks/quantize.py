"""Prefect tasks of the quantize stage: capture block-0 inputs, quantize one block, assemble.

Each task is addressed by files, not objects: the model folder (+ its MANIFEST sha) and block
indices, input/target shards and carried state, each with its sha256. It loads only what it needs
(tasks.partial: the skeleton and its own blocks), makes one quantlib call and writes
content-addressed files under the storage root; its Prefect result is a small dict of paths +
sha256, never tensors, so it runs the same in this process, a thread, or a Dask/Ray worker.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import os
import socket
import threading

import torch
from prefect import task

from quantlib.activations import ActivationStore
from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_calls, capture_block_inputs
from quantlib.engine import BlockStats, EngineConfig, quantize_block
from quantlib.head import head_name, solve_head
from quantlib.qweight import QuantizedWeight
from quantlib.windows import WindowStats, forward_blocks, run_window
from quantlib.mixed import MixedConfig, plan_mixed, plan_to_json
from quantlib.spec import QuantSpec, Spec, spec_for

from .cache import key_fn, stable_hash
from .io import (atomic_save_safetensors, atomic_write_json, building_dir, file_ok, load_safetensors_verified,
                 sha256_file)
from .sources import load_model
from .partial import Skeleton, blocks_loaded, open_skeleton
from .shards import open_shard, seal_shard, shard_ok
from .textdata import read_token_ids

__all__ = ["QuantizeJob", "ran_on", "capture_activations", "mixed_plan_task", "quantize_block_task",
           "quantize_head_task", "fp_targets_task", "recon_window_task", "load_block_weights", "window_ok"]


@dataclass(frozen=True)
class QuantizeJob:
    """Everything that determines one block's result besides its inputs and FP weights."""

    spec: Spec  # a QuantSpec, or a quantlib.mixed plan (SpecMap): one scheme per Linear
    method: object  # a frozen quantlib method config (RTNConfig, GPTQConfig, ...)
    engine: EngineConfig
    stream_from_disk: bool = False
    dtype: str = "float32"  # the model's compute dtype (fetch_model.dtype); solves stay float32


_local = threading.local()  # one skeleton per thread: tasks on a thread pool never share a model


def _skeleton(model_dir: str, model_sha: str, dtype: str, trust_remote_code: bool) -> Skeleton:
    """The model's skeleton (blocks on meta) in `dtype`, kept for the next task of this thread on it."""
    held = getattr(_local, "skeleton", None)
    if held is None or held[0] != (model_dir, model_sha, dtype, trust_remote_code):
        _local.skeleton = held = ((model_dir, model_sha, dtype, trust_remote_code),
                                  open_skeleton(model_dir, model_sha, dtype=getattr(torch, dtype),
                                                trust_remote_code=trust_remote_code))
    return held[1]


def _device(device: str) -> str:
    """quantize.device where the task runs (a worker's GPU, not the driver's): auto is cuda when this
    process sees one, else cpu; cuda without CUDA here is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"quantize.device {device!r}, but this worker ({ran_on()}) sees no CUDA device; "
                           "run it on a GPU worker or set quantize.device: auto or cpu")
    return device


def _here(job: QuantizeJob) -> QuantizeJob:
    """The job with its device resolved where the task runs (_device)."""
    return replace(job, engine=replace(job.engine, device=_device(job.engine.device)))


def _calib(calib_path: str, calib_sha: str):
    return read_token_ids(calib_path, calib_sha)["calib"]


def _sha(record: dict | None) -> str | None:
    """A {"path", "sha"} file or shard record's identity: its content hash (None stays None)."""
    return None if record is None else record["sha"]


def _job_key(job: QuantizeJob) -> QuantizeJob:
    """The job as it identifies a result: the engine's spill_dir (a location; the tasks write where
    the cache says and never read it) is left out."""
    return replace(job, engine=replace(job.engine, spill_dir=None))


def _key(*names: str, **project: Callable[[Any], Any]) -> Callable[[Any, dict], str]:
    """tasks.cache.key_fn over `names`, the parameters in `project` first replaced by what
    identifies them (content hashes, not the paths they also carry: keys hold no paths)."""
    base = key_fn(*names)

    def fn(context: Any, parameters: dict) -> str:
        return base(context, {**parameters, **{n: f(parameters[n]) for n, f in project.items()}})

    return fn


@task(name="capture_activations", cache_key_fn=key_fn("model_sha", "calib_sha", "batch_size", "dtype"),
      persist_result=True)
def capture_activations(model_dir: str, model_sha: str, calib_path: str, calib_sha: str, batch_size: int,
                        cache_dir: str, dtype: str = "float32", trust_remote_code: bool = False) -> dict:
    """The first block's inputs for every calibration sequence, as a shard (no block is loaded)."""
    model = _skeleton(model_dir, model_sha, dtype, trust_remote_code).model
    batches, _ = capture_block_inputs(get_adapter(model), _calib(calib_path, calib_sha), batch_size)
    final = Path(cache_dir) / "acts" / stable_hash(["capture", model_sha, calib_sha, batch_size] +
                                                   ([] if dtype == "float32" else [dtype]))
    with building_dir(final) as tmp:
        return {"path": str(final), "sha": seal_shard(tmp, final, ActivationStore.from_batches(batches, tmp))}


@task(name="mixed_plan", cache_key_fn=key_fn("model_sha", "calib_sha", "cfg", "default", "dtype"), persist_result=True)
def mixed_plan_task(model_dir: str, model_sha: str, calib_path: str, calib_sha: str, cfg: MixedConfig,
                    default: QuantSpec, cache_dir: str, dtype: str = "float32", trust_remote_code: bool = False,
                    device: str = "cpu") -> dict:
    """quantlib.mixed's plan for the FP model on the calibration ids, as a JSON file (the plan and the
    measured costs it was chosen from); {path, sha}. `device` as quantize.device (auto: this worker's
    GPU if it has one); not in the key: where the Fisher pass ran is not what the plan is."""
    model = load_model(model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    model.to(_device(device))
    plan, units, target = plan_mixed(get_adapter(model), _calib(calib_path, calib_sha), cfg, default)
    final = Path(cache_dir) / "mixed" / f"{stable_hash(['mixed', model_sha, calib_sha, cfg, default, dtype])}.json"
    atomic_write_json(final, plan_to_json(plan, units, target, cfg))
    return {"path": str(final), "sha": sha256_file(final)}


def ran_on() -> str:
    """host:pid of the process running a task: logged and counted in stage metrics (which worker
    did the work), never written into an output."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _stats_dict(st: BlockStats) -> dict:
    return {"seconds": st.seconds, "peak_mb": st.peak_mb, "layer_errors": st.layer_errors,
            "block_error": st.block_error, "expert_tokens": st.expert_tokens, "shrunk_experts": st.shrunk_experts, "ran_on": ran_on(), "threads": torch.get_num_threads()}


@task(name="quantize_block", cache_key_fn=_key("model_sha", "index", "in_sha", "calib_sha", "job", job=_job_key),
      persist_result=True)
def quantize_block_task(model_dir: str, model_sha: str, index: int, in_path: str, in_sha: str, calib_path: str,
                        calib_sha: str, job: QuantizeJob, cache_dir: str, trust_remote_code: bool = False) -> dict:
    """Quantize block `index` given its input shard; writes its codes and its output shard."""
    sk = _skeleton(model_dir, model_sha, job.dtype, trust_remote_code)
    with blocks_loaded(sk, [index], model_sha) as model:
        return _quantize_block(get_adapter(model), model_sha, index, in_path, in_sha, calib_path, calib_sha, job,
                               cache_dir)  # keyed on `job` as given: _quantize_block resolves its device


def _quantize_block(adapter, model_sha: str, index: int, in_path: str, in_sha: str, calib_path: str, calib_sha: str,
                    job: QuantizeJob, cache_dir: str) -> dict:
    inputs = open_shard(Path(in_path), in_sha, in_memory=not job.stream_from_disk)
    call = capture_block_calls(adapter, _calib(calib_path, calib_sha))[index]  # one embedding pass: ~50 ms
    key = stable_hash(["block", model_sha, index, in_sha, calib_sha, _job_key(job)])
    final = Path(cache_dir) / "acts" / key
    engine = _here(job).engine
    with building_dir(final) as tmp:
        results, outputs, stats = quantize_block(adapter, index, inputs, call, job.spec, job.method, engine, str(tmp))
        tensors = {k: v for name, qw in results.items() for k, v in qw.state_dict(name).items()}
        qpath = Path(cache_dir) / "blocks" / f"{key}.safetensors"
        return {"index": index, "names": sorted(results), "qweights": str(qpath),
                "qweights_sha": atomic_save_safetensors(qpath, tensors),
                "out": str(final), "out_sha": seal_shard(tmp, final, outputs), "stats": _stats_dict(stats)}


@task(name="quantize_head", cache_key_fn=_key("model_sha", "in_sha", "job", job=_job_key), persist_result=True)
def quantize_head_task(model_dir: str, model_sha: str, in_path: str, in_sha: str, job: QuantizeJob, cache_dir: str,
                       trust_remote_code: bool = False) -> dict:
    """Quantize the LM head from the last block's output shard (quantlib.head); writes its codes."""
    adapter = get_adapter(_skeleton(model_dir, model_sha, job.dtype, trust_remote_code).model)
    inputs = open_shard(Path(in_path), in_sha, in_memory=False)  # one batch at a time
    name = head_name(adapter)
    qw, error = solve_head(adapter, inputs, spec_for(job.spec, name), job.method, _here(job).engine.device)
    qpath = Path(cache_dir) / "blocks" / f"{stable_hash(['head', model_sha, in_sha, _job_key(job)])}.safetensors"
    return {"names": [name], "qweights": str(qpath), "qweights_sha": atomic_save_safetensors(qpath, qw.state_dict(name)),
            "error": error, "ran_on": ran_on()}


def load_block_weights(record: dict) -> dict[str, QuantizedWeight]:
    tensors = load_safetensors_verified(record["qweights"], record["qweights_sha"])
    return {name: QuantizedWeight.from_state_dict(tensors, name) for name in record["names"]}


# ---------------------------------------------------------------------------------- reconstruction


@task(name="fp_targets", cache_key_fn=_key("model_sha", "in_sha", "calib_sha", "job", job=lambda j: j.dtype),
      persist_result=True)  # of the job only its dtype: every method and scheme shares the FP targets
def fp_targets_task(model_dir: str, model_sha: str, in_path: str, in_sha: str, calib_path: str, calib_sha: str,
                    job: QuantizeJob, cache_dir: str, trust_remote_code: bool = False) -> dict:
    """FP activations after every block (reconstruction targets): bounds[i] = output of block i.
    Blocks are read one at a time (host memory: one block + one boundary's activations)."""
    sk = _skeleton(model_dir, model_sha, job.dtype, trust_remote_code)
    adapter = get_adapter(sk.model)
    device = torch.device(_here(job).engine.device)
    calls = capture_block_calls(adapter, _calib(calib_path, calib_sha))
    x, bounds = open_shard(Path(in_path), in_sha, in_memory=False), []
    for i in range(len(adapter.blocks)):
        final = Path(cache_dir) / "acts" / stable_hash(["fp", model_sha, in_sha, calib_sha, i] +
                                                       ([] if job.dtype == "float32" else [job.dtype]))
        with building_dir(final) as tmp, blocks_loaded(sk, [i], model_sha):
            block = adapter.blocks[i]
            out = forward_blocks([block.to(device)], [calls[i].to(device)], x, device, spill_dir=str(tmp))
            block.to("cpu")
            bounds.append({"path": str(final), "sha": seal_shard(tmp, final, out)})
        x = open_shard(final, bounds[-1]["sha"], in_memory=False)
    return {"bounds": bounds}


def _carry_file(carry: dict[int, dict[str, torch.Tensor]], path: Path) -> dict | None:
    if not carry:
        return None
    tensors = {f"{i}/{k}": v.contiguous() for i, state in carry.items() for k, v in state.items()}
    return {"path": str(path), "sha": atomic_save_safetensors(path, tensors)}


def _read_carry(record: dict | None) -> dict[int, dict[str, torch.Tensor]]:
    if record is None:
        return {}
    carry: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in load_safetensors_verified(record["path"], record["sha"]).items():
        i, name = key.split("/", 1)
        carry.setdefault(int(i), {})[name] = v
    return carry


def _window_stats(st: WindowStats) -> dict:
    return {"start": st.start, "end": st.end, "loss_init": st.loss_init, "loss_final": st.loss_final,
            "kept_init": st.kept_init, "seconds": st.seconds, "peak_mb": st.peak_mb, "curve": st.curve,
            "skipped_steps": st.skipped_steps, "block_errors": st.block_errors, "heldout_batches": st.heldout_batches,
            "heldout_curve": st.heldout_curve, "best_iter": st.best_iter, "stopped_early": st.stopped_early,
            "bf16": st.bf16,
            "ran_on": ran_on(),
            "threads": torch.get_num_threads()}


@task(name="recon_window", cache_key_fn=_key("model_sha", "window", "next_start", "in_sha", "target", "carry",
                                             "calib_sha", "job", target=_sha, carry=_sha, job=_job_key),
      persist_result=True)
def recon_window_task(model_dir: str, model_sha: str, window: tuple[int, int], next_start: int, in_path: str,
                      in_sha: str, target: dict | None, carry: dict | None, calib_path: str, calib_sha: str,
                      job: QuantizeJob, cache_dir: str, trust_remote_code: bool = False) -> dict:
    """Reconstruct one window: its input shard (the finished quantized prefix's activations), its FP
    target shard, and the saved state of the blocks it shares with the previous window. Writes the
    codes of the blocks it finishes, the next window's input shard and its own carry file. Loads the
    window's blocks and the look-ahead blocks its loss runs through."""
    sk = _skeleton(model_dir, model_sha, job.dtype, trust_remote_code)
    n = len(get_adapter(sk.model).blocks)
    stop = min(window[1] + getattr(job.method, "lookahead", 0), n)
    with blocks_loaded(sk, range(window[0], stop), model_sha) as model:
        return _recon_window(get_adapter(model), model_sha, window, next_start, in_path, in_sha, target, carry,
                             calib_path, calib_sha, job, cache_dir)


def _recon_window(adapter, model_sha: str, window: tuple[int, int], next_start: int, in_path: str, in_sha: str,
                  target: dict | None, carry: dict | None, calib_path: str, calib_sha: str, job: QuantizeJob,
                  cache_dir: str) -> dict:
    in_memory = not job.stream_from_disk
    inputs = open_shard(Path(in_path), in_sha, in_memory=in_memory)
    targets = None if target is None else open_shard(Path(target["path"]), target["sha"], in_memory=in_memory)
    calls = capture_block_calls(adapter, _calib(calib_path, calib_sha))
    key = stable_hash(["window", model_sha, window, next_start, in_sha, _sha(target), _sha(carry), calib_sha,
                       _job_key(job)])
    final = Path(cache_dir) / "acts" / key
    with building_dir(final) as tmp:
        r = run_window(adapter, calls, inputs, targets, tuple(window), next_start, job.spec, job.method,
                       _here(job).engine, _read_carry(carry), spill_dir=str(tmp))
        tensors = {k: v for name, qw in r.results.items() for k, v in qw.state_dict(name).items()}
        qpath = Path(cache_dir) / "blocks" / f"{key}.safetensors"
        return {"window": list(window), "names": sorted(r.results), "qweights": str(qpath),
                "qweights_sha": atomic_save_safetensors(qpath, tensors), "out": str(final),
                "out_sha": seal_shard(tmp, final, r.outputs),
                "carry": _carry_file(r.carry, Path(cache_dir) / "carry" / f"{key}.safetensors"),
                "stats": _window_stats(r.stats)}


def window_ok(r: dict) -> bool:
    """A cached window's files are all present and intact."""
    files = [(r["qweights"], r["qweights_sha"])] + ([(r["carry"]["path"], r["carry"]["sha"])] if r["carry"] else [])
    return all(file_ok(f, sha) for f, sha in files) and shard_ok(Path(r["out"]), r["out_sha"])
