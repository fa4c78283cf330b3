"""tasks.evaluate: per-source perplexity over prepared windows, markdown comparison table."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from quantlib.perplexity import perplexity
from tasks.evaluate import compare_ppl_table, evaluate_perplexity

VOCAB = 128


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def windows(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))  # (n, t)


@torch.no_grad()
def direct_ppl(model, ids: torch.Tensor) -> float:
    logits = model(ids).logits[:, :-1].double()  # (W, T-1, V)
    return math.exp(float(F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))))


def test_evaluate_perplexity_per_source_matches_direct_nll(model):
    by_source = {"wikitext2": windows(5, 24, 0), "c4": windows(3, 16, 1)}
    result = evaluate_perplexity(model, by_source, batch_size=2)
    assert list(result) == ["wikitext2", "c4"]
    for source, ids in by_source.items():
        assert result[source] == perplexity(model, ids, batch_size=2)
        assert result[source] == pytest.approx(direct_ppl(model, ids), rel=1e-5)
    # batching only changes the order of float64 sums
    assert evaluate_perplexity(model, by_source, batch_size=5)["wikitext2"] == pytest.approx(result["wikitext2"], rel=1e-6)


def test_evaluate_perplexity_rejects_empty_and_leaves_inputs(model):
    with pytest.raises(ValueError, match="no evaluation windows"):
        evaluate_perplexity(model, {})
    ids = windows(2, 8, 3)
    before = ids.clone()
    evaluate_perplexity(model, {"x": ids})
    assert torch.equal(ids, before)


def test_compare_ppl_table_layout():
    table = compare_ppl_table([
        {"run": "fp32", "wikitext2": 25.6234},
        {"run": "rtn w4pc", "wikitext2": 45.449, "c4": float("inf")},
        {"run": "a|b", "wikitext2": None},
    ])
    assert table.splitlines() == [
        "| run | wikitext2 | c4 |",
        "|---|---:|---:|",
        "| fp32 | 25.62 | - |",
        "| rtn w4pc | 45.45 | inf |",
        "| a\\|b | - | - |",
    ]
    assert table.endswith("\n")
    with pytest.raises(ValueError, match="no rows"):
        compare_ppl_table([])


def test_perplexity_task_runs_in_the_requested_dtype(model, tmp_path):
    """fetch_model.dtype reaches evaluation: the task loads the model in bf16 and scores what a bf16
    model gives (not the float32 number), with its own cache key."""
    from tasks.evaluation import ppl_task
    from tasks.textdata import write_token_ids

    model.save_pretrained(tmp_path / "m")
    ids = windows(3, 24, 1)
    sha = write_token_ids(tmp_path / "eval.safetensors", {"windows": ids})
    files = {"wikitext2": [str(tmp_path / "eval.safetensors"), sha]}
    run = lambda dtype: ppl_task.fn("model", str(tmp_path / "m"), "m", files, "f", 2, dtype=dtype)["wikitext2"]  # noqa: E731
    bf16 = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    assert run("float32") == pytest.approx(direct_ppl(model, ids), rel=1e-5)
    assert run("bfloat16") == pytest.approx(evaluate_perplexity(bf16, {"w": ids}, batch_size=2)["w"], rel=1e-6)
    assert run("bfloat16") != run("float32")
