"""Mixture-of-experts models (quantlib.moe): per-expert Linears that compute what transformers' fused
experts compute, Hessians from exactly the tokens the router sends each expert, the shrinkage of
rarely routed experts, checkpoint names, and releases that load back."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from quantlib.activations import ActivationStore
from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_inputs, run_block
from quantlib.engine import EngineConfig, quantize_block
from quantlib.gptq import GPTQConfig, accumulate_hessian
from quantlib.methods import quantize_weight
from quantlib.moe import LinearExperts, fused, is_router_tensor, routed_hessians
from quantlib.spec import QuantSpec

from tiny import MOE_FAMILIES, tiny_ids, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_compute_what_the_fused_ones_do_and_save_back(tmp_path, family):
    model, ids = tiny_model(family), tiny_ids(2, 24)
    ref = _logits(model, ids)
    adapter = get_adapter(model)  # unfuses
    assert any(isinstance(m, LinearExperts) for m in model.modules())
    assert torch.allclose(_logits(model, ids), ref, atol=1e-6, rtol=0)
    # every Linear of a block is a quantization target except the routers (full precision)
    for block in adapter.blocks:
        found = {n for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
        assert set(adapter.linears(block)) == found - {"mlp.shared_expert_gate"}
    with torch.no_grad():  # a change to one expert's Linear must survive save_pretrained
        adapter.linears(adapter.blocks[0])["mlp.experts.1.down_proj"].weight.mul_(0.5)
    changed = _logits(model, ids)
    with fused(model):
        model.save_pretrained(tmp_path)
    assert isinstance(adapter.blocks[0].mlp.experts, LinearExperts)  # swapped back after saving
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(again, ids), changed, atol=1e-6, rtol=0)
    assert not torch.allclose(changed, ref, atol=1e-6, rtol=0)


def test_groups_expand_every_expert_and_keep_dense_layers():
    """Qwen2-MoE: layer 1 is dense (mlp_only_layers); MoE layers put the shared expert first."""
    adapter = get_adapter(tiny_model("qwen2_moe"))
    moe, dense = adapter.groups(adapter.blocks[0]), adapter.groups(adapter.blocks[1])
    assert dense == adapter.family.groups
    assert moe[2][:2] == ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
    assert len(moe[2]) == 2 * 5 and len(moe[3]) == 5 and moe[3][-1] == "mlp.experts.3.down_proj"
    sets = adapter.input_sets(moe[2])
    assert sets[1] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"] and len(sets) == 5
    assert adapter.input_sets(adapter.family.groups[0]) == [list(adapter.family.groups[0])]


def test_expert_hessians_come_from_the_tokens_routed_to_it():
    """Mixtral block 0, GPTQ at 3 bits: each expert's counted tokens are the router's top-k choices,
    and its gate_proj codes are GPTQ's on H = 2/n X_e^T X_e of exactly those tokens."""
    model, ids = tiny_model("mixtral"), tiny_ids(8, 32)
    adapter = get_adapter(model)
    batches, calls = capture_block_inputs(adapter, ids, 4)
    block, spec = adapter.blocks[0], QuantSpec(3, 32)
    w_fp = {n: adapter.get_weight(m).detach().clone() for n, m in adapter.linears(block).items()}
    q, _, stats = quantize_block(adapter, 0, ActivationStore.from_batches(batches), calls[0], spec, GPTQConfig(),
                                 EngineConfig(batch_size=4, moe_min_tokens=1))
    # the experts back to FP, the attention quantized: the MLP input is then the one the engine's
    # gate/up pass saw (attention groups solved first)
    for n, m in adapter.linears(block).items():
        if n.startswith("mlp."):
            adapter.set_weight(m, w_fp[n])
    mlp_in = []
    hook = block.mlp.register_forward_pre_hook(lambda _m, args: mlp_in.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for x in batches:
            run_block(block, x, calls[0])
    hook.remove()
    x = torch.cat(mlp_in)
    _, _, top = block.mlp.gate(x)  # (N, k) expert indices
    for e in range(4):
        mine = x[(top == e).any(-1)]
        name = f"mlp.experts.{e}.gate_proj"
        assert stats.expert_tokens[name] == mine.shape[0]
        h, _ = accumulate_hessian(None, 0, mine)
        want = quantize_weight(w_fp[name].float(), h, spec, GPTQConfig())
        assert torch.equal(q[f"model.layers.0.{name}"].qweight, want.qweight), e
    assert sum(stats.expert_tokens[f"mlp.experts.{e}.gate_proj"] for e in range(4)) == x.shape[0] * 2
    assert stats.shrunk_experts == []


def test_rarely_routed_experts_are_shrunk_toward_the_layer_pool():
    g = torch.Generator().manual_seed(0)
    hs = {f"mlp.experts.{e}.down_proj": (lambda a: a @ a.t())(torch.randn(6, 6, generator=g)) for e in range(3)}
    tokens = {"mlp.experts.0.down_proj": 200, "mlp.experts.1.down_proj": 30, "mlp.experts.2.down_proj": 0}
    hs["mlp.experts.2.down_proj"] = None  # never called
    out, shrunk = routed_hessians(hs, tokens, min_tokens=100)
    pool = (hs["mlp.experts.0.down_proj"] * 200 + hs["mlp.experts.1.down_proj"] * 30) / 230
    assert shrunk == ["mlp.experts.1.down_proj", "mlp.experts.2.down_proj"]
    assert torch.equal(out["mlp.experts.0.down_proj"], hs["mlp.experts.0.down_proj"])
    assert torch.allclose(out["mlp.experts.2.down_proj"], pool)
    assert torch.allclose(out["mlp.experts.1.down_proj"], (30 * hs["mlp.experts.1.down_proj"] + 70 * pool) / 100)
    with pytest.raises(ValueError, match="no calibration token"):
        routed_hessians({"mlp.experts.0.up_proj": None}, {"mlp.experts.0.up_proj": 0}, 10)


def test_engine_reports_and_shrinks_experts_under_the_threshold():
    model, ids = tiny_model("qwen3_moe"), tiny_ids(4, 16)
    adapter = get_adapter(model)
    batches, calls = capture_block_inputs(adapter, ids, 4)
    call = calls[0]
    runs = {}
    for m in (1, 10_000):
        model = tiny_model("qwen3_moe")
        adapter = get_adapter(model)
        runs[m] = quantize_block(adapter, 0, ActivationStore.from_batches(batches), call, QuantSpec(3, 16),
                                 GPTQConfig(), EngineConfig(batch_size=4, moe_min_tokens=m))
    (qa, _, sa), (qb, _, sb) = runs[1], runs[10_000]
    assert sa.expert_tokens == sb.expert_tokens and sum(sa.expert_tokens.values()) == 2 * 2 * 64
    assert sa.shrunk_experts == [] and len(sb.shrunk_experts) == 8  # 4 experts x (gate/up, down)
    name = "model.layers.0.mlp.experts.0.down_proj"
    assert not torch.equal(qa[name].qweight, qb[name].qweight)
    attn = "model.layers.0.self_attn.q_proj"
    assert torch.equal(qa[attn].qweight, qb[attn].qweight)


def test_mixtral_release_uses_checkpoint_names_and_loads_back(tmp_path):
    """Mixtral's checkpoints name experts block_sparse_moe.experts.E.w1/w3/w2: the release keeps those
    names (every quantized module's weight is gone from the source tensors, nothing else), loads back
    to the fake-quant logits exactly (fp32 codes release), and a packed release keeps the router fp32."""
    from tasks.release import RELEASE_FORMAT, load_release, write_release_files

    from flows.commands import quantize_loaded
    from flows.methods import parse_method

    model = tiny_model("mixtral")
    (tmp_path / "src").mkdir()
    model.save_pretrained(tmp_path / "src")
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    results, _, _ = quantize_loaded(model, tiny_ids(4, 32), QuantSpec(4, 32), parse_method("gptq").base,
                                    EngineConfig(batch_size=2))
    write_release_files(tmp_path / "rel", tmp_path / "src", results, {"method": "gptq"}, fmt=RELEASE_FORMAT)
    info = json.loads((tmp_path / "rel" / "quantization.json").read_text())
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in info["modules"] and len(info["modules"]) == len(results)
    assert all(f"{n}.weight" in source for n in info["modules"])
    ids = tiny_ids(2, 24)
    assert torch.equal(_logits(load_release(tmp_path / "rel", verify=False), ids), _logits(model, ids))
    write_release_files(tmp_path / "gptq", tmp_path / "src", results, {"method": "gptq"}, fmt="gptq")
    packed = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    routers = [k for k in packed if is_router_tensor(k)]
    assert len(routers) == 3 and all(packed[k].dtype == torch.float32 for k in routers)
    assert packed["model.layers.0.input_layernorm.weight"].dtype == torch.float16
