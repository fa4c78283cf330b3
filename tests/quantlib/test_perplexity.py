import math

import torch
import torch.nn.functional as F

from quantlib.perplexity import perplexity

from tiny import tiny_ids, tiny_model


def test_perplexity_matches_manual_nll_and_is_batch_invariant():
    model = tiny_model()
    ids = tiny_ids(5, 20)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="mean")
    assert abs(perplexity(model, ids, batch_size=2) - math.exp(nll.item())) < 1e-3
    assert perplexity(model, ids, batch_size=1) == perplexity(model, ids, batch_size=5) or \
        abs(perplexity(model, ids, batch_size=1) - perplexity(model, ids, batch_size=5)) < 1e-4


def test_strided_scoring_skips_context_tokens():
    model = tiny_model()
    ids = tiny_ids(2, 20)
    with torch.no_grad():
        logits = model(ids).logits[:, 10:-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), ids[:, 11:].reshape(-1))
    assert abs(perplexity(model, ids, score_from=10) - math.exp(nll.item())) < 1e-3
