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
