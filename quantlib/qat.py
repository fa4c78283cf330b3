"""Global QAT refinement (DESIGN method 8): fine-tune an already block-wise-quantized model end to end.

After block-wise PTQ every decoder Linear holds s (q - z). Here each one is swapped for a
`QATLinear` whose fake-quantized weight is trained against the model-level loss (next-token
cross-entropy and/or KL to the FP model's cached logits) on the calibration sequences (Xu et al. 2024,
"Understanding the difficulty of low-precision PTQ of LLMs"; EfficientQAT's E2E-QP trains only the
quantization parameters). Everything else (embeddings, norms unless asked, LM head) is frozen.

Two phases, as elsewhere in quantlib: `attach_qat` / `detach_qat` (quantlib.qat_modules) do the model
surgery, `train_qat` (here) drives the training between them and always leaves a plain HF model
holding the hardened weights; quantlib.distill holds the teacher's targets and the loss.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .distill import chunked_qat_loss, qat_loss, teacher_targets
from .engine import peak_memory_mb
from .optim import AMP_MODES, SCHEDULES, adamw_with_schedule, training_autocast, uses_bf16
from .qat_modules import TRAINABLES, QATLinear, QATModules, _Checkpointed, _set_checkpointing, attach_qat, detach_qat
from .qweight import QuantizedWeight

__all__ = [
    "QATConfig",
    "QATLinear",
    "QATModules",
    "QATState",
    "QATStats",
    "attach_qat",
    "detach_qat",
    "teacher_targets",
    "qat_loss",
    "train_qat",
]

LOSSES = ("ce", "kl", "ce+kl")


@dataclass(frozen=True)
class QATConfig:
    """What is trained, against what, and for how long.

    trainable:
      "scales"        per-group log-scale only: s = s0 exp(t). Codes and zeros are fixed, so the
                      result is on the integer grid by construction (EfficientQAT E2E-QP).
      "scales+zeros"  also the zero point, kept as a continuous value in code units and used as
                      clamp(round_ste(z), 0, maxq); it moves the grid only once it crosses a half-integer.
      "weights"       a latent fp weight (init: the dequantized weight) plus the scales; codes are
                      clamp(round_ste(latent / s) + z0, 0, maxq) (straight-through; primitives.ste_codes), zeros fixed. The
                      scales then get the LSQ gradient (driven by the rounding residual), not the
                      output-scaling one of "scales": use a smaller lr (~1e-3) with it. Every latent
                      starts at the centre of its rounding interval and Adam moves all those with a
                      steady gradient sign at the same rate, so codes flip in bursts (the held-out
                      loss jumps; best-state tracking keeps the state before a bad burst).
    loss: "ce" (next-token NLL of the calibration text), "kl" (KL to the FP teacher, see `qat_loss`)
      or "ce+kl" (ce + kl_weight * kl). "kl" needs `teacher_targets` computed from the FP model. The
      default is "kl": PTQ aims at fidelity to the FP model, while "ce" also fine-tunes towards the
      calibration text (domain adaptation, not better quantization: docs/benchmarks/tuning_notes.md).
    topk: teacher logits cached as the top-k log-probs (+ tail mass); 0 caches the full distribution.

    Learning rates (AdamW moves a parameter by about lr per step whatever its gradient's size, so each
    parameter lives in units where one rate fits every layer; how the defaults were picked:
    docs/benchmarks/tuning_notes.md):
      lr        the log-scales: a relative scale change of ~lr per step, and s stays > 0.
      zero_lr   the zeros, in code units: a zero changes only after drifting 0.5, so it needs its own rate.
      weight_lr the latent weights, in units of the group's initial step s0 (the parameter is
                latent / s0), so a code flips after a drift of 0.5.
      train_norms also trains the norm weights at `lr` (they are ~1, so lr is again a relative rate).
    heldout: fraction of calibration sequences held out (seeded permutation) to evaluate the same loss
      every eval_every steps; the best state is kept, patience evals without improvement stop early
      (0 = never), and if nothing beats the initial held-out loss the initial state is kept.
    amp: the training forward's arithmetic (quantlib.optim.training_autocast): "auto" (bf16 autocast on
      CUDA and on a CPU with AMX or AVX512-BF16, fp32 elsewhere), "bf16" or "fp32".
    Defaults target a 135M model on CPU: 64 steps of 4 sequences (~2 epochs of 112 training sequences).
    """

    trainable: str = "scales"
    loss: str = "kl"
    kl_weight: float = 1.0
    topk: int = 64
    steps: int = 64
    lr: float = 5e-3
    zero_lr: float = 3e-2
    weight_lr: float = 2e-2
    batch_size: int = 4
    grad_accum: int = 1
    schedule: str = "cosine"
    warmup_steps: int = 4
    grad_clip: float = 1.0
    heldout: float = 0.125
    eval_every: int = 8
    patience: int = 3
    grad_checkpoint: bool = False
    train_norms: bool = False
    seed: int = 0
    amp: str = "auto"

    def __post_init__(self) -> None:
        _one_of("trainable", self.trainable, TRAINABLES)
        _one_of("amp", self.amp, AMP_MODES)
        _one_of("loss", self.loss, LOSSES)
        _one_of("schedule", self.schedule, SCHEDULES)
        for name in ("lr", "zero_lr", "weight_lr", "grad_clip"):
            _check(_num(getattr(self, name)) and getattr(self, name) > 0,
                   f"{name} must be a positive number, got {getattr(self, name)!r}")
        _check(_num(self.kl_weight) and self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight!r}")
        _check(_num(self.heldout) and 0 < self.heldout < 1,
               f"heldout is the held-out fraction of the calibration sequences and must lie strictly between "
               f"0 and 1 (e.g. 0.125), got {self.heldout!r}")
        for name, low in (("steps", 0), ("topk", 0), ("warmup_steps", 0), ("patience", 0), ("seed", 0),
                          ("batch_size", 1), ("grad_accum", 1), ("eval_every", 1)):
            value = getattr(self, name)
            _check(_int(value) and value >= low, f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def needs_teacher(self) -> bool:
        return "kl" in self.loss


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------- training state


@dataclass
class QATStats:
    steps: int  # optimizer steps run (fewer than cfg.steps after early stopping)
    curve: list[float | None]  # training loss per step (None: not finite, step skipped)
    heldout_curve: list[tuple[int, float]]  # (steps done, held-out loss); step 0 is the init
    init_heldout: float
    best_heldout: float  # the state returned (= init_heldout when kept_init)
    best_step: int
    final_heldout: float  # re-measured on the hardened plain model: what ships
    kept_init: bool
    stopped_early: bool
    seconds: float
    peak_mb: float
    trained_norms: list[str] = field(default_factory=list)  # model parameters changed besides `results`
    skipped_steps: list[int] = field(default_factory=list)  # steps not applied: loss or gradient not finite
    bf16: bool = False  # the training forward ran under bf16 autocast (cfg.amp resolved on this device)


@dataclass
class QATState:
    """Training progress besides parameters and optimizer: everything a resumed run needs to continue
    exactly as if it had never stopped (batch sampling is a pure function of (seed, step))."""

    step: int = 0
    init_heldout: float = math.inf
    best_heldout: float = math.inf
    best_step: int = 0
    best_params: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_evals: int = 0
    curve: list[float] = field(default_factory=list)
    heldout_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    skipped_steps: list[int] = field(default_factory=list)  # loss or gradient not finite: no update


def _trainable(mods: QATModules, adapter: ModelAdapter, cfg: QATConfig) -> dict[str, dict[str, nn.Parameter]]:
    """{optimizer group: {full parameter name: parameter}} in a fixed order."""
    groups: dict[str, dict[str, nn.Parameter]] = {"scales": {}, "zeros": {}, "weights": {}, "norms": {}}
    for name, qat in mods.qat.items():
        for group, params in qat.param_groups().items():
            groups[group].update({f"{name}.{pname}": p for pname, p in params.items()})
    if cfg.train_norms:
        groups["norms"] = _norm_params(adapter)
    return {g: ps for g, ps in groups.items() if ps}


def _norm_params(adapter: ModelAdapter) -> dict[str, nn.Parameter]:
    """Weights (and biases) of every normalization module in the blocks plus the final norm."""
    out = {}
    for prefix, root in ((adapter.family.layers, adapter.blocks), (adapter.family.norm, adapter.norm)):
        for mname, m in root.named_modules():
            if "norm" in type(m).__name__.lower():
                for pname, p in m.named_parameters(recurse=False):
                    _check(p.dtype == torch.float32, f"train_norms needs float32 norm weights, {prefix}.{mname} is "
                           f"{p.dtype}: load the model in float32 (a bf16 autocast, qat amp, keeps trainable parameters fp32)")
                    out[".".join(x for x in (prefix, mname, pname) if x)] = p
    return out


def _optimizer(groups: dict[str, dict[str, nn.Parameter]], cfg: QATConfig):
    lrs = {"scales": cfg.lr, "zeros": cfg.zero_lr, "weights": cfg.weight_lr, "norms": cfg.lr}
    return adamw_with_schedule([(list(ps.values()), lrs[g]) for g, ps in groups.items()], cfg.steps, cfg.schedule,
                               cfg.warmup_steps)


def _snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in params.items()}


@torch.no_grad()
def _load(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    missing = params.keys() - values.keys()
    _check(not missing, f"checkpoint lacks parameters {sorted(missing)[:3]}...: it was made for other results/config")
    for n, p in params.items():
        p.copy_(values[n])


def _split(n: int, cfg: QATConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows) of the N calibration sequences, by a seeded permutation."""
    n_held = max(1, round(cfg.heldout * n))
    _check(n_held < n, f"heldout {cfg.heldout} of {n} calibration sequences leaves none to train on: "
           "use more sequences or a smaller heldout")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[n_held:], perm[:n_held]


def _rows(train: torch.Tensor, batch: int, seed: int, micro: int) -> torch.Tensor:
    """Rows of micro-batch number `micro`: consecutive slices of a stream of per-epoch permutations of
    the training rows, so every sequence is seen once per epoch and the draw depends only on (seed, micro)."""
    n = train.numel()
    pos = torch.arange(micro * batch, (micro + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in (pos // n).unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = pos // n == epoch
        out[sel] = train[perm[pos[sel] % n]]
    return out


# --------------------------------------------------------------------------- the driver


@dataclass
class _Run:
    """What the loop needs, built once."""

    model: nn.Module
    calib: torch.Tensor
    teacher: dict[str, torch.Tensor] | None
    cfg: QATConfig
    train: torch.Tensor
    heldout: torch.Tensor
    params: dict[str, nn.Parameter]
    device: torch.device

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self.calib[rows].to(self.device)
        teacher = None if self.teacher is None else {k: v[rows].to(self.device) for k, v in self.teacher.items()}
        with training_autocast(self.device, self.cfg.amp):
            return chunked_qat_loss(self.model, ids, teacher, self.cfg)

    @torch.no_grad()
    def evaluate(self) -> float:
        total = 0.0
        for rows in self.heldout.split(self.cfg.batch_size):
            total += float(self.loss(rows)) * rows.numel()
        return total / self.heldout.numel()


def _check_inputs(results: dict, calib: torch.Tensor, cfg: QATConfig, teacher) -> None:
    _check(calib.dim() == 2 and not calib.is_floating_point(), f"calib must be (N, T) integer token ids, got "
           f"{calib.dtype} {tuple(calib.shape)}")
    _check(bool(results), "results is empty: quantize the model first")
    if cfg.needs_teacher:
        _check(teacher is not None, f"loss {cfg.loss!r} needs teacher targets: call teacher_targets(fp_model, calib, "
               "cfg.topk) before quantizing, or set loss: ce")
        bad = {k: tuple(v.shape[:2]) for k, v in teacher.items() if tuple(v.shape[:2]) != tuple(calib.shape)}
        _check(not bad, f"teacher targets {bad} do not match calib {tuple(calib.shape)}: "
               "compute them on the same sequences")


def train_qat(
    model: nn.Module,
    results: dict[str, QuantizedWeight],
    calib: torch.Tensor,
    cfg: QATConfig,
    teacher: dict[str, torch.Tensor] | None = None,
    *,
    resume: dict | None = None,
    on_step: Callable[[int, float, float | None], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
) -> tuple[dict[str, QuantizedWeight], QATStats]:
    """Refine `results` (the model already holds their dequantized weights) end to end on calib
    (N, T) token ids. Returns (hardened results, stats); the model is again a plain HF model holding
    them (plus trained norms if cfg.train_norms).

    on_step(steps done, train loss, held-out loss or None); every `checkpoint_every` steps
    on_checkpoint(a dict of tensors and plain values) is called, and passing that dict back as
    `resume` (with a model rebuilt from the same inputs and the same cfg) continues bit-exactly on CPU.
    If training raises, the model is left mid-surgery: rebuild it and resume from a checkpoint.
    """
    _check_inputs(results, calib, cfg, teacher)
    train, held = _split(calib.shape[0], cfg)  # fails before any surgery
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()  # no dropout: the loss is a deterministic function of the parameters
    model.requires_grad_(False)
    mods = attach_qat(adapter, results, cfg.trainable)
    groups = _trainable(mods, adapter, cfg)
    params = {n: p for ps in groups.values() for n, p in ps.items()}
    for p in params.values():
        p.requires_grad_(True)
    run = _Run(model, calib, teacher if cfg.needs_teacher else None, cfg, train, held, params, device)
    opt, sched = _optimizer(groups, cfg)
    state = _start(run, opt, sched, resume)
    _set_checkpointing(adapter, cfg.grad_checkpoint)
    stopped = _loop(run, opt, sched, state, t0, on_step, checkpoint_every, on_checkpoint)
    _set_checkpointing(adapter, False)

    _load(params, state.best_params)  # the best held-out state, which is the init when nothing beat it
    kept_init = not state.best_heldout < state.init_heldout
    new_results = detach_qat(adapter, mods)
    for p, flag in flags:
        p.requires_grad_(flag)
    final = run.evaluate()
    model.train(was_training)
    return new_results, QATStats(
        steps=state.step, curve=state.curve, heldout_curve=state.heldout_curve, init_heldout=state.init_heldout,
        best_heldout=state.best_heldout, best_step=state.best_step, final_heldout=final, kept_init=kept_init,
        stopped_early=stopped, seconds=state.seconds + time.perf_counter() - t0, peak_mb=peak_memory_mb(device),
        trained_norms=sorted(groups.get("norms", {})), skipped_steps=state.skipped_steps,
        bf16=uses_bf16(device, cfg.amp),
    )


def _start(run: _Run, opt, sched, resume: dict | None) -> QATState:
    """Fresh state (held-out loss of the init) or the one a checkpoint carries."""
    if resume is None:
        loss = run.evaluate()
        return QATState(init_heldout=loss, best_heldout=loss, best_params=_snapshot(run.params),
                        heldout_curve=[(0, loss)])
    _check(resume.get("config") == asdict(run.cfg), "resume checkpoint was made with a different QATConfig: "
           "resume with the config it was saved with")
    _load(run.params, resume["params"])
    opt.load_state_dict(copy.deepcopy(resume["optimizer"]))
    sched.load_state_dict(resume["scheduler"])
    return QATState(**copy.deepcopy(resume["state"]))


def _checkpoint(run: _Run, opt, sched, state: QATState, seconds: float) -> dict:
    st = copy.deepcopy(state)
    st.seconds = seconds
    optim = copy.deepcopy(opt.state_dict())
    return {"config": asdict(run.cfg), "params": _snapshot(run.params), "optimizer": optim,
            "scheduler": sched.state_dict(), "state": asdict(st)}


def _loop(run: _Run, opt, sched, state: QATState, t0: float, on_step, checkpoint_every: int, on_checkpoint) -> bool:
    """Steps state.step .. cfg.steps; returns True when early stopping ended it."""
    cfg = run.cfg
    all_params = list(run.params.values())
    while state.step < cfg.steps and not (cfg.patience and state.bad_evals >= cfg.patience):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(cfg.grad_accum):
            rows = _rows(run.train, cfg.batch_size, cfg.seed, state.step * cfg.grad_accum + m)
            loss = run.loss(rows) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip)
        if math.isfinite(total) and torch.isfinite(norm):
            opt.step()
        else:  # a NaN/Inf batch or blow-up: no update, the parameters stay at their last good state
            state.skipped_steps.append(state.step)
        sched.step()
        state.step += 1
        state.curve.append(total if math.isfinite(total) else None)
        heldout = _maybe_evaluate(run, state)
        if checkpoint_every and on_checkpoint is not None and state.step % checkpoint_every == 0:
            on_checkpoint(_checkpoint(run, opt, sched, state, state.seconds + time.perf_counter() - t0))
        if on_step is not None:
            on_step(state.step, total, heldout)
    return state.step < cfg.steps


def _maybe_evaluate(run: _Run, state: QATState) -> float | None:
    """Held-out loss every eval_every steps and at the last step; tracks the best state."""
    cfg = run.cfg
    if state.step % cfg.eval_every and state.step != cfg.steps:
        return None
    loss = run.evaluate()
    state.heldout_curve.append((state.step, loss))
    if loss < state.best_heldout:
        state.best_heldout, state.best_step, state.bad_evals = loss, state.step, 0
        state.best_params = _snapshot(run.params)
    else:
        state.bad_evals += 1
    return loss
