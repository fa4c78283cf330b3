"""The quantize stage's tasks: the same codes as the bare engine, cache keys without paths, shards
indexed from the bytes their writer hashed."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prefect import Task

import tasks.quantize as TQ
from quantlib.activations import ActivationStore
from quantlib.adapters import get_adapter
from quantlib.boa import BoAConfig
from quantlib.capture import capture_block_calls, run_block
from quantlib.engine import EngineConfig, quantize_model
from quantlib.gptq import GPTQConfig
from quantlib.spec import QuantSpec
from tasks.io import sha256_file, write_manifest
from tasks.shards import open_shard, seal_shard, shard_ok
from tasks.textdata import write_token_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quantlib"))  # the shared tiny models
from tiny import tiny_ids, tiny_model  # noqa: E402

SPEC = QuantSpec(3, 32)


def _task_path(tmp_path: Path, method, stream: bool) -> tuple[dict, list[dict]]:
    """capture_activations, then quantize_block_task per block, as the pipeline calls them."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")  # the tasks read the folder, as on a worker
    write_manifest(tmp_path / "model")
    calib = tmp_path / "calib.safetensors"
    calib_sha = write_token_ids(calib, {"calib": tiny_ids(8, 32)})
    job = TQ.QuantizeJob(SPEC, method, EngineConfig(batch_size=4, measure_block_error=True), stream_from_disk=stream)
    common = dict(model_dir=str(tmp_path / "model"), model_sha=sha256_file(tmp_path / "model" / "MANIFEST.json"),
                  calib_path=str(calib), calib_sha=calib_sha, cache_dir=str(tmp_path / "cache"))
    cap = TQ.capture_activations.fn(batch_size=4, **common)
    prev, codes, records = (cap["path"], cap["sha"]), {}, []
    for i in range(len(get_adapter(model).blocks)):
        rec = TQ.quantize_block_task.fn(index=i, in_path=prev[0], in_sha=prev[1], job=job, **common)
        codes |= TQ.load_block_weights(rec)
        records.append(rec | {"in": prev})
        prev = (rec["out"], rec["out_sha"])
    return codes, records


@pytest.mark.parametrize("method", [GPTQConfig(), BoAConfig()], ids=["gptq", "boa"])
@pytest.mark.parametrize("stream", [False, True], ids=["in_memory", "streamed"])
def test_task_path_gives_the_bare_engines_codes_bit_for_bit(tmp_path, method, stream):
    bare, _ = quantize_model(get_adapter(tiny_model("llama")), tiny_ids(8, 32), SPEC, method,
                             EngineConfig(batch_size=4))
    codes, records = _task_path(tmp_path, method, stream)
    assert codes.keys() == bare.keys()
    for k, qw in bare.items():
        for field in ("qweight", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(codes[k], field), getattr(qw, field)), (k, field)
    # the block error it reports is the FP block's relative output error on the block's input shard
    fp = get_adapter(tiny_model("llama"))
    calls = capture_block_calls(fp, tiny_ids(8, 32))
    for i, rec in enumerate(records):
        x, y = open_shard(Path(rec["in"][0]), rec["in"][1], True), open_shard(Path(rec["out"]), rec["out_sha"], True)
        with torch.no_grad():
            refs = [run_block(fp.blocks[i], xb, calls[i]) for xb in x]
        expected = sum(float((a - r).pow(2).sum()) for a, r in zip(y, refs)) / sum(float(r.pow(2).sum()) for r in refs)
        assert rec["stats"]["block_error"] == pytest.approx(expected, rel=1e-9)


def test_sealed_shard_indexes_the_writers_digests(tmp_path):
    store = ActivationStore.from_batches([torch.randn(2, 4, 8) for _ in range(3)], tmp_path / "s.tmp")
    sha = seal_shard(tmp_path / "s.tmp", tmp_path / "s", store)
    assert shard_ok(tmp_path / "s", sha)
    assert store.file_digests() == [sha256_file(f) for f in ActivationStore.open(tmp_path / "s").files()]
    fresh = ActivationStore.open(tmp_path / "s")  # a store that wrote nothing: seal hashes the files
    assert fresh.file_digests() is None and ActivationStore().file_digests() is None


# ------------------------------------------------------------------------------------- cache keys

_JOB = TQ.QuantizeJob(SPEC, GPTQConfig(), EngineConfig(batch_size=4, measure_block_error=True))


def _parameters(root: str, shas: dict[str, str] | None = None) -> dict:
    """A value for every parameter any quantize task takes; paths under `root` (absolute)."""
    sha = {"model": "a" * 64, "in": "b" * 64, "calib": "c" * 64, "target": "d" * 64, "carry": "e" * 64} | (shas or {})
    return {"model_dir": f"{root}/model", "model_sha": sha["model"], "calib_path": f"{root}/tokens/calib.safetensors",
            "calib_sha": sha["calib"], "batch_size": 4, "cache_dir": f"{root}/.cache/ptq", "index": 3,
            "in_path": f"{root}/.cache/ptq/acts/x", "in_sha": sha["in"], "window": (2, 4), "next_start": 3,
            "target": {"path": f"{root}/.cache/ptq/acts/t", "sha": sha["target"]},
            "carry": {"path": f"{root}/.cache/ptq/carry/c.safetensors", "sha": sha["carry"]},
            "job": TQ.QuantizeJob(_JOB.spec, _JOB.method, EngineConfig(batch_size=4, spill_dir=f"{root}/spill"))}


def _tasks() -> list[Task]:
    return [v for v in vars(TQ).values() if isinstance(v, Task)]


def _key(task: Task, params: dict) -> str:
    names = inspect.signature(task.fn).parameters
    return task.cache_key_fn(SimpleNamespace(task=task), {n: params[n] for n in names})


def test_every_quantize_task_keys_on_content_hashes_not_paths():
    tasks = _tasks()
    assert {t.name for t in tasks} == {"capture_activations", "quantize_block", "fp_targets", "recon_window"}
    for task in tasks:
        assert set(inspect.signature(task.fn).parameters) <= set(_parameters("/a"))  # every parameter covered
        here = _key(task, _parameters("/home/one/project"))  # key_fn refuses any path it is given
        assert here == _key(task, _parameters("/srv/two/checkout")), task.name  # another checkout: a hit
        for name in ("model", "in", "calib", "target", "carry"):  # model_sha, not model_dir, is in the key
            if f"{name}_sha" in inspect.signature(task.fn).parameters or name in inspect.signature(task.fn).parameters:
                assert _key(task, _parameters("/a", {name: "f" * 64})) != here, (task.name, name)


def test_window_key_covers_the_target_and_carry_being_absent():
    task = TQ.recon_window_task
    p = _parameters("/a")
    assert len({_key(task, p), _key(task, p | {"target": None}), _key(task, p | {"carry": None})}) == 3


def test_seal_shard_hashes_the_files_of_another_writer(tmp_path):
    other = ActivationStore.from_batches([torch.ones(1, 2, 3)], tmp_path / "other")
    ActivationStore.from_batches([torch.zeros(1, 2, 3)], tmp_path / "s.tmp")
    sha = seal_shard(tmp_path / "s.tmp", tmp_path / "s", other)  # a store that wrote other files
    assert shard_ok(tmp_path / "s", sha)
