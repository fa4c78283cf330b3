"""Block-input capture without exceptions as control flow.

Every decoder block is temporarily replaced by a `_Recorder` that stores what the model passes it
and returns its input unchanged, so one cheap forward of the base model (embeddings, masks, rotary
tables; no block compute, no LM head) yields the first block's inputs and each block's call
arguments (attention masks and position embeddings can differ per block, e.g. Gemma's sliding layers).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .adapters import ModelAdapter

__all__ = ["BlockCall", "capture_block_inputs", "capture_block_calls", "run_block", "run_with_hooks", "swap_module"]

_DROP = ("past_key_values", "past_key_value", "use_cache", "output_attentions", "cache_position")


@dataclass
class BlockCall:
    """Positional extras (after hidden_states) and keyword arguments one block is called with.
    Captured with batch 1, they broadcast over any batch of equal-length sequences."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "BlockCall":
        move = lambda v: _to(v, device)  # noqa: E731
        return BlockCall(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()})


def swap_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted path `name` in `root`, carrying the old module's forward pre-hooks (online
    rotations, quantlib.rotation), so a stand-in or trainable replacement sees exactly the input the
    module it replaces would. Returns the old module, which keeps its hooks for when it goes back."""
    old = root.get_submodule(name)
    for hid, hook in old._forward_pre_hooks.items():
        new._forward_pre_hooks[hid] = hook
        if hid in old._forward_pre_hooks_with_kwargs:
            new._forward_pre_hooks_with_kwargs[hid] = True
    if getattr(old, "act_spec", None) is not None:  # quantlib.actquant's mark travels with its hook
        new.act_spec, new.input_scale = old.act_spec, getattr(old, "input_scale", None)
    root.set_submodule(name, new)
    return old


def _to(v: Any, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, (tuple, list)):
        return type(v)(_to(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v


class _Recorder(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.inputs: list[torch.Tensor] = []
        self.call: BlockCall | None = None

    def __getattr__(self, name: str):
        # models read per-block attributes such as `attention_type` during their forward
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.inputs.append(hidden_states.detach())
        if self.call is None:
            # positional past_key_values (GPT-2) is None because use_cache=False
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROP}
            self.call = BlockCall(tuple(args), kwargs)
        return hidden_states


@contextmanager
def _recording(adapter: ModelAdapter) -> Iterator[list[_Recorder]]:
    blocks = adapter.blocks
    original = list(blocks)
    recorders = [_Recorder(b) for b in original]
    for i, r in enumerate(recorders):
        blocks[i] = r
    try:
        yield recorders
    finally:
        for i, b in enumerate(original):
            blocks[i] = b


@torch.no_grad()
def capture_block_inputs(
    adapter: ModelAdapter, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """ids: (N, T) token ids on the model's device. Returns the first block's inputs as a list of
    (b, T, d) batches, and one BlockCall per block (captured from a batch-1 call)."""
    base = adapter.base_model
    with _recording(adapter) as recs:
        base(input_ids=ids[:1], use_cache=False)
        calls = [r.call for r in recs]
        recs[0].inputs.clear()
        for i in range(0, ids.shape[0], batch_size):
            base(input_ids=ids[i : i + batch_size], use_cache=False)
        inputs = list(recs[0].inputs)
    return inputs, calls


@torch.no_grad()
def capture_block_calls(adapter: ModelAdapter, ids: torch.Tensor) -> list[BlockCall]:
    """Each block's call arguments from one batch-1 forward of ids[:1] (embeddings only)."""
    with _recording(adapter) as recs:
        adapter.base_model(input_ids=ids[:1], use_cache=False)
        return [r.call for r in recs]


def run_block(block: nn.Module, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """One block's forward on x (b, T, d) with its captured call arguments."""
    out = block(x, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_with_hooks(block: nn.Module, inputs, call: BlockCall, device, handles: list) -> None:
    """Run every (b, T, d) input batch through `block` for the hooks' side effects, then remove
    the hook handles, also when the forward raises."""
    try:
        for x in inputs:
            run_block(block, x.to(device), call)
    finally:
        for h in handles:
            h.remove()
