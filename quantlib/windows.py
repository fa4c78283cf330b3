"""The reconstruction driver: slide windows of blocks over the model, initialize each new block
(GPTQ or RTN on the quantized prefix's activations), train the window, harden, move on.

Only the window (and its look-ahead blocks) is on the compute device; activations stay in
ActivationStores (CPU memory or disk).
"""
from __future__ import annotations

import copy
import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .activations import ActivationStore
from .actquant import attach, parse_activations
from .adapters import ModelAdapter
from .capture import BlockCall, capture_block_inputs, run_block, swap_module
from .cfp import CFPConfig, apply_cfp
from .engine import EngineConfig, peak_memory_mb, quantize_block
from .gptq import GPTQConfig
from .optim import optimizer_with_schedule, training_autocast, uses_bf16
from .qweight import QuantizedWeight
from .recon import LearnableLinear, ReconConfig, latent_near_codes, recon_loss
from .rtn import RTNConfig
from .spec import Spec, spec_for

__all__ = ["WindowStats", "WindowResult", "ReconState", "init_block", "install_block", "carry_block", "train_window",
           "train_and_propagate", "finalize_block", "run_window", "reconstruct_model", "forward_blocks",
           "fp_boundaries", "FPCursor", "block_errors"]


@dataclass
class WindowStats:
    start: int
    end: int
    loss_init: float  # hardened init, on the held-out batches (all batches when cfg.heldout is 0)
    loss_final: float  # hardened result kept (= loss_init when the guard kept the init)
    kept_init: bool
    seconds: float
    peak_mb: float
    curve: list[float] = field(default_factory=list)  # training loss of every applied step
    skipped_steps: list[int] = field(default_factory=list)  # steps whose loss or gradient was not finite
    # [{"block", "before", "after"}]: relative output error of each finished block at init and after
    block_errors: list[dict] = field(default_factory=list)
    heldout_batches: int = 0  # calibration batches the window never trained on, that the guard judged on
    heldout_curve: list[tuple[int, float]] = field(default_factory=list)  # (iterations done, held-out loss)
    best_iter: int | None = None  # iterations done at the state kept (None: the end, without evaluations)
    stopped_early: bool = False
    bf16: bool = False  # the training forward ran under bf16 autocast (cfg.amp resolved on this device)


@dataclass
class ReconState:
    """Blocks currently holding LearnableLinears (block index -> {linear name: module}) and the FP
    copies of every block touched so far (for 'qin' targets)."""

    learnables: dict[int, dict[str, LearnableLinear]] = field(default_factory=dict)
    fp_blocks: dict[int, nn.Module] = field(default_factory=dict)


@torch.no_grad()
def forward_blocks(blocks: list[nn.Module], calls: list[BlockCall], inputs: ActivationStore, device,
                   spill_dir: str | None = None) -> ActivationStore:
    """Run inputs through consecutive blocks (each with its own call), batch by batch."""
    out = ActivationStore(spill_dir)
    for x in inputs:
        x = x.to(device)
        for block, call in zip(blocks, calls):
            x = run_block(block, x, call)
        out.append(x)
    return out


def fp_boundaries(adapter: ModelAdapter, inputs: ActivationStore, calls: list[BlockCall], device) -> list[ActivationStore]:
    """FP activations at every block boundary: [inputs, out(block 0), ..., out(block n-1)], all held
    at once (reconstruct_model keeps only the one it needs: FPCursor)."""
    cursor = FPCursor(adapter, inputs, calls, device)
    return [inputs] + [cursor.at(t) for t in range(1, len(adapter.blocks) + 1)]


class FPCursor:
    """FP activations at a block boundary that only moves forward: `at(t)` runs the FP blocks from
    the current boundary up to boundary t (0: the inputs, t: the output of block t - 1) and keeps
    that one store. A run of windows asks for non-decreasing boundaries, all at or past blocks no
    window has touched yet, so this gives fp_boundaries(...)[t] bit for bit while holding one store
    instead of n + 1 (at 512 x 512 calibration tokens on a 576-wide model, 0.6 GB instead of 19)."""

    def __init__(self, adapter: ModelAdapter, inputs: ActivationStore, calls: list[BlockCall], device) -> None:
        self.adapter, self.calls, self.device = adapter, calls, device
        self.index, self.store = 0, inputs

    def at(self, t: int) -> ActivationStore:
        if t < self.index:
            raise ValueError(f"FP boundary {t} asked after boundary {self.index}: the cursor only moves forward")
        for i in range(self.index, t):
            block = self.adapter.blocks[i].to(self.device)
            self.store = forward_blocks([block], [self.calls[i].to(self.device)], self.store, self.device)
            block.to("cpu")
        self.index = t
        return self.store


def init_block(adapter: ModelAdapter, index: int, inputs: ActivationStore, call: BlockCall, spec: Spec,
               cfg: ReconConfig, engine: EngineConfig, state: ReconState,
               propagate: bool = True) -> ActivationStore | None:
    """GPTQ/RTN-initialize block `index` on the quantized prefix's inputs, swap its Linears for
    LearnableLinears; returns the block's (init-quantized) outputs (None without `propagate`: the
    window's last block, whose init outputs nothing reads, skips that pass)."""
    block = adapter.blocks[index]
    state.fp_blocks[index] = copy.deepcopy(block).cpu()
    if cfg.cfp:
        apply_cfp(adapter, block.to(engine.device), inputs, call.to(engine.device), CFPConfig(weights=cfg.cfp_weights),
                  engine.device)
    fp_weights = {n: adapter.get_weight(m).detach().float().clone() for n, m in adapter.linears(block).items()}
    # the init's own block error is never reported (the window's block_errors are): not measured
    results, outputs, _ = quantize_block(adapter, index, inputs, call, spec, _init_method(cfg),
                                         replace(engine, measure_block_error=False), propagate=propagate)
    prefix = f"{adapter.family.layers}.{index}."
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + index)
    modules = {}
    for name, module in adapter.linears(block).items():
        qw = results[prefix + name]
        latent = {"gptq": lambda: qw.latent, "rtn": lambda: fp_weights[name],
                  "boa": lambda: latent_near_codes(qw, fp_weights[name])}[cfg.init]()
        modules[name] = LearnableLinear(qw, latent, getattr(module, "bias", None), cfg, gen)
        swap_module(block, name, modules[name])
    state.learnables[index] = modules
    return outputs


def _init_method(cfg: ReconConfig):
    if cfg.init == "boa":
        from .boa import BoAConfig

        return BoAConfig(damp=cfg.init_damp)
    return GPTQConfig(damp=cfg.init_damp) if cfg.init == "gptq" else RTNConfig()


def install_block(adapter: ModelAdapter, index: int, saved: dict[str, torch.Tensor], spec: Spec,
                  cfg: ReconConfig, state: ReconState) -> None:
    """Put a block back in the state a previous window left it (`carry_block`'s output): its
    LearnableLinears and any other parameter the window changed (e.g. CFP-scaled norms)."""
    block = adapter.blocks[index]
    state.fp_blocks[index] = copy.deepcopy(block).cpu()
    modules = {}
    for name, module in adapter.linears(block).items():
        out, n = saved[f"{name}.latent"].shape
        groups = saved[f"{name}.s0"].shape[1]
        path = f"{adapter.family.layers}.{index}.{name}"
        modules[name] = LearnableLinear.empty(spec_for(spec, path), cfg, out, n, groups, f"{name}.bias" in saved)
        swap_module(block, name, modules[name])
    block.load_state_dict(saved, strict=True)
    for m in modules.values():
        m.requires_grad_(False)
    state.learnables[index] = modules


def carry_block(adapter: ModelAdapter, index: int, state: ReconState) -> dict[str, torch.Tensor]:
    """Save block `index` (still being reconstructed) for the next window and put its FP original
    back, so every block past the finished prefix is in FP state between windows."""
    saved = {k: v.detach().cpu().clone() for k, v in adapter.blocks[index].state_dict().items()}
    adapter.blocks[index] = state.fp_blocks.pop(index)
    state.learnables.pop(index)
    return saved


def _optimizer(modules: list[LearnableLinear], cfg: ReconConfig, steps: int):
    groups = {"rounding": [], "clip": [], "scale": [], "weights": []}
    for m in modules:
        for k, ps in m.param_groups().items():
            groups[k] += ps
    # on a learned grid the log-scale refines the clipped range (a tenth of the clipping rate); on a
    # frozen grid it is the range parameter itself
    scale_lr = cfg.clip_lr if cfg.frozen_grid else cfg.clip_lr / 10
    lrs = {"rounding": cfg.lr, "clip": cfg.clip_lr, "scale": scale_lr, "weights": cfg.weight_lr}
    return optimizer_with_schedule(cfg.optimizer, [(ps, lrs[k]) for k, ps in groups.items()], steps, cfg.schedule)


def _beta(cfg: ReconConfig, it: int) -> float | None:
    """Regularizer exponent at step it (None during warm-up): linear from beta[0] to beta[1]."""
    start = int(cfg.warmup * cfg.iters)
    if it < start:
        return None
    t = (it - start) / max(cfg.iters - start, 1)
    return cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * t


def split_batches(n: int, heldout: float) -> tuple[list[int], list[int]]:
    """(training batches, judged batches) of n calibration batches: the last round(heldout n) (at
    least one) are held out; heldout 0 trains and judges on all of them."""
    if heldout == 0:
        return list(range(n)), list(range(n))
    if n < 2:
        raise ValueError(f"recon heldout {heldout} needs at least 2 calibration batches, got {n}: use more "
                         "calibration sequences, a smaller engine batch size, or heldout 0")
    k = min(max(1, round(heldout * n)), n - 1)
    return list(range(n - k)), list(range(n - k, n))


@torch.no_grad()
def _eval_loss(blocks, calls, inputs: ActivationStore, targets: ActivationStore, cfg, device,
               batches: list[int] | None = None) -> float:
    """Mean loss per sequence over `batches` (all when None)."""
    return _eval_pass(blocks, calls, inputs, targets, cfg, device, batches)[0]


@torch.no_grad()
def _eval_pass(blocks, calls, inputs: ActivationStore, targets: ActivationStore, cfg, device,
               batches: list[int] | None = None, keep_after: int | None = None,
               spill_dir: str | None = None) -> tuple[float, ActivationStore | None]:
    """(mean loss per sequence over `batches` (all when None), with `keep_after` = k the outputs
    of the first k blocks on every batch, else None): the window's final loss and the activations
    it passes on in one pass over the calibration set. Batches in ascending order, as the loss sums."""
    judged = set(range(len(inputs)) if batches is None else batches)
    kept = None if keep_after is None else ActivationStore(spill_dir)
    total, n = 0.0, 0
    for i in range(len(inputs)):
        if i not in judged and kept is None:
            continue
        x = inputs[i]
        y = x.to(device)
        for j, (block, call) in enumerate(zip(blocks, calls)):
            y = run_block(block, y, call)
            if kept is not None and j + 1 == keep_after:
                kept.append(y)
                if i not in judged:
                    break
        if i in judged:
            total += float(recon_loss(y, targets[i].to(device), cfg)) * x.shape[0]
            n += x.shape[0]
    return total / max(n, 1), kept


def _set_mode(modules: list[LearnableLinear], training: bool) -> None:
    for m in modules:
        m.train(training)


def train_window(adapter: ModelAdapter, start: int, end: int, lookahead_end: int, inputs: ActivationStore,
                 targets: ActivationStore, calls: list[BlockCall], cfg: ReconConfig, state: ReconState,
                 device) -> WindowStats:
    """Train blocks [start, end) (their LearnableLinears) so that the output of block
    lookahead_end - 1 (the window's last block, or L frozen FP blocks later) matches targets."""
    return train_and_propagate(adapter, start, end, lookahead_end, inputs, targets, calls, cfg, state, device)[0]


def train_and_propagate(adapter: ModelAdapter, start: int, end: int, lookahead_end: int, inputs: ActivationStore,
                        targets: ActivationStore, calls: list[BlockCall], cfg: ReconConfig, state: ReconState,
                        device, keep_after: int | None = None,
                        spill_dir: str | None = None) -> tuple[WindowStats, ActivationStore | None]:
    """train_window, and with `keep_after` = k the hardened result's outputs of blocks
    [start, start + k) on every batch, taken from the final loss's pass (None where that pass did
    not run on the result kept: early stopping, or the guard keeping the init)."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    idx = list(range(start, lookahead_end))
    blocks = [adapter.blocks[i].to(device) for i in idx]
    dcalls = [calls[i].to(device) for i in idx]
    for b in blocks:
        for p in b.parameters():
            p.requires_grad_(False)
    modules = [m for i in range(start, end) for m in state.learnables[i].values()]
    for m in modules:
        for ps in m.param_groups().values():
            for p in ps:
                p.requires_grad_(True)
    init_state = {id(m): copy.deepcopy(m.state_dict()) for m in modules}
    train, judged = split_batches(len(inputs), cfg.heldout)
    _set_mode(modules, False)
    loss_init = _eval_loss(blocks, dcalls, inputs, targets, cfg, device, judged)
    judge = _Judge(modules, loss_init, cfg, lambda: _eval_loss(blocks, dcalls, inputs, targets, cfg, device, judged))
    curve, skipped = _train(blocks, dcalls, modules, inputs, targets, cfg, device, loss_init, start, train, judge) \
        if cfg.iters else ([], [])
    _set_mode(modules, False)
    loss_final, kept, outputs = _settle(modules, cfg, judge, init_state, loss_init, lambda: _eval_pass(
        blocks, dcalls, inputs, targets, cfg, device, judged, keep_after, spill_dir))
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
    for i in idx:
        adapter.blocks[i].to("cpu")
    stats = WindowStats(start, end, loss_init, loss_final, kept, time.perf_counter() - t0, peak_memory_mb(device),
                        curve, skipped_steps=skipped, heldout_batches=len(judged) if cfg.heldout else 0,
                        heldout_curve=judge.curve, best_iter=judge.best_iter, stopped_early=judge.stopped,
                        bf16=uses_bf16(device, cfg.amp))
    return stats, outputs


def _settle(modules: list[LearnableLinear], cfg: ReconConfig, judge: "_Judge", init_state: dict, loss_init: float,
            final_pass: Callable[[], tuple[float, ActivationStore | None]]):
    """Load the state the window ships; (its loss, whether it is the init, the outputs of the final
    pass or None). Early stopping ships the best evaluated state, the init if none beat it; without
    it the trained state, unless its loss is not below the init's (NaN included)."""
    outputs = None
    if cfg.eval_every and cfg.iters:
        kept = judge.best_state is None
        for m in [] if kept else modules:
            m.load_state_dict(judge.best_state[id(m)])
        loss_final = judge.best
    else:
        loss_final, outputs = final_pass()
        kept = not loss_final <= loss_init
    if kept:  # never ship something worse than (or not comparable with) the initialization
        for m in modules:
            m.load_state_dict(init_state[id(m)])
        loss_final, outputs = loss_init, None
    return loss_final, kept, outputs


class _Judge:
    """Early stopping on the held-out batches: every cfg.eval_every iterations, the hardened state's
    loss; the best state is kept (a copy) and training stops after cfg.patience evaluations without
    improvement (never with patience 0). With eval_every 0 it never evaluates (best_state stays None)."""

    def __init__(self, modules: list[LearnableLinear], loss_init: float, cfg: ReconConfig,
                 evaluate: Callable[[], float]) -> None:
        self.modules, self.cfg, self.evaluate = modules, cfg, evaluate
        self.best, self.best_iter, self.best_state = loss_init, None, None
        self.curve: list[tuple[int, float]] = []
        self.misses, self.stopped = 0, False

    def after(self, done: int) -> bool:
        """Called after `done` iterations; True to stop."""
        if not self.cfg.eval_every or done % self.cfg.eval_every and done != self.cfg.iters:
            return False
        _set_mode(self.modules, False)
        loss = self.evaluate()
        _set_mode(self.modules, True)
        self.curve.append((done, loss))
        if loss < self.best:
            self.best, self.best_iter, self.misses = loss, done, 0
            self.best_state = {id(m): copy.deepcopy(m.state_dict()) for m in self.modules}
        else:
            self.misses += 1
        self.stopped = 0 < self.cfg.patience <= self.misses and done < self.cfg.iters
        return self.stopped


def _train(blocks, calls, modules, inputs, targets, cfg: ReconConfig, device, loss_init: float,
           start: int, train: list[int], judge: _Judge) -> tuple[list[float], list[int]]:
    """(loss of every applied step, steps skipped because their loss or gradient was not finite: a
    NaN/Inf batch must not poison the learnables; the window goes on from its last good state)."""
    opt, sched = _optimizer(modules, cfg, cfg.iters)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + start)
    params = [p for g in opt.param_groups for p in g["params"]]
    autocast = training_autocast(device, cfg.amp)
    _set_mode(modules, True)
    curve, skipped = [], []
    for it in range(cfg.iters):
        b = train[int(torch.randint(len(train), (1,), generator=gen))]
        x, t = inputs[b], targets[b]
        rows = torch.randperm(x.shape[0], generator=gen)[: cfg.batch_size]
        with autocast:
            y = x[rows].to(device)
            for block, call in zip(blocks, calls):
                y = run_block(block, y, call)
            task = recon_loss(y, t[rows].to(device), cfg)
        loss = task
        beta = _beta(cfg, it)
        if beta is not None and cfg.reg_weight > 0:
            reg = torch.stack([m.regularizer(beta) / m.h0.numel() for m in modules]).mean()
            loss = task + cfg.reg_weight * loss_init * reg  # scale-free: relative to the init loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(loss) and torch.isfinite(norm):
            opt.step()
            curve.append(task.item())
        else:
            skipped.append(it)
        sched.step()
        if judge.after(it + 1):
            break
    return curve, skipped


def finalize_block(adapter: ModelAdapter, index: int, state: ReconState) -> dict[str, QuantizedWeight]:
    """Harden block `index`, put plain Linears with the dequantized weights back; returns its codes."""
    block = adapter.blocks[index]
    fp = state.fp_blocks.pop(index)
    results = {}
    for name, ll in state.learnables.pop(index).items():
        qw = ll.harden()
        original = fp.get_submodule(name)
        adapter.set_weight(original, qw.dequantize())
        block.set_submodule(name, original.to(next(block.parameters()).device))
        results[f"{adapter.family.layers}.{index}.{name}"] = qw
    return results


def _targets(adapter, state: ReconState, cfg: ReconConfig, x_in: ActivationStore, start: int, stop: int,
             calls, device) -> ActivationStore:
    """'qin' targets: the FP blocks [start, stop) applied to the quantized prefix's activations."""
    fp = [state.fp_blocks.get(i, adapter.blocks[i]).to(device) for i in range(start, stop)]
    out = forward_blocks(fp, [calls[i].to(device) for i in range(start, stop)], x_in, device)
    for i in range(start, stop):
        state.fp_blocks.get(i, adapter.blocks[i]).to("cpu")
    return out


@torch.no_grad()
def block_errors(adapter: ModelAdapter, indices: list[int], x_in: ActivationStore, calls: list[BlockCall],
                 state: ReconState, device, batches: int | None = None, act_inputs: str | None = None) -> list[float]:
    """Per-block ||F_q(X_i) - F(X_i)||^2 / ||F(X_i)||^2, X_i the quantized window's input to block i
    (the engine's block_error), for blocks whose FP copy is in `state` and that are in eval mode;
    measured on the first `batches` input batches (None: all). With `act_inputs` the FP copy's
    Linears get quantized inputs too, as the engine's F(X) does."""
    errs, x = [], (x_in if batches is None else list(itertools.islice(x_in, batches)))
    for i in indices:
        _set_mode(list(state.learnables.get(i, {}).values()), False)
        q, fp, call = adapter.blocks[i].to(device), state.fp_blocks[i].to(device), calls[i].to(device)
        num = den = 0.0
        out = ActivationStore()
        with _hooked([fp], adapter, act_inputs):
            for xb in x:
                xb = xb.to(device)
                yq, yf = run_block(q, xb, call).float(), run_block(fp, xb, call).float()
                num += float((yq - yf).pow(2).sum())
                den += float(yf.pow(2).sum())
                out.append(yq)
        fp.to("cpu")
        q.to("cpu")
        errs.append(num / max(den, 1e-30))
        x = out
    return errs


@contextmanager
def quantized_inputs(adapter: ModelAdapter, indices, act_inputs: str | None):
    """Within the block: the inputs of every quantized Linear of blocks `indices` are fake-quantized
    (quantlib.actquant, straight-through) as `act_inputs` (a8, a4; None: nothing changes)."""
    with _hooked([adapter.blocks[i] for i in indices], adapter, act_inputs):
        yield


@contextmanager
def _hooked(blocks: list[nn.Module], adapter: ModelAdapter, act_inputs: str | None):
    """Quantized inputs on every Linear of `blocks` within the block; every hook that went on comes
    off, also when attaching a later block fails."""
    spec = parse_activations(act_inputs)
    handles = []
    try:
        for b in [] if spec is None else blocks:
            handles += attach(b, adapter.linear_names(b), spec)
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class WindowResult:
    """What one window leaves behind: the codes of the blocks it finished ([start, next_start)), the
    activations entering the next window, the saved state of blocks it shares with the next window."""

    results: dict[str, QuantizedWeight]
    outputs: ActivationStore
    carry: dict[int, dict[str, torch.Tensor]]
    stats: WindowStats


def run_window(adapter: ModelAdapter, calls: list[BlockCall], x_in: ActivationStore, targets: ActivationStore | None,
               window: tuple[int, int], next_start: int, spec: Spec, cfg: ReconConfig,
               engine: EngineConfig = EngineConfig(), carry: dict[int, dict[str, torch.Tensor]] | None = None,
               spill_dir: str | None = None) -> WindowResult:
    """Reconstruct window [start, end): x_in enters block start (from the finished quantized prefix),
    targets are the FP activations after block min(end + L, n) - 1 (None for target 'qin'); blocks
    in `carry` resume from the previous window's state, the others are initialized. The model's
    blocks from next_start on are left in FP state. With `engine.act_inputs` the window's Linears
    see quantized inputs in its initialization, its training and the outputs it passes on; the
    look-ahead blocks and the targets stay FP."""
    start, end = window
    n = len(adapter.blocks)
    stop = min(end + cfg.lookahead, n)
    device = torch.device(engine.device)
    state, carry = ReconState(), carry or {}
    x = x_in
    for i in range(start, end):
        if i in carry:
            install_block(adapter, i, carry[i], spec, cfg, state)
            with quantized_inputs(adapter, [i], engine.act_inputs):
                x = forward_blocks([adapter.blocks[i].to(device)], [calls[i].to(device)], x, device)
            adapter.blocks[i].to("cpu")
        else:
            x = init_block(adapter, i, x, calls[i], spec, cfg, engine, state, propagate=i + 1 < end)
    if cfg.target == "qin":
        targets = _targets(adapter, state, cfg, x_in, start, stop, calls, device)
    done = list(range(start, next_start))
    # per-block errors cost 4 block passes over the calibration set: only when the engine asks for them
    errors = (lambda: block_errors(adapter, done, x_in, calls, state, device, engine.block_error_batches,
                                   engine.act_inputs)) if engine.measure_block_error else list
    with quantized_inputs(adapter, range(start, end), engine.act_inputs):  # the window trains as it will run
        before = errors()
        # the final loss's pass also yields the finished blocks' outputs (their hardened forward is the
        # finalized Linears' forward bit for bit: tests/quantlib/test_recon.py)
        st, outputs = train_and_propagate(adapter, start, end, stop, x_in, targets, calls, cfg, state, device,
                                          keep_after=len(done), spill_dir=spill_dir)
        after = errors()
    st.block_errors = [{"block": i, "before": b, "after": a} for i, b, a in zip(done, before, after)]
    results = {}
    for i in done:
        results.update(finalize_block(adapter, i, state))
    saved = {i: carry_block(adapter, i, state) for i in range(next_start, end)}
    if outputs is None:
        with quantized_inputs(adapter, done, engine.act_inputs):
            outputs = forward_blocks([adapter.blocks[i].to(device) for i in done],
                                     [calls[i].to(device) for i in done], x_in, device, spill_dir)
        for i in done:
            adapter.blocks[i].to("cpu")
    return WindowResult(results, outputs, saved, st)


def reconstruct_model(
    adapter: ModelAdapter, calib_ids: torch.Tensor, spec: Spec, cfg: ReconConfig,
    engine: EngineConfig = EngineConfig(), on_window: Callable[[WindowStats], None] | None = None,
) -> tuple[dict[str, QuantizedWeight], list[WindowStats]]:
    """Quantize every decoder-block Linear by windowed reconstruction; the model ends up holding
    the dequantized weights. Returns ({module path: codes}, per-window stats)."""
    n = len(adapter.blocks)
    windows = cfg.windows(n)  # validates window <= n before any work
    device = torch.device(engine.device)
    batches, calls = capture_block_inputs(adapter, calib_ids, engine.batch_size)
    x_in = ActivationStore.from_batches(batches)
    fp = FPCursor(adapter, x_in, calls, device) if cfg.target == "fp" else None  # advanced before each window
    results, stats, carry = {}, [], {}
    for w, (start, end) in enumerate(windows):
        nxt = windows[w + 1][0] if w + 1 < len(windows) else n
        targets = fp.at(min(end + cfg.lookahead, n)) if fp is not None else None
        r = run_window(adapter, calls, x_in, targets, (start, end), nxt, spec, cfg, engine, carry)
        results |= r.results
        x_in, carry = r.outputs, r.carry
        stats.append(r.stats)
        if on_window is not None:
            on_window(r.stats)
    return results, stats
