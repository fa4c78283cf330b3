"""Mixture-of-experts blocks as one nn.Linear per expert projection, and the routed-token Hessians.

transformers keeps a sparse MLP's experts as two 3-D parameters (`gate_up_proj` (E, 2I, d),
`down_proj` (E, d, I)) behind one module. Quantization works per Linear, so `unfuse_experts` swaps
that module for `LinearExperts`: experts.{e}.gate_proj / up_proj / down_proj, the same routing
arithmetic, and each Linear then sees exactly the tokens the router sends to its expert (its
Hessian, its reconstruction gradient). The router stays a plain parameter, never quantized.

`fused(model)` puts the 3-D parameters back for save_pretrained. `checkpoint_name` / `module_name`
translate between these module names and a family's checkpoint tensor names (Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["ExpertMLP", "LinearExperts", "unfuse_experts", "fused", "is_expert_linear", "is_router_tensor",
           "routed_hessians",
           "checkpoint_name", "module_name", "MIXTRAL_RENAMES"]

# (module-name pattern, checkpoint-name pattern): Mixtral's checkpoints predate the gate/up/down names
MIXTRAL_RENAMES = (
    (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
    (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
    (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
    (r"\.mlp\.gate\.", r".block_sparse_moe.gate."),
)
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.(gate_proj|up_proj|down_proj)$")
# a sparse MLP's router (and Qwen2-MoE's shared-expert gate): tiny, and where a rounding flips a routing
_ROUTER = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.(gate|shared_expert_gate)\.weight$")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)); x (n, d) -> (n, d)."""

    def __init__(self, hidden: int, inter: int, act: nn.Module, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.ModuleList):
    """The experts of one sparse MLP as ExpertMLPs, called as transformers calls its fused module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (N, d); top_k_index, top_k_weights (N, k) -> sum_k w_k expert_k(x): (N, d).
        An index outside [0, E) (expert parallelism's padding) selects nothing, as in transformers."""
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue  # its Linears are not called: no tokens, no Hessian rows
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def fuse_into(self, module: nn.Module) -> None:
        """Write the experts' weights into a fused module's 3-D parameters (gate rows, then up rows)."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self])
        down = torch.stack([e.down_proj.weight for e in self])
        module.gate_up_proj = nn.Parameter(gate_up.detach().clone(), requires_grad=False)
        module.down_proj = nn.Parameter(down.detach().clone(), requires_grad=False)


def _is_fused(module: nn.Module) -> bool:
    p = module._parameters
    return all(isinstance(p.get(k), torch.Tensor) and p[k].dim() == 3 for k in ("gate_up_proj", "down_proj"))


def _unfused(module: nn.Module, path: str) -> LinearExperts:
    if getattr(module, "has_bias", False) or getattr(module, "is_transposed", False) or \
            any(n not in ("gate_up_proj", "down_proj") for n, _ in module.named_parameters()):
        from .adapters import UnsupportedModelError

        raise UnsupportedModelError(f"{path}: experts of {type(module).__name__} have biases or a transposed "
                                    "layout; only (E, 2I, d) gate_up_proj and (E, d, I) down_proj are supported")
    gate_up, down = module.gate_up_proj, module.down_proj
    n_exp, two_i, d = gate_up.shape
    inter = two_i // 2
    experts = LinearExperts(ExpertMLP(d, inter, module.act_fn, gate_up.dtype, gate_up.device) for _ in range(n_exp))
    if not gate_up.is_meta:
        with torch.no_grad():
            for e, expert in enumerate(experts):
                expert.gate_proj.weight.copy_(gate_up[e, :inter])
                expert.up_proj.weight.copy_(gate_up[e, inter:])
                expert.down_proj.weight.copy_(down[e])
    _drop_weights(module)  # what `fused` fills again for save_pretrained
    object.__setattr__(experts, "fused_module", module)  # not a submodule: no parameters, no state dict
    return experts


def _drop_weights(module: nn.Module) -> None:
    """A fused experts module's 3-D parameters back to meta tensors of their shape (no memory)."""
    for k in ("gate_up_proj", "down_proj"):
        p = getattr(module, k)
        setattr(module, k, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


def unfuse_experts(model: nn.Module) -> int:
    """Swap every fused experts module of `model` for LinearExperts (weights copied; on the meta device
    meta Linears). Idempotent; returns how many were swapped."""
    found = [(n, m) for n, m in model.named_modules() if _is_fused(m)]
    for name, module in found:
        model.set_submodule(name, _unfused(module, name))
    return len(found)


@contextmanager
def fused(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its original fused experts modules (holding the current weights) in place of the
    LinearExperts, e.g. for save_pretrained; swapped back on exit."""
    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearExperts)]
    for name, experts in swapped:
        experts.fuse_into(experts.fused_module)
        model.set_submodule(name, experts.fused_module)
    try:
        yield model
    finally:
        for name, experts in swapped:
            model.set_submodule(name, experts)
            _drop_weights(experts.fused_module)


def is_expert_linear(name: str) -> bool:
    """A routed expert's projection (`...experts.{e}.gate_proj|up_proj|down_proj`)."""
    return _EXPERT.search(name) is not None


def is_router_tensor(name: str) -> bool:
    """A router's weight (`mlp.gate.weight`, Mixtral's `block_sparse_moe.gate.weight`,
    `mlp.shared_expert_gate.weight`): releases keep it in the source's precision."""
    return _ROUTER.search(name) is not None


def routed_hessians(hessians: dict[str, torch.Tensor | None], tokens: dict[str, int],
                    min_tokens: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hessians of one layer's expert Linears with too few routed tokens shrunk toward their role's pool.

    hessians/tokens: {name: H (in, in) or None, routed token count} for expert Linears. For each role
    (gate_proj/up_proj, down_proj) the pool is the count-weighted mean of its experts' H (the Hessian
    of every routed token); an expert with n < min_tokens gets (n H_e + (min_tokens - n) H_pool) /
    min_tokens, so an expert with no tokens gets the pool and one near the threshold mostly its own.
    Returns (hessians, names that were shrunk)."""
    out, shrunk = dict(hessians), []
    roles: dict[str, list[str]] = {}
    for name in hessians:
        roles.setdefault(name.rpartition(".")[2], []).append(name)
    for names in roles.values():
        total = sum(tokens[n] for n in names)
        if total == 0:
            raise ValueError(f"no calibration token reached any expert of {names[0]}; more calibration text needed")
        pool = sum(hessians[n] * (tokens[n] / total) for n in names if tokens[n])
        for n in names:
            if tokens[n] < min_tokens:
                own = hessians[n] * tokens[n] if tokens[n] else 0.0
                out[n] = (own + pool * (min_tokens - tokens[n])) / min_tokens
                shrunk.append(n)
    return out, shrunk


def _apply(renames, name: str, forward: bool) -> str:
    padded = f".{name}."
    for module_pat, ckpt_pat in renames:
        src, dst = (module_pat, ckpt_pat) if forward else (_pattern(ckpt_pat), _replacement(module_pat))
        padded = re.sub(src, dst, padded)
    return padded[1:-1]


def _pattern(replacement: str) -> str:
    """A checkpoint replacement string as the pattern that matches what it produces."""
    return re.escape(replacement).replace(re.escape(r"\1"), r"(\d+)")


def _replacement(pattern: str) -> str:
    return pattern.replace(r"(\d+)", r"\1").replace("\\.", ".")


def checkpoint_name(renames, name: str) -> str:
    """The checkpoint tensor/module name of a module name (identity without renames)."""
    return _apply(renames, name, True) if renames else name


def module_name(renames, name: str) -> str:
    """The module name of a checkpoint tensor/module name (identity without renames)."""
    return _apply(renames, name, False) if renames else name
