"""The LM head as a quantization target (opt-in: quantize.targets).

On small models the head is a large share of the weights (SmolLM2-135M: 28M of 135M, tied to the
input embeddings). It is solved after the last block, from that block's outputs with the final norm
applied (the head's true inputs on the quantized prefix): GPTQ with H = 2/N sum x x^T for the
Hessian methods (gptq, boa: attention-aware Hessians do not apply to the head; recon: its
initialization method, and GPTQ where that is round-to-nearest: the head is in no window, so a
data-free start would be its final codes), round-to-nearest for rtn.

Tied embeddings: quantizing the head unties it. The input embeddings stay full precision, the
release stores both and says tie_word_embeddings: false (`untie_head`).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .adapters import ModelAdapter
from .gptq import accumulate_hessian
from .methods import hessian_error, method_for, quantize_weight
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = ["HEAD_TARGETS", "head_name", "head_method", "head_inputs", "solve_head", "untie_head"]

HEAD_TARGETS = ("blocks", "lm_head")  # what quantize.targets may name


def head_name(adapter: ModelAdapter) -> str:
    """Module path of the LM head (the name its packed tensors carry)."""
    return adapter.family.head


def head_method(method_cfg: object) -> object:
    """The per-Linear method the head is solved with, for a job's method config."""
    from .gptq import GPTQConfig
    from .recon import ReconConfig
    from .windows import _init_method

    if not isinstance(method_cfg, ReconConfig):
        return method_cfg
    # in no window: an RTN start would never be refined, GPTQ on the prefix's outputs costs one solve
    return GPTQConfig(damp=method_cfg.init_damp) if method_cfg.init == "rtn" else _init_method(method_cfg)


def head_inputs(adapter: ModelAdapter, last_output: torch.Tensor) -> torch.Tensor:
    """(B, T, d) output of the last block -> (B, T, d') what the head reads: the final norm, then
    OPT's project_out where the model has one."""
    x = adapter.norm(last_output)
    proj = getattr(adapter.model.get_submodule(adapter.family.norm.rpartition(".")[0]), "project_out", None)
    return x if proj is None else proj(x)


@torch.no_grad()
def solve_head(adapter: ModelAdapter, last_outputs: Iterable[torch.Tensor], spec: QuantSpec, method_cfg: object,
               device: str | torch.device = "cpu") -> tuple[QuantizedWeight, float | None]:
    """Quantize the head's (vocab, d) weight from the last block's output batches (B, T, d), without
    changing the model. Returns the codes and the Hessian error tr(D H D^T) / tr(W H W^T) (None for
    data-free methods)."""
    cfg = head_method(method_cfg)
    w = adapter.head.weight.detach().float().to(device)  # nn.Linear (vocab, d) in every family, GPT-2 too
    if not method_for(cfg).needs_hessian:
        return quantize_weight(w, None, spec, cfg), None
    h, count = None, 0
    for y in last_outputs:
        x = head_inputs(adapter, y.to(adapter.head.weight.device))  # where the model is (the CPU skeleton)
        h, count = accumulate_hessian(h, count, x.to(device).float())
    qw = quantize_weight(w, h, spec, cfg)
    return qw, hessian_error(w, qw.dequantize().to(device), h)


def untie_head(model: nn.Module, weight: torch.Tensor) -> None:
    """Give the head its own parameter holding `weight` (vocab, d); the input embeddings keep theirs."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(weight.to(head.weight.dtype).to(head.weight.device), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
