"""Architecture adapters: where a causal LM keeps its blocks, Linears and attention geometry.

One frozen `Family` record per architecture, looked up by `config.model_type`; no per-family code
paths elsewhere in quantlib.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .moe import MIXTRAL_RENAMES, LinearExperts, checkpoint_name, module_name, unfuse_experts

__all__ = ["AttentionGeometry", "Family", "MoE", "ModelAdapter", "FAMILIES", "get_adapter", "check_spec_fits", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: bool
    fused_qkv: bool


@dataclass(frozen=True)
class MoE:
    """A sparse MLP at `module` in each block (blocks without one keep the dense groups): a router
    (never quantized), `experts` (quantlib.moe.LinearExperts once unfused) and, with `shared`, a
    dense expert every token passes through. renames: (module-name, checkpoint-name) patterns for
    checkpoints whose tensor names differ from the modules' (quantlib.moe.checkpoint_name)."""

    module: str = "mlp"
    shared: str | None = None
    renames: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Family:
    """Dotted module paths relative to the CausalLM (model) or to one block.

    groups: the block's Linears in true-sequential order; Linears of one group with the same parent
    module share their input (ModelAdapter.input_sets). transposed: weights stored (in, out) as in
    GPT-2's Conv1D. moe: the block's MLP is sparse (ModelAdapter.groups expands it per expert).
    """

    name: str
    layers: str
    embed: str
    norm: str
    groups: tuple[tuple[str, ...], ...]
    head: str = "lm_head"
    # (norm path in the block, index of the group it feeds): equivalent transforms fold into these
    norms: tuple[tuple[str, int], ...] = (("input_layernorm", 0), ("post_attention_layernorm", 2))
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (offset + weight)
    rope: bool = True
    fused_qkv: bool = False
    transposed: bool = False
    moe: MoE | None = None


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _llama_like(name: str, **kw) -> Family:
    return Family(name, "model.layers", "model.embed_tokens", "model.norm", _LLAMA_GROUPS, **kw)


_GEMMA2_NORMS = (("input_layernorm", 0), ("pre_feedforward_layernorm", 2))
# a sparse MLP's norm also feeds the router: equivalent transforms fold into the attention's norm only
_MOE_NORMS = (("input_layernorm", 0),)

FAMILIES: dict[str, Family] = {
    **{t: _llama_like(t) for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma": _llama_like("gemma", norm_offset=1.0),
    "gemma2": _llama_like("gemma2", norms=_GEMMA2_NORMS, norm_offset=1.0),
    "gemma3_text": _llama_like("gemma3_text", norms=_GEMMA2_NORMS, norm_offset=1.0),
    "phi3": Family(
        "phi3", "model.layers", "model.embed_tokens", "model.norm",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        fused_qkv=True,
    ),
    "opt": Family(
        "opt", "model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        norms=(("self_attn_layer_norm", 0), ("final_layer_norm", 2)), rope=False,
    ),
    "mixtral": _llama_like("mixtral", norms=_MOE_NORMS, moe=MoE(renames=MIXTRAL_RENAMES)),
    "qwen2_moe": _llama_like("qwen2_moe", norms=_MOE_NORMS, moe=MoE(shared="shared_expert")),
    "qwen3_moe": _llama_like("qwen3_moe", norms=_MOE_NORMS, moe=MoE()),
    "olmoe": _llama_like("olmoe", norms=_MOE_NORMS, moe=MoE()),
    "gpt2": Family(
        "gpt2", "transformer.h", "transformer.wte", "transformer.ln_f",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        norms=(("ln_1", 0), ("ln_2", 2)), rope=False, fused_qkv=True, transposed=True,
    ),
}


class ModelAdapter:
    """Uniform access to one loaded causal LM. Holds no state beyond the model and its family."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        self.model = model
        self.family = family

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    @property
    def embed(self) -> nn.Module:
        return self.model.get_submodule(self.family.embed)

    @property
    def norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.norm)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.family.head)

    @property
    def base_model(self) -> nn.Module:
        """The module whose forward embeds tokens and runs the blocks (no LM head)."""
        return self.model.base_model

    def groups(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The block's Linear groups: the family's, with a sparse MLP's groups expanded per expert
        (shared expert first): (gate/up of every expert), (down of every expert)."""
        moe = self.family.moe
        experts = None if moe is None else getattr(block.get_submodule(moe.module), "experts", None)
        if not isinstance(experts, LinearExperts):
            return self.family.groups
        heads = [f"{moe.module}.{moe.shared}"] if moe.shared else []
        heads += [f"{moe.module}.experts.{e}" for e in range(len(experts))]
        return (*self.family.groups[:2], tuple(f"{h}.{p}" for h in heads for p in ("gate_proj", "up_proj")),
                tuple(f"{h}.down_proj" for h in heads))

    @staticmethod
    def input_sets(group) -> list[list[str]]:
        """`group` split into the Linears that see the same input: those with one parent module (an
        attention's q/k/v, one expert's gate/up); each expert sees only its routed tokens."""
        sets: dict[str, list[str]] = {}
        for name in group:
            sets.setdefault(name.rpartition(".")[0], []).append(name)
        return list(sets.values())

    def linear_names(self, block: nn.Module) -> list[str]:
        return [n for g in self.groups(block) for n in g]

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {n: block.get_submodule(n) for n in self.linear_names(block)}

    def checkpoint_name(self, name: str) -> str:
        """A module (or tensor) name as the family's checkpoints spell it (Mixtral's experts differ)."""
        return checkpoint_name(self.family.moe.renames if self.family.moe else (), name)

    def module_name(self, name: str) -> str:
        return module_name(self.family.moe.renames if self.family.moe else (), name)

    def _transposed(self, module: nn.Module) -> bool:
        """GPT-2's Conv1D stores (in, out); its LM head is a plain nn.Linear."""
        return self.family.transposed and not isinstance(module, nn.Linear)

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        """(out, in) view of a Linear's weight."""
        return self.out_in(module, module.weight)

    def out_in(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """(out, in) view of a tensor laid out like the module's weight (its gradient, say)."""
        return t.t() if self._transposed(module) else t

    def set_weight(self, module: nn.Module, w: torch.Tensor) -> None:
        """Write an (out, in) weight back in the module's own layout and dtype."""
        w = w.t() if self._transposed(module) else w
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype))

    def out_features(self, module: nn.Module) -> int:
        return self.get_weight(module).shape[0]

    @property
    def geometry(self) -> AttentionGeometry:
        c = self.model.config
        heads = getattr(c, "num_attention_heads", None) or c.n_head
        hidden = getattr(c, "hidden_size", None) or c.n_embd
        return AttentionGeometry(
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or hidden // heads,
            hidden_size=hidden,
            rope=self.family.rope,
            fused_qkv=self.family.fused_qkv,
        )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Adapter for a loaded causal LM; unsupported architectures fail naming the supported list.
    A mixture-of-experts model's fused experts become per-expert Linears here (quantlib.moe)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None and config is not None:  # remote code (trust_remote_code) subclassing a supported config
        family = next((FAMILIES[c.model_type] for c in type(config).__mro__[1:]
                       if getattr(c, "model_type", None) in FAMILIES), None)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"supported model_type values: {', '.join(sorted(FAMILIES))}"
        )
    adapter = ModelAdapter(model, family)
    if family.moe is not None:
        unfuse_experts(model)
    try:
        adapter.blocks, adapter.embed, adapter.norm, adapter.head
    except AttributeError as e:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the expected layout: {e}; "
            "pass a *ForCausalLM model"
        ) from e
    return adapter


def check_spec_fits(adapter: ModelAdapter, group_size: int | None) -> None:
    """Fail before any work if a group size does not divide some Linear's in_features."""
    if group_size is None:
        return
    for name, m in adapter.linears(adapter.blocks[0]).items():
        n = adapter.get_weight(m).shape[1]
        if n % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide in_features {n} of {name}; "
                "choose a divisor of every Linear's input size (e.g. 32 or 64) or per-channel"
            )
