"""Global QAT refinement (DESIGN method 8): fine-tune an already block-wise-quantized model end to end.

After block-wise PTQ every decoder Linear holds s (q - z). Here each one is swapped for a
`QATLinear` whose fake-quantized weight is trained against the model-level loss (next-token
cross-entropy and/or KL to the FP model's cached logits) on the calibration sequences (Xu et al. 2024,
"Understanding the difficulty of low-precision PTQ of LLMs"; EfficientQAT's E2E-QP trains only the
quantization parameters). Everything else (embeddings, norms unless asked, LM head) is frozen.

Two phases, as elsewhere in quantlib: `attach_qat` / `detach_qat` do the model surgery, `train_qat`
drives the training between them and always leaves a plain HF model holding the hardened weights.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import ModelAdapter, get_adapter
from .capture import swap_module
from .engine import peak_memory_mb
from .logits import LOGIT_BUDGET, chunked_sum, final_hidden, head_logits, position_chunks
from .optim import SCHEDULES, adamw_with_schedule
from .primitives import expand, round_ste
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

TRAINABLES = ("scales", "scales+zeros", "weights")
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
                      clamp(round_ste(latent / s + z0), 0, maxq) (straight-through), zeros fixed. The
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

    def __post_init__(self) -> None:
        _one_of("trainable", self.trainable, TRAINABLES)
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


# --------------------------------------------------------------------------- the fake-quant module


class QATLinear(nn.Module):
    """Fake-quantized stand-in for one quantized Linear (or GPT-2 Conv1D), in (out, in) orientation.

    Buffers: codes (out, in) uint8, scale0 / zero0 (out, G) fp32, g_idx (in,), bias (out,) or None.
    Parameters by mode: log_scale (out, G) always; zero (out, G) for "scales+zeros"; latent (out, in)
    for "weights" (in units of the initial step: the latent fp weight is s0 * latent). With nothing
    trained, forward equals the dequantized Linear bit for bit and
    `harden()` returns the input codes, scales and zeros unchanged.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, trainable: str) -> None:
        super().__init__()
        _one_of("trainable", trainable, TRAINABLES)
        self.spec, self.trainable = qw.spec, trainable
        # detached copies: results made with autograd on (e.g. RTN on a model whose weights require
        # grad) carry a graph back to the original weights
        self.register_buffer("codes", qw.qweight.detach().clone())
        self.register_buffer("scale0", qw.scale.detach().float().clone())
        self.register_buffer("zero0", qw.zero.detach().float().clone())
        self.register_buffer("g_idx", qw.g_idx.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))  # exp(0) == 1 exactly: s == s0 at init
        self.zero = nn.Parameter(self.zero0.clone()) if trainable == "scales+zeros" else None
        # "weights": the latent fp weight is s0 * latent, i.e. the parameter is kept in units of the
        # group's initial step so that one weight_lr fits every layer; init q0 - z0 (exact integers),
        # so s0 * latent is the dequantized weight bit for bit
        n = self.codes.shape[1]
        self.latent = None
        if trainable == "weights":
            self.latent = nn.Parameter(self.codes.float() - expand(self.zero0, n, self.g_idx))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each (out, G); zero is integral (STE through the rounding)."""
        scale = self.scale0 * torch.exp(self.log_scale)
        if self.zero is None:
            return scale, self.zero0
        return scale, torch.clamp(round_ste(self.zero), 0, self.spec.maxq)

    def fake_quant(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_hat (out, in), codes (out, in) float, scale, zero): w_hat = s (q - z), computed exactly as
        QuantizedWeight.dequantize does so the hardened result reproduces it."""
        scale, zero = self.qparams()
        n = self.codes.shape[1]
        s, z = expand(scale, n, self.g_idx), expand(zero, n, self.g_idx)
        if self.latent is None:
            q = self.codes.to(s.dtype)
        else:
            q = torch.clamp(round_ste(self.latent_weight() / s + z), 0, self.spec.maxq)
        return s * (q - z), q, scale, zero

    def latent_weight(self) -> torch.Tensor:
        """(out, in) latent fp weight of the "weights" mode: s0 * latent."""
        return expand(self.scale0, self.codes.shape[1], self.g_idx) * self.latent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant()[0]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def harden(self) -> QuantizedWeight:
        _, q, scale, zero = self.fake_quant()
        latent = None if self.latent is None else self.latent_weight().float().cpu().clone()
        return QuantizedWeight(q.to(torch.uint8).cpu(), scale.detach().float().cpu().clone(),
                               zero.detach().float().cpu().clone(), self.g_idx.cpu().clone(), self.spec, latent=latent)

    def param_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """{optimizer group: {parameter name: parameter}}."""
        groups = {"scales": {"log_scale": self.log_scale}, "zeros": {}, "weights": {}}
        if self.zero is not None:
            groups["zeros"]["zero"] = self.zero
        if self.latent is not None:
            groups["weights"]["latent"] = self.latent
        return groups


# --------------------------------------------------------------------------- model surgery


@dataclass
class QATModules:
    """The QATLinears now in the model and the modules they replaced, both by full module path."""

    qat: dict[str, QATLinear]
    original: dict[str, nn.Module]


def attach_qat(adapter: ModelAdapter, results: dict[str, QuantizedWeight], trainable: str) -> QATModules:
    """Replace every Linear named in `results` by a QATLinear on the same device (sorted by name, so
    parameter order, and hence optimizer state, is the same for the same inputs)."""
    model = adapter.model
    mods = QATModules({}, {})
    for name in sorted(results):
        original = model.get_submodule(name)
        device = adapter.get_weight(original).device
        qat = QATLinear(results[name], getattr(original, "bias", None), trainable).to(device)
        swap_module(model, name, qat)
        mods.qat[name], mods.original[name] = qat, original
    return mods


def detach_qat(adapter: ModelAdapter, mods: QATModules) -> dict[str, QuantizedWeight]:
    """Harden every QATLinear and put its original module back holding the dequantized result."""
    results = {}
    for name, qat in mods.qat.items():
        qw = qat.harden()
        original = mods.original[name]
        adapter.set_weight(original, qw.dequantize())
        adapter.model.set_submodule(name, original)
        results[name] = qw
    return results


class _Checkpointed(nn.Module):
    """One decoder block run under activation checkpointing (its activations are recomputed in the
    backward pass); attribute reads fall through so the model still sees e.g. `attention_type`."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def _set_checkpointing(adapter: ModelAdapter, on: bool) -> None:
    blocks = adapter.blocks
    for i, b in enumerate(blocks):
        if on and not isinstance(b, _Checkpointed):
            blocks[i] = _Checkpointed(b)
        elif not on and isinstance(b, _Checkpointed):
            blocks[i] = b.block


# --------------------------------------------------------------------------- teacher and loss


@torch.no_grad()
def teacher_targets(model: nn.Module, calib: torch.Tensor, topk: int = 64,
                    batch_size: int = 4, budget: int = LOGIT_BUDGET) -> dict[str, torch.Tensor]:
    """The FP model's next-token distributions on calib (N, T), computed once: call it on the FP
    model, before quantizing. Returns plain CPU tensors (safetensors-ready):

      topk > 0:  "topk_logprobs" (N, T, k) fp32  log p of the teacher's k most likely tokens,
                 "topk_indices"  (N, T, k) int32 their token ids,
                 "tail_logprob"  (N, T)    fp32  log of the remaining mass 1 - sum(top-k p).
      topk == 0 (or topk >= vocab): "logprobs" (N, T, V) fp32, the full log-softmax.

    Memory: full logits for 128 x 512 tokens at vocab 49152 are 12.9 GB in fp32; top-64 values and
    int32 indices are 2 x 16.8 MB (+ 0.26 MB of tail), so top-k is the default and full is for small
    vocabularies only. The logits themselves exist `budget` elements at a time (quantlib.logits). The values are unnormalized log-probs of the full softmax, so the loss can use
    the exact tail mass (see `qat_loss`).
    """
    _check(calib.dim() == 2, f"calib must be (N, T) token ids, got shape {tuple(calib.shape)}")
    _check(_int(topk) and topk >= 0 and batch_size >= 1, "topk must be >= 0 and batch_size >= 1")
    device = next(model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {}
    for rows in torch.arange(calib.shape[0]).split(batch_size):
        hidden = final_hidden(model, calib[rows].to(device))  # (B, T, d)
        vocab = model.config.vocab_size
        for sl in position_chunks(hidden.shape[0], hidden.shape[1], vocab, budget):  # (B, c, V) at a time
            logp = F.log_softmax(head_logits(model, hidden[:, sl]), -1)
            for key, value in _compress(logp, topk).items():
                chunks.setdefault(key, []).append(value.cpu())
    # chunks come batch by batch, position chunks in order: cat positions within a batch, then batches
    return {key: _cat_batches(values, calib.shape[1]) for key, values in chunks.items()}


def _cat_batches(parts: list[torch.Tensor], seq: int) -> torch.Tensor:
    """Position chunks (B, c, ...) of consecutive batches -> (N, T, ...)."""
    rows, acc, done = [], [], 0
    for p in parts:
        acc.append(p)
        done += p.shape[1]
        if done == seq:
            rows.append(torch.cat(acc, 1))
            acc, done = [], 0
    return torch.cat(rows)


def _compress(logp: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    if topk == 0 or topk >= logp.shape[-1]:
        return {"logprobs": logp}
    values, indices = logp.topk(topk, dim=-1)  # (B, T, k)
    tail = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (B, T), exact, no 1 - sum cancellation
    return {"topk_logprobs": values, "topk_indices": indices.to(torch.int32), "tail_logprob": tail}


def _kl(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || q_student).

    Top-k form: both distributions are coarsened to k + 1 outcomes, the teacher's top-k tokens and one
    "everything else" bucket, and the KL of those is taken exactly:
        sum_{i in top-k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
    with q_tail the student's mass outside the teacher's top-k. It is a lower bound of the full KL
    (data processing), equals it when the tail is empty, and unlike renormalizing onto the top-k it
    still penalizes a student that moves mass into the tail.
    """
    return _kl_sum(logits, teacher) / logits.shape[:2].numel()


def _kl_sum(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the (B, c) positions of `_kl`'s per-token KL; teacher holds the same positions."""
    logq = F.log_softmax(logits.float(), -1)  # (B, c, V)
    if "logprobs" in teacher:
        logp = teacher["logprobs"]
        return (logp.exp() * (logp - logq)).sum()
    logp, idx, tail = teacher["topk_logprobs"], teacher["topk_indices"].long(), teacher["tail_logprob"]
    q_top = logq.gather(-1, idx)  # (B, c, k)
    q_tail = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (B, c)
    top = (logp.exp() * (logp - q_top)).sum(-1)
    return (top + tail.exp() * (tail - q_tail)).sum()


def qat_loss(logits: torch.Tensor, ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None,
             cfg: QATConfig) -> torch.Tensor:
    """logits (B, T, V), ids (B, T), teacher: the matching rows of `teacher_targets` (or None for "ce").
    ce: mean next-token NLL over the B (T - 1) predicted positions; kl: mean over all B T positions."""
    ce = kl = None
    if "ce" in cfg.loss:
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if cfg.needs_teacher:
        kl = _kl(logits, teacher)
    if ce is None:
        return kl
    return ce if kl is None else ce + cfg.kl_weight * kl


def chunked_qat_loss(model: nn.Module, ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None,
                     cfg: QATConfig, budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """`qat_loss(model(ids).logits, ids, teacher, cfg)` with the LM head run on chunks of positions
    (quantlib.logits): equal value and gradients, at most `budget` logits alive at once."""
    n, t = ids.shape
    hidden = final_hidden(model, ids)  # (B, T, d)

    def score(logits: torch.Tensor, sl: slice) -> torch.Tensor:  # logits (B, c, V) for positions sl
        total = logits.new_zeros(())
        if "ce" in cfg.loss:
            last = min(sl.stop, t - 1) - sl.start  # positions t <= T - 2 have a next token
            if last > 0:
                target = ids[:, sl.start + 1 : sl.start + 1 + last]
                ce = F.cross_entropy(logits[:, :last].flatten(0, 1), target.flatten(), reduction="sum")
                total = total + ce / (n * (t - 1))
        if cfg.needs_teacher:
            part = {k: v[:, sl] for k, v in teacher.items()}
            weight = cfg.kl_weight if "ce" in cfg.loss else 1.0
            total = total + weight * _kl_sum(logits, part) / (n * t)
        return total

    return chunked_sum(model, hidden, score, budget)


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
                           f"{p.dtype}: load the model in float32 (bf16 autocast is applied on CUDA)")
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
        with _autocast(self.device):
            return chunked_qat_loss(self.model, ids, teacher, self.cfg)

    @torch.no_grad()
    def evaluate(self) -> float:
        total = 0.0
        for rows in self.heldout.split(self.cfg.batch_size):
            total += float(self.loss(rows)) * rows.numel()
        return total / self.heldout.numel()


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (trainable parameters stay fp32); exact fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


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
