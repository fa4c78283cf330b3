"""Sequential engine: quantize block after block, each fed by the already-quantized prefix.

Only the current block lives on the compute device; activations stay in an ActivationStore.
Within a block, Linear groups are solved in true-sequential order: group k's Hessian is collected
with groups < k already quantized, and the Linears after group k stubbed out (their outputs are not
needed to reach group k's input, so the pass costs only what precedes it).
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .activations import ActivationStore
from .adapters import ModelAdapter
from .capture import BlockCall, capture_block_inputs, run_block, run_with_hooks
from .gptq import accumulate_hessian
from .methods import hessian_error, method_for, quantize_weight
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = ["EngineConfig", "BlockStats", "quantize_block", "quantize_model", "peak_memory_mb"]


@dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 8
    true_sequential: bool = True
    device: str = "cpu"
    spill_dir: str | None = None
    measure_block_error: bool = False

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class BlockStats:
    index: int
    seconds: float
    peak_mb: float
    layer_errors: dict[str, float] = field(default_factory=dict)
    block_error: float | None = None  # ||F_q(X) - F(X)||^2 / ||F(X)||^2 on the quantized prefix's X


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory if on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Zero(nn.Module):
    """Stand-in for a Linear whose output is not needed in this pass: (..., in) -> zeros (..., out).
    With `probe`, it also folds its input into a running Hessian (it replaces the hooked Linear
    itself, whose own matmul is then skipped too)."""

    def __init__(self, out_features: int, probe: bool = False) -> None:
        super().__init__()
        self.out_features = out_features
        self.probe = probe
        self.h: torch.Tensor | None = None
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe:
            self.h, self.count = accumulate_hessian(self.h, self.count, x)
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextmanager
def _stubbed(block: nn.Module, names: list[str], probe: str | None, adapter: ModelAdapter) -> Iterator[_Zero | None]:
    """Swap `names` (and the probed Linear) for _Zero stand-ins; restore them afterwards."""
    saved = {n: block.get_submodule(n) for n in [*names, *([probe] if probe else [])]}
    stubs = {n: _Zero(adapter.out_features(m), probe=n == probe) for n, m in saved.items()}
    for n, stub in stubs.items():
        block.set_submodule(n, stub)
    try:
        yield stubs.get(probe)
    finally:
        for n, m in saved.items():
            block.set_submodule(n, m)


@torch.no_grad()
def _collect_hessians(
    block: nn.Module, modules: dict[str, nn.Module], inputs: ActivationStore, call: BlockCall, device
) -> dict[str, torch.Tensor]:
    """One full forward over all batches; H for every Linear in `modules` (fp32, on device)."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in modules}

    def hook(name):
        def fn(_m, args, _out):
            acc[name] = accumulate_hessian(*acc[name], args[0])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    run_with_hooks(block, inputs, call, device, handles)
    return {n: h for n, (h, _) in acc.items()}


@torch.no_grad()
def _probe_hessian(
    block: nn.Module, group: list[str], later: list[str], inputs: ActivationStore, call: BlockCall, device, adapter
) -> torch.Tensor:
    """H of `group`'s shared input with the quantized prefix in place: group[0] becomes a probe,
    the rest of the group and every later Linear return zeros (their outputs are not needed)."""
    with _stubbed(block, group[1:] + later, group[0], adapter) as probe:
        for x in inputs:
            run_block(block, x.to(device), call)
    return probe.h


def _hessian_plan(adapter: ModelAdapter, true_sequential: bool) -> list[tuple[list[str], list[str]]]:
    """[(Linears solved after this pass, Linears after them)]: one pass per group when true
    sequential (groups share their input), else one pass for all Linears."""
    groups = [list(g) for g in adapter.family.groups]
    if not true_sequential:
        return [([n for g in groups for n in g], [])]
    return [(g, [n for later in groups[k + 1 :] for n in later]) for k, g in enumerate(groups)]


@torch.no_grad()
def _outputs(block: nn.Module, inputs: ActivationStore, call: BlockCall, device, spill_dir) -> ActivationStore:
    out = ActivationStore(spill_dir)
    for x in inputs:
        out.append(run_block(block, x.to(device), call))
    return out


@torch.no_grad()
def quantize_block(
    adapter: ModelAdapter,
    index: int,
    inputs: ActivationStore,
    call: BlockCall,
    spec: QuantSpec,
    method_cfg: object,
    cfg: EngineConfig,
    out_spill_dir: str | None = None,
) -> tuple[dict[str, QuantizedWeight], ActivationStore, BlockStats]:
    """Quantize block `index` in place (its weights become the dequantized ones) given its inputs
    from the quantized prefix. Returns {module path: QuantizedWeight}, the block's outputs, stats."""
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block = adapter.blocks[index].to(device)
    call = call.to(device)
    linears = adapter.linears(block)
    method = method_for(method_cfg)
    prefix = f"{adapter.family.layers}.{index}"
    ref = _outputs(block, inputs, call, device, None) if cfg.measure_block_error else None
    results: dict[str, QuantizedWeight] = {}
    errors: dict[str, float] = {}
    plan = _hessian_plan(adapter, cfg.true_sequential) if method.needs_hessian else [(list(linears), None)]
    for group, later in plan:
        # a method may solve some Linears of the group jointly (BoA: q/k/v); the rest as usual
        joint = {} if method.solve_group is None else method.solve_group(
            adapter, block, group, inputs, call, spec, method_cfg, device)
        rest = [n for n in group if n not in joint]
        hessians = _group_hessians(block, linears, rest, later, inputs, call, device, adapter, cfg) if rest else {}
        for name in group:
            h = hessians.get(name)
            w = adapter.get_weight(linears[name]).float()
            if name in joint:
                qw, errors[name] = joint[name]
                w_hat = qw.dequantize().to(device)
            else:
                qw = quantize_weight(w, h, spec, method_cfg)
                w_hat = qw.dequantize().to(device)
                if h is not None:
                    errors[name] = hessian_error(w, w_hat, h)
            adapter.set_weight(linears[name], w_hat)
            results[f"{prefix}.{name}"] = qw
    outputs = _outputs(block, inputs, call, device, out_spill_dir)
    block_error = _relative_error(outputs, ref) if ref is not None else None
    adapter.blocks[index].to("cpu")
    stats = BlockStats(index, time.perf_counter() - t0, peak_memory_mb(device), errors, block_error)
    return results, outputs, stats


def _group_hessians(block, linears, group, later, inputs, call, device, adapter, cfg) -> dict[str, torch.Tensor]:
    """{name: H} for the Linears of `group` (empty when the method needs none: later is None)."""
    if later is None:
        return {}
    if cfg.true_sequential:
        h = _probe_hessian(block, group, later, inputs, call, device, adapter)
        return {n: h for n in group}
    return _collect_hessians(block, {n: linears[n] for n in group}, inputs, call, device)


def _relative_error(out: ActivationStore, ref: ActivationStore) -> float:
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(out, ref))
    den = sum(float(b.float().pow(2).sum()) for b in ref)
    return num / max(den, 1e-30)


def quantize_model(
    adapter: ModelAdapter,
    calib_ids: torch.Tensor | None,
    spec: QuantSpec,
    method_cfg: object,
    cfg: EngineConfig = EngineConfig(),
    on_block: Callable[[BlockStats], None] | None = None,
) -> tuple[dict[str, QuantizedWeight], list[BlockStats]]:
    """Quantize every decoder-block Linear of adapter.model in place. calib_ids: (N, T) token ids
    (None for data-free methods such as RTN)."""
    results: dict[str, QuantizedWeight] = {}
    stats: list[BlockStats] = []
    needs_data = method_for(method_cfg).needs_hessian or cfg.measure_block_error
    if needs_data:
        batches, calls = capture_block_inputs(adapter, calib_ids, cfg.batch_size)
        acts = ActivationStore.from_batches(batches, _spill(cfg, 0))
    for i in range(len(adapter.blocks)):
        if needs_data:
            res, acts, st = quantize_block(adapter, i, acts, calls[i], spec, method_cfg, cfg, _spill(cfg, i + 1))
        else:
            res, st = _quantize_block_weights(adapter, i, spec, method_cfg)
        results.update(res)
        stats.append(st)
        if on_block is not None:
            on_block(st)
    return results, stats


def _spill(cfg: EngineConfig, i: int) -> str | None:
    return None if cfg.spill_dir is None else f"{cfg.spill_dir}/acts_{i:04d}"


@torch.no_grad()
def _quantize_block_weights(adapter, index, spec, method_cfg):
    """Data-free path (RTN): no forward passes at all."""
    t0 = time.perf_counter()
    results = {}
    for name, m in adapter.linears(adapter.blocks[index]).items():
        qw = quantize_weight(adapter.get_weight(m).float(), None, spec, method_cfg)
        adapter.set_weight(m, qw.dequantize())
        results[f"{adapter.family.layers}.{index}.{name}"] = qw
    return results, BlockStats(index, time.perf_counter() - t0, peak_memory_mb(torch.device("cpu")))
