"""Chunked LM head: same numbers as the model's own logits, never more than one chunk of logits."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from quantlib.logits import chunked_sum, final_hidden, head_logits, position_chunks
from quantlib.perplexity import window_nll
from quantlib.qat import QATConfig, chunked_qat_loss, qat_loss, teacher_targets

from tiny import FAMILIES, tiny_config, tiny_ids, tiny_model


def _capped(family: str, cap: float | None):
    """A tiny model of `family`; cap sets final_logit_softcapping (small, so tanh bends the logits)."""
    import transformers as T
    config = tiny_config(family)
    if cap is not None:
        config.final_logit_softcapping = cap
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_then_head_is_the_models_own_logits(family):
    model = _capped(family, 0.5 if family in ("gemma2", "gemma3_text") else None)
    ids = tiny_ids(2, 12)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = head_logits(model, final_hidden(model, ids))
    assert want.abs().max() <= 0.5 + 1e-6 or family not in ("gemma2", "gemma3_text")  # the cap is active
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunks_cover_the_positions_within_the_budget():
    chunks = list(position_chunks(batch=3, positions=50, vocab=100, budget=3 * 100 * 7))
    assert [c.stop - c.start for c in chunks] == [7] * 7 + [1]
    assert chunks[0].start == 0 and chunks[-1].stop == 50
    assert [c.stop - c.start for c in position_chunks(4, 5, 10**6, budget=1)] == [1] * 5  # >= 1 position


class _HeadWidths:
    """Records the number of positions of every call to the LM head."""

    def __init__(self, model):
        self.widths = []
        model.get_output_embeddings().register_forward_hook(lambda m, args, out: self.widths.append(args[0].shape[1]))


@pytest.mark.parametrize("score_from", [0, 5])
def test_window_nll_in_chunks_equals_the_full_logits_formula(score_from):
    model, ids = tiny_model("gemma2"), tiny_ids(3, 20)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, score_from:-1].float()
    want = F.cross_entropy(logits.flatten(0, 1), ids[:, score_from + 1:].flatten(), reduction="sum").item()
    heads = _HeadWidths(model)
    got, n = window_nll(model, ids, score_from, budget=3 * 128 * 4)
    assert n == 3 * (19 - score_from)
    assert math.isclose(got, want, rel_tol=1e-5)
    assert max(heads.widths) == 4 and sum(heads.widths) == 19 - score_from  # 4 positions at a time


@pytest.mark.parametrize("topk", [0, 8])
def test_teacher_targets_in_chunks_equal_one_pass(topk):
    model, ids = tiny_model("qwen3"), tiny_ids(5, 16)
    heads = _HeadWidths(model)
    whole = teacher_targets(model, ids, topk=topk, batch_size=2, budget=10**9)
    assert heads.widths == [16, 16, 16]
    heads.widths.clear()
    chunked = teacher_targets(model, ids, topk=topk, batch_size=2, budget=2 * 128 * 3)
    assert heads.widths == [3, 3, 3, 3, 3, 1] * 2 + [6, 6, 4]  # batches of 2, 2, 1 rows
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert chunked[key].shape[:2] == (5, 16)
        torch.testing.assert_close(chunked[key], whole[key])


@pytest.mark.parametrize("loss,topk", [("ce", 8), ("kl", 8), ("kl", 0), ("ce+kl", 8)])
def test_chunked_qat_loss_equals_the_full_loss_in_value_and_gradient(loss, topk):
    model, ids = _capped("gemma3_text", 2.0), tiny_ids(3, 16)
    cfg = QATConfig(loss=loss, topk=topk, kl_weight=0.7)
    teacher = teacher_targets(tiny_model("gemma3_text", seed=1), ids, topk=topk) if cfg.needs_teacher else None
    params = [p for p in model.parameters() if p.requires_grad]

    want = qat_loss(model(input_ids=ids, use_cache=False).logits, ids, teacher, cfg)
    want_grads = torch.autograd.grad(want, params)
    heads = _HeadWidths(model)
    got = chunked_qat_loss(model, ids, teacher, cfg, budget=3 * 128 * 5)
    got_grads = torch.autograd.grad(got, params)

    assert max(heads.widths) == 5  # forward chunks and their recomputation in backward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


class _Casts(TorchDispatchMode):
    """Counts casts (aten._to_copy) of tensors of one shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.n = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_under_autocast_chunks_cast_the_head_once_and_score_as_before():
    model, ids = tiny_model("llama"), tiny_ids(3, 16)
    model.requires_grad_(False)
    hidden = final_hidden(model, ids).detach().requires_grad_(True)
    weight = model.get_output_embeddings().weight
    budget = 3 * weight.shape[0] * 5  # 4 chunks of positions: 5, 5, 5, 1

    def score(logits, sl):
        return (logits.logsumexp(-1) * torch.arange(1.0, 4.0)[:, None]).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = sum(score(head_logits(model, hidden[:, sl]), sl)  # the head called per chunk
                   for sl in position_chunks(3, 16, weight.shape[0], budget))
        (want_grad,) = torch.autograd.grad(want, hidden)
        with _Casts(weight.shape) as casts:
            got = chunked_sum(model, hidden, score, budget)
            (got_grad,) = torch.autograd.grad(got, hidden)
    assert casts.n == 1  # not once per chunk, nor again for each chunk recomputed in backward
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
