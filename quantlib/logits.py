"""Next-token scores without the full (batch, seq, vocab) fp32 logits.

The LM head runs on chunks of positions of the final hidden states. Gemma3's 262k vocabulary at
4 x 1024 tokens is 4.3 GB of fp32 logits (and as much again for log-softmax and its gradient), the
largest tensor of a run on a 270M model; a chunk holds at most `budget` logits (64 MB by default).

`final_hidden` + `head_logits` reproduce `model(ids).logits` for every supported family, Gemma2/3's
final logit soft-capping included (tests/quantlib/test_logits.py checks each family).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["LOGIT_BUDGET", "final_hidden", "head_logits", "position_chunks", "chunked_sum"]

LOGIT_BUDGET = 1 << 24  # fp32 logits per chunk: 16.8M elements = 64 MB


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, d) hidden states after the final norm, in the model's dtype."""
    return model.base_model(input_ids=ids, use_cache=False)[0]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(B, c, d) hidden states -> (B, c, V) fp32 logits, soft-capped as the model's own forward does."""
    return _softcap(model, model.get_output_embeddings()(hidden).float())


def _chunk_head(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """head_logits for many chunks of one pass. Under autocast a plain Linear head's weight is cast
    once here: autocast re-casts a weight that needs no gradient on every call, and the head is the
    model's largest matrix (49152 x 576 on SmolLM2), so a cast per chunk (and per recomputed chunk
    in backward) was most of a bf16 QAT step's copies. The logits are the same bit for bit."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or not torch.is_autocast_enabled(device.type):
        return lambda h: head_logits(model, h)
    dtype = torch.get_autocast_dtype(device.type)
    w = head.weight.to(dtype)
    b = None if head.bias is None else head.bias.to(dtype)
    return lambda h: _softcap(model, F.linear(h.to(dtype), w, b).float())


def _softcap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def position_chunks(batch: int, positions: int, vocab: int, budget: int = LOGIT_BUDGET) -> Iterator[slice]:
    """Slices of the position axis whose (batch, chunk, vocab) logits hold at most `budget` elements
    (at least one position per chunk)."""
    step = max(1, budget // max(1, batch * vocab))
    for start in range(0, positions, step):
        yield slice(start, min(start + step, positions))


def chunked_sum(model: nn.Module, hidden: torch.Tensor,
                score: Callable[[torch.Tensor, slice], torch.Tensor],
                budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """sum over position chunks c of score(head_logits(hidden[:, c]), c), a scalar.

    With autograd on and more than one chunk, each chunk is checkpointed: its logits are freed after
    its score and recomputed in backward, so the gradient never holds more than one chunk either
    (the price is one more head matmul per chunk in backward).
    """
    vocab = model.config.vocab_size
    slices = list(position_chunks(hidden.shape[0], hidden.shape[1], vocab, budget))
    total = hidden.new_zeros((), dtype=torch.float32)
    head = _chunk_head(model, hidden.device)
    for sl in slices:
        part = hidden[:, sl]
        if torch.is_grad_enabled() and len(slices) > 1:
            total = total + checkpoint(lambda h, sl=sl: score(head(h), sl), part, use_reentrant=False)
        else:
            total = total + score(head(part), sl)
    return total
