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
from quantlib.mixed import MixedConfig, plan_from_json, plan_mixed
from quantlib.spec import QuantSpec, SpecMap
from tasks.io import read_json_verified, sha256_file, write_manifest
from tasks.shards import open_shard, seal_shard, shard_ok
from tasks.textdata import write_token_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quantlib"))  # the shared tiny models
from tiny import tiny_ids, tiny_model  # noqa: E402

SPEC = QuantSpec(3, 32)


def _task_path(tmp_path: Path, method, stream: bool, dtype: str = "float32") -> tuple[dict, list[dict]]:
    """capture_activations, then quantize_block_task per block, as the pipeline calls them."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")  # the tasks read the folder, as on a worker
    write_manifest(tmp_path / "model")
    calib = tmp_path / "calib.safetensors"
    calib_sha = write_token_ids(calib, {"calib": tiny_ids(8, 32)})
    job = TQ.QuantizeJob(SPEC, method, EngineConfig(batch_size=4, measure_block_error=True), stream_from_disk=stream,
                         dtype=dtype)
    common = dict(model_dir=str(tmp_path / "model"), model_sha=sha256_file(tmp_path / "model" / "MANIFEST.json"),
                  calib_path=str(calib), calib_sha=calib_sha, cache_dir=str(tmp_path / "cache"))
    cap = TQ.capture_activations.fn(batch_size=4, dtype=dtype, **common)
    prev, codes, records = (cap["path"], cap["sha"]), {}, []
    for i in range(len(get_adapter(model).blocks)):
        rec = TQ.quantize_block_task.fn(index=i, in_path=prev[0], in_sha=prev[1], job=job, **common)
        codes |= TQ.load_block_weights(rec)
        records.append(rec | {"in": prev})
        prev = (rec["out"], rec["out_sha"])
    return codes, records


def test_a_mixed_plan_through_the_tasks_is_the_bare_engines(tmp_path):
    """mixed_plan_task's file read back (sha-checked) is the plan quantlib makes; the block tasks and the
    head task on it give the bare engine's codes for the same plan, the head on the plan's default."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    write_manifest(tmp_path / "model")
    ids = tiny_ids(8, 32)
    calib = tmp_path / "calib.safetensors"
    common = dict(model_dir=str(tmp_path / "model"), model_sha=sha256_file(tmp_path / "model" / "MANIFEST.json"),
                  calib_path=str(calib), calib_sha=write_token_ids(calib, {"calib": ids}), cache_dir=str(tmp_path / "c"))
    cfg, default = MixedConfig((QuantSpec(2, 32), QuantSpec(4, 32)), bits=3.2, samples=4), QuantSpec(3, 32)
    rec = TQ.mixed_plan_task.fn(cfg=cfg, default=default, **common)
    plan = plan_from_json(read_json_verified(rec["path"], rec["sha"]))
    want, _, _ = plan_mixed(get_adapter(tiny_model("llama")), ids, cfg, default)
    assert plan == want and {s for _, s in plan.layers} == set(cfg.candidates)
    job = TQ.QuantizeJob(plan, GPTQConfig(), EngineConfig(batch_size=4))
    cap = TQ.capture_activations.fn(batch_size=4, **common)
    prev, codes = (cap["path"], cap["sha"]), {}
    for i in range(3):
        r = TQ.quantize_block_task.fn(index=i, in_path=prev[0], in_sha=prev[1], job=job, **common)
        codes |= TQ.load_block_weights(r)
        prev = (r["out"], r["out_sha"])
    head = {k: common[k] for k in ("model_dir", "model_sha", "cache_dir")}
    codes |= TQ.load_block_weights(TQ.quantize_head_task.fn(in_path=prev[0], in_sha=prev[1], job=job, **head))
    bare, _ = quantize_model(get_adapter(tiny_model("llama")), ids, plan, GPTQConfig(), EngineConfig(batch_size=4),
                             head=True)
    assert codes.keys() == bare.keys() and codes["lm_head"].spec == default
    for k, qw in bare.items():
        assert qw.spec == codes[k].spec and torch.equal(qw.qweight, codes[k].qweight), k


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
            "calib_sha": sha["calib"], "batch_size": 4, "cache_dir": f"{root}/.cache/ptq", "index": 3, "dtype": "float32",
            "trust_remote_code": False,
            "in_path": f"{root}/.cache/ptq/acts/x", "in_sha": sha["in"], "window": (2, 4), "next_start": 3,
            "target": {"path": f"{root}/.cache/ptq/acts/t", "sha": sha["target"]},
            "carry": {"path": f"{root}/.cache/ptq/carry/c.safetensors", "sha": sha["carry"]},
            "job": TQ.QuantizeJob(_JOB.spec, _JOB.method, EngineConfig(batch_size=4, spill_dir=f"{root}/spill")),
            "cfg": MixedConfig((QuantSpec(2, 64), QuantSpec(3, 64))), "default": QuantSpec(2, 64), "device": "cpu"}


def test_a_mixed_plan_keys_its_candidates_size_and_samples_and_the_block_tasks_key_the_plan():
    """A plan changes with what it was asked (candidates, size, Fisher sequences, the uniform scheme it
    is sized on); a block task with a plan differs from one without and from one with another plan."""
    p, task = _parameters("/a"), TQ.mixed_plan_task
    cfgs = [p["cfg"], MixedConfig((QuantSpec(2, 64), QuantSpec(4, 64))), MixedConfig(p["cfg"].candidates, 2.4),
            MixedConfig(p["cfg"].candidates, samples=8)]
    keys = {_key(task, p | {"cfg": c}) for c in cfgs} | {_key(task, p | {"default": QuantSpec(3, 64)})}
    assert len(keys) == 5
    assert _key(task, p | {"device": "cuda"}) == _key(task, p)  # where the Fisher pass ran is not what the plan is
    plans = [SpecMap(SPEC, (("model.layers.0.mlp.down_proj", QuantSpec(w, 64)),)) for w in (2, 4)]
    jobs = [p["job"]] + [TQ.QuantizeJob(plan, _JOB.method, p["job"].engine) for plan in plans]
    assert len({_key(TQ.quantize_block_task, p | {"job": j}) for j in jobs}) == 3


def _tasks() -> list[Task]:
    return [v for v in vars(TQ).values() if isinstance(v, Task)]


def _key(task: Task, params: dict) -> str:
    names = inspect.signature(task.fn).parameters
    return task.cache_key_fn(SimpleNamespace(task=task), {n: params[n] for n in names})


def test_every_quantize_task_keys_on_content_hashes_not_paths():
    tasks = _tasks()
    assert {t.name for t in tasks} == {"capture_activations", "quantize_block", "quantize_head", "fp_targets",
                                       "recon_window", "mixed_plan"}
    for task in tasks:
        assert set(inspect.signature(task.fn).parameters) <= set(_parameters("/a"))  # every parameter covered
        here = _key(task, _parameters("/home/one/project"))  # key_fn refuses any path it is given
        assert here == _key(task, _parameters("/srv/two/checkout")), task.name  # another checkout: a hit
        for name in ("model", "in", "calib", "target", "carry"):  # model_sha, not model_dir, is in the key
            if f"{name}_sha" in inspect.signature(task.fn).parameters or name in inspect.signature(task.fn).parameters:
                assert _key(task, _parameters("/a", {name: "f" * 64})) != here, (task.name, name)


def test_the_compute_dtype_is_in_every_key_and_the_method_not_in_the_fp_targets_key():
    p = _parameters("/a")
    assert _key(TQ.capture_activations, p) != _key(TQ.capture_activations, p | {"dtype": "bfloat16"})
    bf16 = TQ.QuantizeJob(_JOB.spec, _JOB.method, _JOB.engine, dtype="bfloat16")
    rtn = TQ.QuantizeJob(QuantSpec(4, None), BoAConfig(), _JOB.engine)
    for task in (TQ.quantize_block_task, TQ.quantize_head_task, TQ.recon_window_task, TQ.fp_targets_task):
        assert _key(task, p) != _key(task, p | {"job": bf16}), task.name
    assert _key(TQ.fp_targets_task, p) == _key(TQ.fp_targets_task, p | {"job": rtn})  # shared by every method


def test_window_key_covers_the_target_and_carry_being_absent():
    task = TQ.recon_window_task
    p = _parameters("/a")
    assert len({_key(task, p), _key(task, p | {"target": None}), _key(task, p | {"carry": None})}) == 3


def test_seal_shard_hashes_the_files_of_another_writer(tmp_path):
    other = ActivationStore.from_batches([torch.ones(1, 2, 3)], tmp_path / "other")
    ActivationStore.from_batches([torch.zeros(1, 2, 3)], tmp_path / "s.tmp")
    sha = seal_shard(tmp_path / "s.tmp", tmp_path / "s", other)  # a store that wrote other files
    assert shard_ok(tmp_path / "s", sha)


_FRESH = """
import json, sys
import tasks.quantize as TQ
from quantlib.engine import EngineConfig
from quantlib.gptq import GPTQConfig
from quantlib.spec import QuantSpec
refs = json.loads(sys.argv[1])
job = TQ.QuantizeJob(QuantSpec(3, 32), GPTQConfig(), EngineConfig(batch_size=4, measure_block_error=True))
rec = TQ.quantize_block_task.fn(job=job, **refs)
print(json.dumps({k: rec[k] for k in ("qweights_sha", "out_sha", "names")}))
"""


def test_a_task_run_in_a_fresh_process_from_its_references_gives_the_in_process_result(tmp_path):
    """What a Dask/Ray worker does: a new interpreter, nothing but file references and the job."""
    import json
    import subprocess

    codes, records = _task_path(tmp_path / "here", GPTQConfig(), False)
    common = {"model_dir": str(tmp_path / "here" / "model"), "calib_path": str(tmp_path / "here" / "calib.safetensors")}
    rec = records[1]  # block 1: its input is block 0's output shard, as on a worker mid-chain
    refs = dict(common, model_sha=sha256_file(tmp_path / "here" / "model" / "MANIFEST.json"), index=1,
                in_path=rec["in"][0], in_sha=rec["in"][1], calib_sha=sha256_file(tmp_path / "here" / "calib.safetensors"),
                cache_dir=str(tmp_path / "elsewhere"))
    done = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(refs)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh == {k: rec[k] for k in ("qweights_sha", "out_sha", "names")}


def test_sealing_content_another_writer_already_sealed_keeps_theirs(tmp_path):
    """Two checkouts or hosts sharing a storage root compute the same shard: the first one stays."""
    batches = [torch.randn(2, 4, 8)]
    ActivationStore.from_batches(batches, tmp_path / "a.tmp")
    sha = seal_shard(tmp_path / "a.tmp", tmp_path / "s")
    inode = (tmp_path / "s" / "SHARD.json").stat().st_ino
    ActivationStore.from_batches(batches, tmp_path / "b.tmp")
    assert seal_shard(tmp_path / "b.tmp", tmp_path / "s") == sha
    assert (tmp_path / "s" / "SHARD.json").stat().st_ino == inode and not (tmp_path / "b.tmp").exists()
    ActivationStore.from_batches([torch.zeros(2, 4, 8)], tmp_path / "c.tmp")  # different content: replaced
    other = seal_shard(tmp_path / "c.tmp", tmp_path / "s")
    assert other != sha and shard_ok(tmp_path / "s", other)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only worker")
def test_the_device_is_resolved_where_the_task_runs_not_on_the_driver():
    job = TQ.QuantizeJob(SPEC, GPTQConfig(), EngineConfig(batch_size=4, device="auto"))
    assert TQ._here(job).engine.device == "cpu" and job.engine.device == "auto"  # the key keeps "auto"
    with pytest.raises(RuntimeError, match="sees no CUDA device; run it on a GPU worker"):
        TQ._here(TQ.QuantizeJob(SPEC, GPTQConfig(), EngineConfig(batch_size=4, device="cuda")))


def test_bfloat16_blocks_halve_the_shards_and_give_nearly_the_float32_codes(tmp_path):
    codes32, recs32 = _task_path(tmp_path / "f32", GPTQConfig(), False)
    codes16, recs16 = _task_path(tmp_path / "bf16", GPTQConfig(), False, dtype="bfloat16")
    out32, out16 = (open_shard(Path(r[-1]["out"]), r[-1]["out_sha"], True) for r in (recs32, recs16))
    assert all(b.dtype == torch.bfloat16 for b in out16) and all(b.dtype == torch.float32 for b in out32)
    size = lambda recs: sum(f.stat().st_size for f in Path(recs[-1]["out"]).glob("*.safetensors"))  # noqa: E731
    assert size(recs16) < 0.55 * size(recs32)
    # the solves ran in float32 on bf16-rounded weights and inputs: nearly the same codes and errors
    agree = [(codes16[k].qweight == qw.qweight).float().mean().item() for k, qw in codes32.items()]
    errors = [(r16["stats"]["block_error"], r32["stats"]["block_error"]) for r16, r32 in zip(recs16, recs32)]
    assert min(agree) > 0.6 and sum(agree) / len(agree) > 0.8  # 3-bit codes: chance agreement is ~1/8
    assert all(0.8 < e16 / e32 < 1.25 for e16, e32 in errors), errors
