"""Prefect tasks of the quantize stage: capture block-0 inputs, quantize one block, assemble.

Each task reads verified files, makes one quantlib call and writes content-addressed files under
the project cache; its Prefect result is a small dict of paths + sha256, never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task

from quantlib.activations import ActivationStore
from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_calls, capture_block_inputs
from quantlib.engine import BlockStats, EngineConfig, quantize_block
from quantlib.qweight import QuantizedWeight
from quantlib.spec import QuantSpec

from .cache import key_fn, stable_hash
from .io import atomic_save_safetensors, fresh_dir, load_safetensors_verified
from .shards import open_shard, seal_shard
from .textdata import read_token_ids

__all__ = ["QuantizeJob", "capture_activations", "quantize_block_task", "load_block_weights"]


@dataclass(frozen=True)
class QuantizeJob:
    """Everything that determines one block's result besides its inputs and FP weights."""

    spec: QuantSpec
    method: object  # a frozen quantlib method config (RTNConfig, GPTQConfig, ...)
    engine: EngineConfig
    stream_from_disk: bool = False


def _calib(calib_path: str, calib_sha: str):
    return read_token_ids(calib_path, calib_sha)["calib"]


@task(name="capture_activations", cache_key_fn=key_fn("model_sha", "calib_sha", "batch_size"), persist_result=True)
def capture_activations(model, model_sha: str, calib_path: str, calib_sha: str, batch_size: int, cache_dir: str) -> dict:
    """The first block's inputs for every calibration sequence, as a shard."""
    batches, _ = capture_block_inputs(get_adapter(model), _calib(calib_path, calib_sha), batch_size)
    final = Path(cache_dir) / "acts" / stable_hash(["capture", model_sha, calib_sha, batch_size])
    tmp = fresh_dir(final.with_suffix(".tmp"))
    ActivationStore.from_batches(batches, tmp)
    return {"path": str(final), "sha": seal_shard(tmp, final)}


def _stats_dict(st: BlockStats) -> dict:
    return {"seconds": st.seconds, "peak_mb": st.peak_mb, "layer_errors": st.layer_errors,
            "block_error": st.block_error}


@task(name="quantize_block", cache_key_fn=key_fn("model_sha", "index", "in_sha", "calib_sha", "job"), persist_result=True)
def quantize_block_task(model, model_sha: str, index: int, in_path: str, in_sha: str, calib_path: str,
                        calib_sha: str, job: QuantizeJob, cache_dir: str) -> dict:
    """Quantize block `index` given its input shard; writes its codes and its output shard."""
    adapter = get_adapter(model)
    inputs = open_shard(Path(in_path), in_sha, in_memory=not job.stream_from_disk)
    call = capture_block_calls(adapter, _calib(calib_path, calib_sha))[index]
    key = stable_hash(["block", model_sha, index, in_sha, calib_sha, job])
    final = Path(cache_dir) / "acts" / key
    tmp = fresh_dir(final.with_suffix(".tmp"))
    results, _, stats = quantize_block(adapter, index, inputs, call, job.spec, job.method, job.engine, str(tmp))
    tensors = {k: v for name, qw in results.items() for k, v in qw.state_dict(name).items()}
    qpath = Path(cache_dir) / "blocks" / f"{key}.safetensors"
    return {"index": index, "names": sorted(results), "qweights": str(qpath),
            "qweights_sha": atomic_save_safetensors(qpath, tensors),
            "out": str(final), "out_sha": seal_shard(tmp, final), "stats": _stats_dict(stats)}


def load_block_weights(record: dict) -> dict[str, QuantizedWeight]:
    tensors = load_safetensors_verified(record["qweights"], record["qweights_sha"])
    return {name: QuantizedWeight.from_state_dict(tensors, name) for name in record["names"]}
