"""Architecture adapters: where a causal LM keeps its blocks, Linears and attention geometry.

One frozen `Family` record per architecture, looked up by `config.model_type`; no per-family code
paths elsewhere in quantlib.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionGeometry", "Family", "ModelAdapter", "FAMILIES", "get_adapter", "check_spec_fits", "UnsupportedModelError"]


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
class Family:
    """Dotted module paths relative to the CausalLM (model) or to one block.

    groups: the block's Linears in true-sequential order; Linears in one group share their input.
    transposed: weights stored (in, out) as in GPT-2's Conv1D.
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


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _llama_like(name: str, **kw) -> Family:
    return Family(name, "model.layers", "model.embed_tokens", "model.norm", _LLAMA_GROUPS, **kw)


_GEMMA2_NORMS = (("input_layernorm", 0), ("pre_feedforward_layernorm", 2))

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

    def linear_names(self) -> list[str]:
        return [n for g in self.family.groups for n in g]

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {n: block.get_submodule(n) for n in self.linear_names()}

    def _transposed(self, module: nn.Module) -> bool:
        """GPT-2's Conv1D stores (in, out); its LM head is a plain nn.Linear."""
        return self.family.transposed and not isinstance(module, nn.Linear)

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        """(out, in) view of a Linear's weight."""
        return module.weight.t() if self._transposed(module) else module.weight

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
    """Adapter for a loaded causal LM; unsupported architectures fail naming the supported list."""
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
