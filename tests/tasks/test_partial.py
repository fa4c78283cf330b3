"""tasks.partial: a task loads the skeleton and its own blocks, and computes exactly what the
whole loaded model computes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_calls, run_block
from quantlib.engine import EngineConfig, quantize_block
from quantlib.activations import ActivationStore
from quantlib.gptq import GPTQConfig
from quantlib.spec import QuantSpec
from tasks.io import IntegrityError, sha256_file, write_manifest
from tasks.partial import blocks_loaded, meta_model, open_skeleton
from tasks.sources import load_model
from tests.quantlib.tiny import FAMILIES, tiny_ids, tiny_model


def _folder(tmp_path: Path, family: str) -> tuple[Path, str]:
    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder)
    write_manifest(folder)
    return folder, sha256_file(folder / "MANIFEST.json")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_block_loaded_computes_what_the_whole_model_does(tmp_path, family):
    folder, sha = _folder(tmp_path, family)
    full = get_adapter(load_model(folder))
    sk = open_skeleton(folder, sha)
    part = get_adapter(sk.model)
    assert all(p.is_meta for b in part.blocks for p in b.parameters())
    ids = tiny_ids(2, 16)
    calls_full, calls_part = capture_block_calls(full, ids), capture_block_calls(part, ids)
    x = torch.randn(2, 16, full.model.config.hidden_size if hasattr(full.model.config, "hidden_size")
                    else full.model.config.n_embd, generator=torch.Generator().manual_seed(1))
    with blocks_loaded(sk, [1], sha):
        assert not any(p.is_meta for p in part.blocks[1].parameters())
        assert all(p.is_meta for p in part.blocks[0].parameters())
        with torch.no_grad():
            got = run_block(part.blocks[1], x, calls_part[1])
    with torch.no_grad():
        want = run_block(full.blocks[1], x, calls_full[1])
    assert torch.equal(got, want)
    assert all(p.is_meta for p in part.blocks[1].parameters()), "a finished task's block must be dropped"


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])  # mixtral: checkpoint names differ from modules
def test_quantized_block_codes_equal_the_whole_model_ones(tmp_path, family):
    folder, sha = _folder(tmp_path, family)
    spec, cfg = QuantSpec(bits=3, group_size=16), EngineConfig(batch_size=4)
    ids = tiny_ids(8, 16)
    results = []
    for adapter_of in (lambda: get_adapter(load_model(folder)), None):
        if adapter_of is None:
            sk = open_skeleton(folder, sha)
            with blocks_loaded(sk, [0], sha):
                results.append(_quantize0(get_adapter(sk.model), ids, spec, cfg, tmp_path / "b"))
        else:
            results.append(_quantize0(adapter_of(), ids, spec, cfg, tmp_path / "a"))
    (qa, outa), (qb, outb) = results
    assert qa.keys() == qb.keys()
    for name in qa:
        assert torch.equal(qa[name].qweight, qb[name].qweight) and torch.equal(qa[name].scale, qb[name].scale)
    assert all(torch.equal(a, b) for a, b in zip(outa, outb))


def _quantize0(adapter, ids, spec, cfg, spill):
    from quantlib.capture import capture_block_inputs

    batches, _ = capture_block_inputs(adapter, ids, cfg.batch_size)
    call = capture_block_calls(adapter, ids)[0]
    q, out, _ = quantize_block(adapter, 0, ActivationStore.from_batches(batches), call, spec, GPTQConfig(), cfg)
    return q, out


def test_a_model_other_than_the_key_names_is_refused(tmp_path):
    folder, sha = _folder(tmp_path, "llama")
    with pytest.raises(IntegrityError, match="MANIFEST.json does not hash to the model_sha"):
        open_skeleton(folder, "0" * 64)
    sk = open_skeleton(folder, sha)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor (a block weight), after the skeleton was verified
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors: sha256 differs"):
        with blocks_loaded(sk, [2], sha):
            pass


def test_meta_model_has_shapes_and_no_memory(tmp_path):
    folder, _ = _folder(tmp_path, "qwen3")
    model = meta_model(folder)
    assert all(p.is_meta for p in model.parameters())
    assert len(get_adapter(model).blocks) == 3


def test_models_built_in_two_threads_at_once_keep_their_weights(tmp_path):
    # The threads runner builds models concurrently; accelerate's init_empty_weights (meta_model)
    # patches nn.Module.register_parameter for the whole process, so without MODEL_CONSTRUCTION a
    # load_model running meanwhile ends with parameters on the meta device.
    import threading

    folder, _ = _folder(tmp_path, "qwen3")
    want = load_model(folder).state_dict()
    stop, errors = threading.Event(), []

    def build_meta() -> None:
        while not stop.is_set():
            meta_model(folder)

    other = threading.Thread(target=build_meta)
    other.start()
    try:
        for _ in range(20):
            try:
                got = load_model(folder).state_dict()
            except NotImplementedError as e:  # "Cannot copy out of meta tensor"
                errors.append(str(e))
                continue
            assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        stop.set()
        other.join()
    assert not errors
