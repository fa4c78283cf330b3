import subprocess
import sys

import pytest
import torch

from quantlib.adapters import get_adapter
from quantlib.engine import EngineConfig, quantize_model
from quantlib.gptq import GPTQConfig
from quantlib.rtn import RTNConfig
from quantlib.spec import QuantSpec

from tiny import tiny_ids, tiny_model

SPEC = QuantSpec(3, 32)


def _run(family="llama", cfg=EngineConfig(batch_size=4), method=GPTQConfig(), seed=0):
    model = tiny_model(family, seed=seed)
    res, stats = quantize_model(get_adapter(model), tiny_ids(8, 32), SPEC, method, cfg)
    return model, res, stats


def test_engine_is_deterministic_and_replaces_weights():
    m1, r1, s1 = _run()
    m2, r2, _ = _run()
    assert r1.keys() == r2.keys() and len(r1) == 3 * 7
    for k in r1:
        assert torch.equal(r1[k].qweight, r2[k].qweight)
        w = m1.get_submodule(k).weight
        torch.testing.assert_close(w, r1[k].dequantize())  # the model now holds the quantized weights
    assert all(s.layer_errors for s in s1)


@pytest.mark.parametrize("family", ["llama", "phi3", "opt", "gpt2", "gemma3_text"])
def test_gptq_engine_beats_rtn_on_model_output_error(family):
    ids = tiny_ids(8, 32)
    with torch.no_grad():
        ref = tiny_model(family)(ids).logits
    err = {}
    for name, method in (("rtn", RTNConfig()), ("gptq", GPTQConfig())):
        model = tiny_model(family)
        quantize_model(get_adapter(model), ids, QuantSpec(3, 32), method, EngineConfig(batch_size=4))
        with torch.no_grad():
            err[name] = float((model(ids).logits - ref).pow(2).mean())
    assert err["gptq"] < 0.9 * err["rtn"], err


def test_true_sequential_differs_from_parallel_but_both_valid():
    _, a, _ = _run(cfg=EngineConfig(batch_size=4, true_sequential=True))
    _, b, _ = _run(cfg=EngineConfig(batch_size=4, true_sequential=False))
    qkv = "model.layers.0.self_attn.q_proj"  # first group sees identical inputs either way
    assert torch.equal(a[qkv].qweight, b[qkv].qweight)
    assert not torch.equal(a["model.layers.0.mlp.down_proj"].qweight, b["model.layers.0.mlp.down_proj"].qweight)


def test_spilling_activations_to_disk_gives_identical_results(tmp_path):
    _, a, _ = _run(cfg=EngineConfig(batch_size=4))
    _, b, _ = _run(cfg=EngineConfig(batch_size=4, spill_dir=str(tmp_path / "spill")))
    assert all(torch.equal(a[k].qweight, b[k].qweight) for k in a)


def test_block_error_is_measured_and_small_at_8_bits():
    model = tiny_model()
    _, stats = quantize_model(get_adapter(model), tiny_ids(8, 32), QuantSpec(8, 32), GPTQConfig(),
                              EngineConfig(batch_size=4, measure_block_error=True))
    assert all(0 < s.block_error < 1e-3 for s in stats)


def test_quantlib_imports_no_orchestration_packages():
    code = (
        "import sys, pkgutil, importlib, quantlib\n"
        "for m in pkgutil.walk_packages(quantlib.__path__, 'quantlib.'): importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'dvc', 'yaml')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_data_free_path_returns_results_without_autograd_history():
    # the model's weights require grad by default; the codes and qparams must not hold graphs to them
    results, _ = quantize_model(get_adapter(tiny_model()), None, QuantSpec(4, 32), RTNConfig())
    assert all(qw.scale.grad_fn is None and not qw.scale.requires_grad for qw in results.values())


def _block_error_by_hand(family: str, index: int, inputs, call, outputs, batches: int) -> float:
    """||F_q(X) - F(X)||^2 / ||F(X)||^2 over the first `batches` batches, F from a fresh FP copy."""
    from quantlib.capture import run_block

    block = get_adapter(tiny_model(family)).blocks[index]
    num = den = 0.0
    with torch.no_grad():
        for i in range(batches):
            ref = run_block(block, inputs[i], call)
            num += float((outputs[i] - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / den


@pytest.mark.parametrize("family,method,true_sequential", [
    ("llama", GPTQConfig(), True), ("llama", GPTQConfig(), False), ("gemma3_text", GPTQConfig(), True),
    ("gpt2", GPTQConfig(), True), ("llama", "boa", True), ("llama", RTNConfig(), True)])
@pytest.mark.parametrize("batches", [None, 1])
def test_block_error_is_the_fp_blocks_output_error_and_leaves_the_codes_alone(family, method, true_sequential,
                                                                              batches):
    """F(X) is recorded from a pass quantization runs anyway (or a pass of its own); the error is
    exactly the one a fresh FP block gives, and measuring it changes no code."""
    from quantlib.activations import ActivationStore
    from quantlib.boa import BoAConfig
    from quantlib.capture import capture_block_inputs
    from quantlib.engine import quantize_block

    method = BoAConfig() if method == "boa" else method
    adapter = get_adapter(tiny_model(family))
    batches_in, calls = capture_block_inputs(adapter, tiny_ids(8, 32), 4)
    inputs = ActivationStore.from_batches(batches_in)
    codes = {}
    for measure in (False, True):
        model = tiny_model(family)
        cfg = EngineConfig(batch_size=4, true_sequential=true_sequential, measure_block_error=measure,
                           block_error_batches=batches)
        res, out, st = quantize_block(get_adapter(model), 1, inputs, calls[1], SPEC, method, cfg)
        codes[measure] = res
    assert codes[False].keys() == codes[True].keys()
    assert all(torch.equal(codes[False][k].qweight, codes[True][k].qweight) for k in codes[False])
    expected = _block_error_by_hand(family, 1, inputs, calls[1], out, batches or len(inputs))
    assert st.block_error == expected and st.block_error > 0


def test_block_error_batches_must_be_positive():
    with pytest.raises(ValueError, match="block_error_batches"):
        EngineConfig(block_error_batches=0)
