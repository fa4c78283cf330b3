"""Prefect tasks of the quantize stage: capture block-0 inputs, quantize one block, assemble.

Each task reads verified files, makes one quantlib call and writes content-addressed files under
the project cache; its Prefect result is a small dict of paths + sha256, never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from prefect import task

from quantlib.activations import ActivationStore
from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_calls, capture_block_inputs
from quantlib.engine import BlockStats, EngineConfig, quantize_block
from quantlib.qweight import QuantizedWeight
from quantlib.windows import WindowStats, forward_blocks, run_window
from quantlib.spec import QuantSpec

from .cache import key_fn, stable_hash
from .io import atomic_save_safetensors, file_ok, load_safetensors_verified, temp_dir_beside
from .shards import open_shard, seal_shard, shard_ok
from .textdata import read_token_ids

__all__ = ["QuantizeJob", "capture_activations", "quantize_block_task", "fp_targets_task", "recon_window_task",
           "load_block_weights", "window_ok"]


@dataclass(frozen=True)
class QuantizeJob:
    """Everything that determines one block's result besides its inputs and FP weights."""

    spec: QuantSpec
    method: object  # a frozen quantlib method config (RTNConfig, GPTQConfig, ...)
    engine: EngineConfig
    stream_from_disk: bool = False


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


@task(name="capture_activations", cache_key_fn=key_fn("model_sha", "calib_sha", "batch_size"), persist_result=True)
def capture_activations(model, model_sha: str, calib_path: str, calib_sha: str, batch_size: int, cache_dir: str) -> dict:
    """The first block's inputs for every calibration sequence, as a shard."""
    batches, _ = capture_block_inputs(get_adapter(model), _calib(calib_path, calib_sha), batch_size)
    final = Path(cache_dir) / "acts" / stable_hash(["capture", model_sha, calib_sha, batch_size])
    tmp = temp_dir_beside(final)
    return {"path": str(final), "sha": seal_shard(tmp, final, ActivationStore.from_batches(batches, tmp))}


def _stats_dict(st: BlockStats) -> dict:
    return {"seconds": st.seconds, "peak_mb": st.peak_mb, "layer_errors": st.layer_errors,
            "block_error": st.block_error}


@task(name="quantize_block", cache_key_fn=_key("model_sha", "index", "in_sha", "calib_sha", "job", job=_job_key),
      persist_result=True)
def quantize_block_task(model, model_sha: str, index: int, in_path: str, in_sha: str, calib_path: str,
                        calib_sha: str, job: QuantizeJob, cache_dir: str) -> dict:
    """Quantize block `index` given its input shard; writes its codes and its output shard."""
    adapter = get_adapter(model)
    inputs = open_shard(Path(in_path), in_sha, in_memory=not job.stream_from_disk)
    call = capture_block_calls(adapter, _calib(calib_path, calib_sha))[index]  # one embedding pass: ~50 ms
    key = stable_hash(["block", model_sha, index, in_sha, calib_sha, _job_key(job)])
    final = Path(cache_dir) / "acts" / key
    tmp = temp_dir_beside(final)
    results, outputs, stats = quantize_block(adapter, index, inputs, call, job.spec, job.method, job.engine, str(tmp))
    tensors = {k: v for name, qw in results.items() for k, v in qw.state_dict(name).items()}
    qpath = Path(cache_dir) / "blocks" / f"{key}.safetensors"
    return {"index": index, "names": sorted(results), "qweights": str(qpath),
            "qweights_sha": atomic_save_safetensors(qpath, tensors),
            "out": str(final), "out_sha": seal_shard(tmp, final, outputs), "stats": _stats_dict(stats)}


def load_block_weights(record: dict) -> dict[str, QuantizedWeight]:
    tensors = load_safetensors_verified(record["qweights"], record["qweights_sha"])
    return {name: QuantizedWeight.from_state_dict(tensors, name) for name in record["names"]}


# ---------------------------------------------------------------------------------- reconstruction


@task(name="fp_targets", cache_key_fn=key_fn("model_sha", "in_sha", "calib_sha"), persist_result=True)
def fp_targets_task(model, model_sha: str, in_path: str, in_sha: str, calib_path: str, calib_sha: str,
                    job: QuantizeJob, cache_dir: str) -> dict:
    """FP activations after every block (reconstruction targets): bounds[i] = output of block i.
    Run before any block of `model` is quantized."""
    adapter = get_adapter(model)
    device = torch.device(job.engine.device)
    calls = capture_block_calls(adapter, _calib(calib_path, calib_sha))
    x, bounds = open_shard(Path(in_path), in_sha, in_memory=False), []
    for i, block in enumerate(adapter.blocks):
        final = Path(cache_dir) / "acts" / stable_hash(["fp", model_sha, in_sha, calib_sha, i])
        tmp = temp_dir_beside(final)
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
            "skipped_steps": st.skipped_steps, "block_errors": st.block_errors}


@task(name="recon_window", cache_key_fn=_key("model_sha", "window", "next_start", "in_sha", "target", "carry",
                                             "calib_sha", "job", target=_sha, carry=_sha, job=_job_key),
      persist_result=True)
def recon_window_task(model, model_sha: str, window: tuple[int, int], next_start: int, in_path: str, in_sha: str,
                      target: dict | None, carry: dict | None, calib_path: str, calib_sha: str, job: QuantizeJob,
                      cache_dir: str) -> dict:
    """Reconstruct one window: its input shard (the finished quantized prefix's activations), its FP
    target shard, and the saved state of the blocks it shares with the previous window. Writes the
    codes of the blocks it finishes, the next window's input shard and its own carry file."""
    adapter = get_adapter(model)
    in_memory = not job.stream_from_disk
    inputs = open_shard(Path(in_path), in_sha, in_memory=in_memory)
    targets = None if target is None else open_shard(Path(target["path"]), target["sha"], in_memory=in_memory)
    calls = capture_block_calls(adapter, _calib(calib_path, calib_sha))
    key = stable_hash(["window", model_sha, window, next_start, in_sha, _sha(target), _sha(carry), calib_sha,
                       _job_key(job)])
    final = Path(cache_dir) / "acts" / key
    tmp = temp_dir_beside(final)
    r = run_window(adapter, calls, inputs, targets, tuple(window), next_start, job.spec, job.method, job.engine,
                   _read_carry(carry), spill_dir=str(tmp))
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
