"""Global QAT's targets and loss: the FP teacher's next-token distributions, computed once and kept
compact (top-k log-probabilities and the tail's mass), and the training loss against them (cross-
entropy and/or KL), computed over chunks of positions so the full logits never exist at once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .logits import LOGIT_BUDGET, chunked_sum, final_hidden, head_logits, position_chunks

if TYPE_CHECKING:
    from .qat import QATConfig

__all__ = ["teacher_targets", "qat_loss", "chunked_qat_loss"]


@torch.no_grad()
def teacher_targets(model: nn.Module, calib: torch.Tensor, topk: int = 64,
                    batch_size: int = 4, budget: int = LOGIT_BUDGET) -> dict[str, torch.Tensor]:
    """The FP model's next-token distributions on calib (N, T), computed once: call it on the FP
    model, before quantizing. Returns plain CPU tensors (safetensors-ready):

      topk > 0:  "topk_logprobs" (N, T, k) fp32  log p of the teacher's k most likely tokens,
                 "topk_indices"  (N, T, k) int32 their token ids,
                 "tail_logprob"  (N, T)    fp32  log of the remaining mass 1 - sum(top-k p).
      topk == 0 (or topk >= vocab): "logprobs" (N, T, V) fp32, the full log-softmax.

    Memory: full logits for 128 x 512 tokens at vocab 49152 are 12.9 GB in fp32; top-64 values and
    int32 indices are 2 x 16.8 MB (+ 0.26 MB of tail), so top-k is the default and full is for small
    vocabularies only. The logits themselves exist `budget` elements at a time (quantlib.logits). The values are unnormalized log-probs of the full softmax, so the loss can use
    the exact tail mass (see `qat_loss`).
    """
    if calib.dim() != 2:
        raise ValueError(f"calib must be (N, T) token ids, got shape {tuple(calib.shape)}")
    if not (isinstance(topk, int) and not isinstance(topk, bool) and topk >= 0 and batch_size >= 1):
        raise ValueError("topk must be >= 0 and batch_size >= 1")
    device = next(model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {}
    for rows in torch.arange(calib.shape[0]).split(batch_size):
        hidden = final_hidden(model, calib[rows].to(device))  # (B, T, d)
        vocab = model.config.vocab_size
        for sl in position_chunks(hidden.shape[0], hidden.shape[1], vocab, budget):  # (B, c, V) at a time
            logp = F.log_softmax(head_logits(model, hidden[:, sl]), -1)
            for key, value in _compress(logp, topk).items():
                chunks.setdefault(key, []).append(value.cpu())
    # chunks come batch by batch, position chunks in order: cat positions within a batch, then batches
    return {key: _cat_batches(values, calib.shape[1]) for key, values in chunks.items()}


def _cat_batches(parts: list[torch.Tensor], seq: int) -> torch.Tensor:
    """Position chunks (B, c, ...) of consecutive batches -> (N, T, ...)."""
    rows, acc, done = [], [], 0
    for p in parts:
        acc.append(p)
        done += p.shape[1]
        if done == seq:
            rows.append(torch.cat(acc, 1))
            acc, done = [], 0
    return torch.cat(rows)


def _compress(logp: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    if topk == 0 or topk >= logp.shape[-1]:
        return {"logprobs": logp}
    values, indices = logp.topk(topk, dim=-1)  # (B, T, k)
    tail = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (B, T), exact, no 1 - sum cancellation
    return {"topk_logprobs": values, "topk_indices": indices.to(torch.int32), "tail_logprob": tail}


def _kl(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || q_student).

    Top-k form: both distributions are coarsened to k + 1 outcomes, the teacher's top-k tokens and one
    "everything else" bucket, and the KL of those is taken exactly:
        sum_{i in top-k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
    with q_tail the student's mass outside the teacher's top-k. It is a lower bound of the full KL
    (data processing), equals it when the tail is empty, and unlike renormalizing onto the top-k it
    still penalizes a student that moves mass into the tail.
    """
    return _kl_sum(logits, teacher) / logits.shape[:2].numel()


def _kl_sum(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the (B, c) positions of `_kl`'s per-token KL; teacher holds the same positions."""
    logq = F.log_softmax(logits.float(), -1)  # (B, c, V)
    if "logprobs" in teacher:
        logp = teacher["logprobs"]
        return (logp.exp() * (logp - logq)).sum()
    logp, idx, tail = teacher["topk_logprobs"], teacher["topk_indices"].long(), teacher["tail_logprob"]
    q_top = logq.gather(-1, idx)  # (B, c, k)
    q_tail = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (B, c)
    top = (logp.exp() * (logp - q_top)).sum(-1)
    return (top + tail.exp() * (tail - q_tail)).sum()


def qat_loss(logits: torch.Tensor, ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None,
             cfg: QATConfig) -> torch.Tensor:
    """logits (B, T, V), ids (B, T), teacher: the matching rows of `teacher_targets` (or None for "ce").
    ce: mean next-token NLL over the B (T - 1) predicted positions; kl: mean over all B T positions."""
    ce = kl = None
    if "ce" in cfg.loss:
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if cfg.needs_teacher:
        kl = _kl(logits, teacher)
    if ce is None:
        return kl
    return ce if kl is None else ce + cfg.kl_weight * kl


def chunked_qat_loss(model: nn.Module, ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None,
                     cfg: QATConfig, budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """`qat_loss(model(ids).logits, ids, teacher, cfg)` with the LM head run on chunks of positions
    (quantlib.logits): equal value and gradients, at most `budget` logits alive at once."""
    n, t = ids.shape
    hidden = final_hidden(model, ids)  # (B, T, d)

    def score(logits: torch.Tensor, sl: slice) -> torch.Tensor:  # logits (B, c, V) for positions sl
        total = logits.new_zeros(())
        if "ce" in cfg.loss:
            last = min(sl.stop, t - 1) - sl.start  # positions t <= T - 2 have a next token
            if last > 0:
                target = ids[:, sl.start + 1 : sl.start + 1 + last]
                ce = F.cross_entropy(logits[:, :last].flatten(0, 1), target.flatten(), reduction="sum")
                total = total + ce / (n * (t - 1))
        if cfg.needs_teacher:
            part = {k: v[:, sl] for k, v in teacher.items()}
            weight = cfg.kl_weight if "ce" in cfg.loss else 1.0
            total = total + weight * _kl_sum(logits, part) / (n * t)
        return total

    return chunked_sum(model, hidden, score, budget)
