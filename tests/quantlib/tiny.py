"""Tiny random causal LMs, one per supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch
import transformers as T

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)


def tiny_config(family: str):
    gqa = dict(_COMMON, num_key_value_heads=2)
    return {
        "llama": lambda: T.LlamaConfig(**gqa),
        "mistral": lambda: T.MistralConfig(**gqa, sliding_window=8),
        "qwen2": lambda: T.Qwen2Config(**gqa),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=16),
        "gemma": lambda: T.GemmaConfig(**gqa, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=16, sliding_window=8),
        "gemma3_text": lambda: T.Gemma3TextConfig(
            **dict(gqa, num_hidden_layers=4), head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        ),
        "phi3": lambda: T.Phi3Config(**gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "opt": lambda: T.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
            word_embed_proj_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        ),
        # experts narrower than the dense MLP, as in the real configs; Qwen2-MoE with a shared expert
        # and a dense layer (mlp_only_layers), Qwen3-MoE with per-head q/k norms, OLMoE with full-width ones
        "mixtral": lambda: T.MixtralConfig(**dict(gqa, intermediate_size=64), num_local_experts=4,
                                           num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**gqa, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**gqa, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=True),
        "olmoe": lambda: T.OlmoeConfig(**dict(gqa, intermediate_size=32), num_experts=4, num_experts_per_tok=2),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=128, bos_token_id=0, eos_token_id=0),
    }[family]()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2",
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def tiny_ids(n: int = 8, t: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)
