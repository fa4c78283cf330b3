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
from .actquant import attach, parse_activations, smooth_block
from .adapters import ModelAdapter
from .capture import BlockCall, capture_block_inputs, run_block, run_with_hooks, swap_module
from .gptq import accumulate_hessian
from .head import head_method, head_name, solve_head, untie_head
from .methods import hessian_error, method_for, quantize_weight
from .moe import is_expert_linear, routed_hessians
from .qweight import QuantizedWeight
from .spec import Spec, spec_for

__all__ = ["EngineConfig", "BlockStats", "quantize_block", "quantize_model", "peak_memory_mb"]


@dataclass(frozen=True)
class EngineConfig:
    """batch_size: sequences per forward; true_sequential: one Hessian pass per Linear group, each
    with the groups before it quantized; device: where the current block runs; spill_dir: keep
    activations on disk there instead of in CPU memory.

    measure_block_error: report ||F_q(X) - F(X)||^2 / ||F(X)||^2 per block. F(X), the FP block's
    output, is recorded from the first full forward with FP weights that quantization runs anyway
    (BoA's attention pass, the one Hessian pass when not true-sequential); under true-sequential
    GPTQ the first group's Hessian pass runs the whole block instead of stopping at the group
    (costs the block's FP matmuls once more), and without any pass (RTN) it gets a pass of its own.
    block_error_batches: measure it on the first k input batches only (None: all of them); where
    no full pass comes for free, F(X) then costs a pass over those k batches only.
    moe_min_tokens: an expert Linear whose router sent it fewer calibration tokens gets its Hessian
    shrunk toward the mean of its layer's experts (quantlib.moe.routed_hessians).
    smooth: SmoothQuant's alpha: before a block is solved, its norm-fed groups are smoothed on its
    inputs (quantlib.actquant.smooth_block; FP-exact, changes the norms too); None: off.
    act_inputs: an activation scheme (quantlib.actquant: a8, a4): while a block is solved and its
    outputs propagated, its Linears' inputs are quantized as the release will quantize them, so the
    Hessians are built from quantized inputs (X_q X_q^T) and every later block is calibrated on what
    the quantized model really feeds it (the block error's F(X) then has quantized inputs too); the
    hooks are removed afterwards; reconstruction windows also train on them (quantlib.windows).
    None: float inputs."""

    batch_size: int = 8
    true_sequential: bool = True
    device: str = "cpu"
    spill_dir: str | None = None
    measure_block_error: bool = False
    block_error_batches: int | None = None
    moe_min_tokens: int = 128
    smooth: float | None = None
    act_inputs: str | None = None

    def __post_init__(self) -> None:
        if (act := parse_activations(self.act_inputs)) is not None and act.static:
            raise ValueError(f"act_inputs takes a dynamic scheme (a8, a4), not {act.name}: static scales are "
                             "calibrated once the weights are solved")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smooth (SmoothQuant's alpha) must be in [0, 1] or None, got {self.smooth}")
        if self.moe_min_tokens < 1:
            raise ValueError(f"moe_min_tokens must be >= 1, got {self.moe_min_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.block_error_batches is not None and self.block_error_batches <= 0:
            raise ValueError(f"block_error_batches must be positive or None, got {self.block_error_batches}")


@dataclass
class BlockStats:
    index: int
    seconds: float
    peak_mb: float
    layer_errors: dict[str, float] = field(default_factory=dict)
    block_error: float | None = None  # ||F_q(X) - F(X)||^2 / ||F(X)||^2 on the quantized prefix's X
    expert_tokens: dict[str, int] = field(default_factory=dict)  # routed calibration tokens per expert Linear
    shrunk_experts: list[str] = field(default_factory=list)  # expert Linears under moe_min_tokens


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
        swap_module(block, n, stub)
    try:
        yield stubs.get(probe)
    finally:
        for n, m in saved.items():
            block.set_submodule(n, m)


class _Reference:
    """The FP block's outputs F(X) on the first `batches` input batches, for the block error.

    A forward hook on the block records them from the first full pass with FP weights (passes with
    _Zero stand-ins are skipped); close() computes them with a pass of their own if none came, and
    removes the hook. Call close() before any of the block's weights change."""

    def __init__(self, block: nn.Module, batches: int) -> None:
        self.block = block
        self.batches = batches
        self.outputs: list[torch.Tensor] = []  # (b, T, d) on CPU, as an in-memory ActivationStore keeps them
        self._handle = block.register_forward_hook(self._record)

    def _record(self, block: nn.Module, _args, out) -> None:
        if len(self.outputs) < self.batches and not any(isinstance(m, _Zero) for m in block.modules()):
            self.outputs.append((out[0] if isinstance(out, tuple) else out).detach().to("cpu"))

    @property
    def pending(self) -> bool:
        return self._handle is not None and len(self.outputs) < self.batches

    def close(self, inputs: ActivationStore, call: BlockCall, device) -> None:
        if self._handle is None:
            return
        self.remove()
        if len(self.outputs) < self.batches:  # no full FP pass ran
            self.outputs = [run_block(self.block, inputs[i].to(device), call).detach().to("cpu")
                            for i in range(self.batches)]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@torch.no_grad()
def _collect_hessians(
    block: nn.Module, modules: dict[str, nn.Module], inputs: ActivationStore, call: BlockCall, device
) -> dict[str, tuple[torch.Tensor | None, int]]:
    """One forward over all batches; (H, rows seen) for every Linear in `modules` (fp32, on device;
    H None for a Linear never called: an expert no token was routed to)."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in modules}

    def hook(name):
        def fn(_m, args, _out):
            acc[name] = accumulate_hessian(*acc[name], args[0])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    run_with_hooks(block, inputs, call, device, handles)
    return acc


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


def _hessian_plan(adapter: ModelAdapter, block: nn.Module, true_sequential: bool) -> list[tuple[list[str], list[str]]]:
    """[(Linears solved after this pass, Linears after them)]: one pass per group when true
    sequential, else one pass for all Linears."""
    groups = [list(g) for g in adapter.groups(block)]
    if not true_sequential:
        return [([n for g in groups for n in g], [])]
    return [(g, [n for later in groups[k + 1 :] for n in later]) for k, g in enumerate(groups)]


@torch.no_grad()
def _outputs(
    block: nn.Module, inputs: ActivationStore, call: BlockCall, device, spill_dir, ref: list[torch.Tensor] | None = None
) -> tuple[ActivationStore, float | None]:
    """The block's outputs on every input batch, and with `ref` (F(X) of the first batches) the
    relative error sum ||y - r||^2 / sum ||r||^2 over those batches, accumulated on the way."""
    out = ActivationStore(spill_dir)
    num = den = 0.0
    for i, x in enumerate(inputs):
        y = run_block(block, x.to(device), call)
        out.append(y)
        if ref is not None and i < len(ref):
            a, b = y.detach().to("cpu").float(), ref[i].float()
            num += float((a - b).pow(2).sum())
            den += float(b.pow(2).sum())
    return out, (None if ref is None else num / max(den, 1e-30))


@torch.no_grad()
def quantize_block(
    adapter: ModelAdapter,
    index: int,
    inputs: ActivationStore,
    call: BlockCall,
    spec: Spec,
    method_cfg: object,
    cfg: EngineConfig,
    out_spill_dir: str | None = None,
    propagate: bool = True,
) -> tuple[dict[str, QuantizedWeight], ActivationStore | None, BlockStats]:
    """Quantize block `index` in place (its weights become the dequantized ones) given its inputs
    from the quantized prefix. Returns {module path: QuantizedWeight}, the block's outputs (None
    without `propagate`: a caller that never reads them skips their pass over the calibration set),
    stats."""
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block = adapter.blocks[index].to(device)
    call = call.to(device)
    if cfg.smooth is not None:
        smooth_block(adapter, block, inputs, call, cfg.smooth, device)
    act = parse_activations(cfg.act_inputs)
    hooks = [] if act is None else attach(block, adapter.linear_names(block), act)
    try:
        results, errors, routing, outputs, block_error = _solve_and_propagate(
            adapter, index, block, inputs, call, spec, method_cfg, cfg, out_spill_dir, propagate)
    finally:
        for h in hooks:
            h.remove()
    adapter.blocks[index].to("cpu")
    stats = BlockStats(index, time.perf_counter() - t0, peak_memory_mb(device), errors, block_error,
                       routing.tokens, routing.shrunk)
    return results, outputs, stats


def _solve_and_propagate(adapter, index, block, inputs, call, spec, method_cfg, cfg, out_spill_dir, propagate=True):
    """_solve_block, then the solved block's outputs (and its error against F(X) when measured);
    without `propagate` neither (the error needs the outputs' pass)."""
    device = torch.device(cfg.device)
    ref = None
    if cfg.measure_block_error and propagate:
        ref = _Reference(block, min(cfg.block_error_batches or len(inputs), len(inputs)))
    try:
        results, errors, routing = _solve_block(adapter, index, block, inputs, call, spec, method_cfg, cfg, ref)
    finally:
        if ref is not None:
            ref.remove()
    if not propagate:
        return results, errors, routing, None, None
    outputs, block_error = _outputs(block, inputs, call, device, out_spill_dir, None if ref is None else ref.outputs)
    return results, errors, routing, outputs, block_error


def _solve_block(adapter, index, block, inputs, call, spec, method_cfg, cfg, ref: _Reference | None):
    """Solve the block's Linears group after group, replacing their weights; ({path: codes}, {name: error})."""
    device = torch.device(cfg.device)
    linears = adapter.linears(block)
    method = method_for(method_cfg)
    prefix = f"{adapter.family.layers}.{index}"
    results: dict[str, QuantizedWeight] = {}
    errors: dict[str, float] = {}
    routing = _Routing()
    plan = _hessian_plan(adapter, block, cfg.true_sequential) if method.needs_hessian else [(list(linears), None)]
    for group, later in plan:
        # a method may solve some Linears of the group jointly (BoA: q/k/v); the rest as usual
        joint = {} if method.solve_group is None else method.solve_group(
            adapter, block, group, inputs, call, lambda n: spec_for(spec, f"{prefix}.{n}"), method_cfg, device)
        rest = [n for n in group if n not in joint]
        # a pending reference over all batches: the first group's pass runs the whole block to feed it
        full = ref is not None and ref.pending and ref.batches == len(inputs)
        hessians = {} if not rest else _group_hessians(block, linears, rest, later, inputs, call, device, adapter,
                                                        cfg, full, routing)
        if ref is not None:
            ref.close(inputs, call, device)  # F(X) complete before the first weight changes
        for name in group:
            h = hessians.get(name)
            w = adapter.get_weight(linears[name]).float()
            if name in joint:
                qw, errors[name] = joint[name]
                w_hat = qw.dequantize().to(device)
            else:
                qw = quantize_weight(w, h, spec_for(spec, f"{prefix}.{name}"), method_cfg)
                w_hat = qw.dequantize().to(device)
                if h is not None:
                    errors[name] = hessian_error(w, w_hat, h)
            adapter.set_weight(linears[name], w_hat)
            results[f"{prefix}.{name}"] = qw
    return results, errors, routing


@dataclass
class _Routing:
    """Per-expert routed token counts and the expert Linears whose Hessian was shrunk."""

    tokens: dict[str, int] = field(default_factory=dict)
    shrunk: list[str] = field(default_factory=list)


def _group_hessians(
    block, linears, group, later, inputs, call, device, adapter, cfg, full: bool = False,
    routing: _Routing | None = None,
) -> dict[str, torch.Tensor]:
    """{name: H} for the Linears of `group` (empty when the method needs none: later is None).
    A true-sequential group whose Linears share one input gets one H, from a probe pass that stops
    at the group, or with `full` from a hook on the group's first Linear in an unstubbed pass (the
    same inputs, so the same H). A group of several inputs (a sparse MLP's experts) hooks the first
    Linear of each with the later Linears stubbed; expert Hessians go through moe.routed_hessians."""
    if later is None:
        return {}
    sets = adapter.input_sets(group)
    if cfg.true_sequential and len(sets) == 1:
        if full:
            h = _collect_hessians(block, {group[0]: linears[group[0]]}, inputs, call, device)[group[0]][0]
        else:
            h = _probe_hessian(block, group, later, inputs, call, device, adapter)
        return {n: h for n in group}
    firsts = [s[0] for s in sets] if cfg.true_sequential else list(group)
    with _stubbed(block, later if cfg.true_sequential and not full else [], None, adapter):
        acc = _collect_hessians(block, {n: linears[n] for n in firsts}, inputs, call, device)
    experts = {n: acc[n][0] for n in firsts if is_expert_linear(n)}
    if experts:
        tokens = {n: acc[n][1] for n in experts}
        shrunk_h, shrunk = routed_hessians(experts, tokens, cfg.moe_min_tokens)
        acc.update({n: (shrunk_h[n], tokens[n]) for n in experts})
        if routing is not None:
            routing.tokens.update(tokens)
            routing.shrunk.extend(shrunk)
    first_of = {n: s[0] if cfg.true_sequential else n for s in sets for n in s}
    return {n: acc[first_of[n]][0] for n in group}


def quantize_model(
    adapter: ModelAdapter,
    calib_ids: torch.Tensor | None,
    spec: Spec,
    method_cfg: object,
    cfg: EngineConfig = EngineConfig(),
    on_block: Callable[[BlockStats], None] | None = None,
    head: bool = False,
) -> tuple[dict[str, QuantizedWeight], list[BlockStats]]:
    """Quantize every decoder-block Linear of adapter.model in place (with `head`, then the LM head:
    quantlib.head, untied from the embeddings). calib_ids: (N, T) token ids (None for data-free
    methods such as RTN)."""
    results: dict[str, QuantizedWeight] = {}
    stats: list[BlockStats] = []
    needs_data = method_for(method_cfg).needs_hessian or cfg.measure_block_error or cfg.smooth is not None or \
        (head and method_for(head_method(method_cfg)).needs_hessian)
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
    if head:
        qw, _ = solve_head(adapter, acts if needs_data else [], spec_for(spec, head_name(adapter)), method_cfg,
                           cfg.device)
        untie_head(adapter.model, qw.dequantize())
        results[head_name(adapter)] = qw
    return results, stats


def _spill(cfg: EngineConfig, i: int) -> str | None:
    return None if cfg.spill_dir is None else f"{cfg.spill_dir}/acts_{i:04d}"


@torch.no_grad()
def _quantize_block_weights(adapter, index, spec, method_cfg):
    """Data-free path (RTN): no forward passes at all."""
    t0 = time.perf_counter()
    results = {}
    for name, m in adapter.linears(adapter.blocks[index]).items():
        path = f"{adapter.family.layers}.{index}.{name}"
        qw = quantize_weight(adapter.get_weight(m).float(), None, spec_for(spec, path), method_cfg)
        adapter.set_weight(m, qw.dequantize())
        results[path] = qw
    return results, BlockStats(index, time.perf_counter() - t0, peak_memory_mb(torch.device("cpu")))
