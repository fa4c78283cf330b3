"""Pipeline parameters: params.yaml parsed once into frozen, validated configs.

One frozen dataclass per params.yaml section; `PipelineParams` holds one of each, its field names
being the section names. Every value is checked when a config is built (`__post_init__`), so a bad
params.yaml or `-S section.key=value` override fails before any stage runs, with a message that
starts with the key path: `quantize.bits: must be an integer in 2..8, got 9`.

Types are strict: a bool must be a YAML bool (not `yes` in quotes), an int must not be a bool or a
float; a float key accepts an int. List values are stored as tuples so configs stay immutable.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import yaml

__all__ = [
    "CALIB_SPLITS",
    "DTYPES",
    "EVAL_SPLITS",
    "GGUF_TYPES",
    "METHODS",
    "PACK_FORMATS",
    "SECTIONS",
    "EvaluateParams",
    "FetchModelParams",
    "OrchestrationParams",
    "PackParams",
    "ParamsError",
    "PipelineParams",
    "PrepareDataParams",
    "QatParams",
    "QuantizeParams",
    "ReconParams",
    "RegisterParams",
    "dump_default_params",
    "dump_params",
    "flatten",
    "load_params",
    "params_from_dict",
    "params_to_dict",
    "section_keys",
]

METHODS = ("auto", "rtn", "gptq", "boa", "recon")
# quantize.method: auto, by bits: the best measured on the benchmark protocol (docs/protocol.md) with qat on
# (docs/benchmarks/quality.md, wiki / python-docs, means over calibration seeds 0-2): W2 g64 recon+qat128
# 47.67 / 93.09 against boa-d0.1+qat160 64.55 / 151.16 (one seed); W3 g64 recon+qat 30.02 / 18.39 against
# boa-d0.1+qat 31.30 / 21.13. Windows run on a bf16 source too; an RTN-started job solves the LM head by GPTQ.
AUTO_METHODS, HIGH_BIT_METHOD = {2: "recon", 3: "recon"}, "gptq"
# quantize.damp auto, by bits: at 2 and 3 bits damping 0.1 scores better on both texts (it fits the Hessians
# less to the calibration text); at 4 bits per channel it trades wiki for python-docs, so 0.01 stays
# (docs/benchmarks/transfer.md).
AUTO_DAMP, HIGH_BIT_DAMP = {2: 0.1, 3: 0.1}, 0.01
# qat.steps / qat.lr auto, by the fewest bits: at 2 bits twice the steps at twice the rate (W2 g64 from
# the windows: 47.40 in 1393 s, within AutoRound's time); at 3 bits lr 1e-2 and 128 steps were no better
# than 5e-3 and 64 (README, quiet rows of 2026-12-05).
AUTO_QAT_STEPS, DEFAULT_QAT_STEPS = {2: 128}, 64
AUTO_QAT_LR, DEFAULT_QAT_LR = {2: 1e-2}, 5e-3
ROUNDINGS = ("nearest", "adaround", "lora", "signed")  # quantlib.recon.ROUNDINGS (a test keeps them equal)
RECON_OPTIMIZERS = ("adam", "sign")  # quantlib.optim.OPTIMIZERS (a test keeps them equal)
RECON_LOSSES = ("mse", "kl", "mse+kl")
RECON_INITS = ("rtn", "gptq", "boa")
RECON_GRIDS = ("auto", "init", "learned")
SCHEDULES = ("cosine", "linear", "constant")
AMP_MODES = ("auto", "bf16", "fp32")  # quantlib.optim.AMP_MODES (a test keeps them equal)
QAT_TRAINABLES = ("scales", "scales+zeros", "weights")
QAT_LOSSES = ("ce", "kl", "ce+kl")
DTYPES = ("float32", "bfloat16", "float16")
CALIB_SPLITS = ("first_half", "all")
EVAL_SPLITS = ("second_half", "all")
PACK_FORMATS = ("auto", "gptq", "gptq_v2", "compressed-tensors", "gguf")
GGUF_TYPES = ("exact", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # quantlib.gguf_k.GGUF_TYPES (a test keeps them equal)
BLOCK_INPUTS = ("quantized", "fp")
QUANTIZE_TARGETS = ("blocks", "lm_head")  # quantlib.head.HEAD_TARGETS
RUNNERS = ("sequential", "threads", "dask", "ray")


class ParamsError(ValueError):
    """An invalid params.yaml, section, key, value or override; the message starts with its path."""


# ---------------------------------------------------------------------------------------------
# Value checks. Each takes (key path, value) and returns the value, normalized (lists -> tuples,
# ints -> floats for float keys), or raises ParamsError.

Check = Callable[[str, Any], Any]


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _expected(path: str, kind: str, value: Any) -> ParamsError:
    return ParamsError(f"{path}: expected {kind}, got {_describe(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _boolean() -> Check:
    def check(path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _expected(path, "bool", value)
        return value

    return check


def _integer(lo: int | None = None, hi: int | None = None, *, nullable: bool = False) -> Check:
    if lo is not None and hi is not None:
        rule = f"an integer in {lo}..{hi}"
    elif lo == 1:
        rule = "a positive integer"
    else:
        rule = "an integer" if lo is None else f"an integer >= {lo}"
    rule += " or null" if nullable else ""

    def check(path: str, value: Any) -> int | None:
        if value is None and nullable:
            return None
        if not _is_int(value):
            raise _expected(path, "int or null" if nullable else "int", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ParamsError(f"{path}: must be {rule}, got {value}")
        return value

    return check


def _open_interval(lo: float, hi: float) -> Check:
    def check(path: str, value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _expected(path, "float", value)
        if not lo < value < hi:  # also rejects nan
            raise ParamsError(f"{path}: must be in the open interval ({lo}, {hi}), got {value}")
        return float(value)

    return check


def _fraction() -> Check:
    """[0, 1): a share that may be 0 (off)."""
    def check(path: str, value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _expected(path, "float", value)
        if not 0 <= value < 1:  # also rejects nan
            raise ParamsError(f"{path}: must be in [0, 1) (0 = off), got {value}")
        return float(value)

    return check


def _bool_or_auto() -> Check:
    def check(path: str, value: Any) -> bool | str:
        if not (isinstance(value, bool) or value == "auto"):
            raise _expected(path, "true, false or 'auto'", value)
        return value

    return check


def _or_auto(inner: Check, rule: str) -> Check:
    def check(path: str, value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return inner(path, value)
        except ParamsError:
            raise ParamsError(f"{path}: must be 'auto' or {rule}, got {_describe(value)}") from None

    return check


def _positive() -> Check:
    return _open_interval(0, float("inf"))


def _or_null(inner: Check) -> Check:
    def check(path: str, value: Any) -> Any:
        return None if value is None else inner(path, value)

    return check


def _positive_or_null() -> Check:
    return _or_null(_positive())


def _closed_interval(lo: float, hi: float) -> Check:
    def check(path: str, value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _expected(path, "float", value)
        if not lo <= value <= hi:  # also rejects nan
            raise ParamsError(f"{path}: must be in [{lo}, {hi}] or null, got {value}")
        return float(value)

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(path: str, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            allowed = ", ".join(repr(o) for o in options)
            raise ParamsError(f"{path}: must be one of {allowed}, got {_describe(value)}")
        return value

    return check


def _text(*, nullable: bool = False, pattern: str | None = None, rule: str = "") -> Check:
    """A non-empty string, optionally null, optionally matching `pattern` (explained by `rule`)."""

    def check(path: str, value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise _expected(path, "str or null" if nullable else "str", value)
        if not value.strip():
            raise ParamsError(f"{path}: must be a non-empty string")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ParamsError(f"{path}: {rule}, got {value!r}")
        return value

    return check


def _text_list() -> Check:
    def check(path: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise _expected(path, "a list of str", value)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ParamsError(f"{path}: item {i} must be a non-empty string, got {_describe(item)}")
        if len(set(value)) != len(value):
            raise ParamsError(f"{path}: items must be unique, got {list(value)}")
        return tuple(value)

    return check


def _schemes() -> Check:
    """A list of distinct scheme names (quantlib.spec.parse_scheme: w2g64, w4pc, w8pcs), maybe empty."""
    items = _text_list()

    def check(path: str, value: Any) -> tuple[str, ...]:
        from quantlib.spec import parse_scheme

        value = items(path, value)
        for item in value:
            try:
                parse_scheme(item)
            except ValueError as e:
                raise ParamsError(f"{path}: {e}") from None
        return value

    return check


def _subset(options: tuple[str, ...], required: str) -> Check:
    """A list of distinct items of `options` that includes `required`."""
    items = _text_list()

    def check(path: str, value: Any) -> tuple[str, ...]:
        value = items(path, value)
        for item in value:
            if item not in options:
                raise ParamsError(f"{path}: {item!r} is not a target; allowed: {', '.join(map(repr, options))}")
        if required not in value:
            raise ParamsError(f"{path}: must include {required!r}, got {list(value)}")
        return value

    return check


def _key(default: Any, check: Check) -> Any:
    """A section key: its default and the check run on every value it is given."""
    return field(default=default, metadata={"check": check})


class _Section:
    """Base of the section configs: runs each field's check with its key path as prefix."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = f.metadata["check"](f"{self.SECTION}.{f.name}", getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # normalized value; the dataclass is frozen


# ---------------------------------------------------------------------------------------------
# Sections, in stage order. The first docstring line is the section's comment in params.yaml.


@dataclass(frozen=True)
class FetchModelParams(_Section):
    """The model to quantize (a known name, Hub repo id or local dir) and its compute dtype.

    dtype: what every stage loads and runs the model in: capture, blocks, QAT (its trainable scales
    and optimizer state stay float32) and evaluation (bfloat16 / float16 halve host memory and the
    activation shards; Hessians and the GPTQ/BoA solves stay float32; recon windows run the blocks
    and activations in it, their learned rounding, clipping and optimizer state stay float32).
    rotate: residual applies QuaRot's residual-stream and per-head rotations (quantlib.rotation) to
    the fetched model, FP-exact, before anything reads it: data/model holds the rotated checkpoint
    (float32 tensors, its config keeping the fetched dtype that releases are packed in; norms folded
    to 1, LM head untied), so activation outliers spread across channels
    and every later stage, and the release, use it; rotate_seed draws the rotation. null: as fetched.
    """

    SECTION: ClassVar[str] = "fetch_model"
    source: str = _key("smollm2-135m", _text())
    trust_remote_code: bool = _key(False, _boolean())
    dtype: str = _key("float32", _choice(DTYPES))
    rotate: str | None = _key(None, _text(nullable=True, pattern=r"residual|full",
                                          rule="must be residual (QuaRot's offline rotation) or null"))
    rotate_seed: int = _key(0, _integer())

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotate == "full":
            raise ParamsError("fetch_model.rotate: full also rotates down_proj's inputs online (a Hadamard at run "
                              "time), which no release format here carries to other runtimes yet; use residual "
                              "(offline only: a plain checkpoint every runtime serves), or measure full with "
                              "`ptq bench quality --rotate full`")


@dataclass(frozen=True)
class PrepareDataParams(_Section):
    """Calibration and evaluation token ids (defaults = the benchmark protocol).

    calib_split first_half is the protocol's calibration pool; eval_split second_half the held-out
    half (python-docs, the off-domain text, is never halved). calib_source may join texts with "+"
    for equal shares (wikitext2+python-docs). eval_windows null scores every window; mirror null
    reads env PTQ_DATA_MIRROR.
    """

    SECTION: ClassVar[str] = "prepare_data"
    calib_source: str = _key("wikitext2", _text())
    calib_split: str = _key("first_half", _choice(CALIB_SPLITS))
    n_samples: int = _key(128, _integer(1))
    seqlen: int = _key(512, _integer(1))
    seed: int = _key(0, _integer())
    eval_sources: tuple[str, ...] = _key(("wikitext2",), _text_list())
    eval_split: str = _key("second_half", _choice(EVAL_SPLITS))
    eval_window: int = _key(1024, _integer(2))
    eval_windows: int | None = _key(16, _integer(1, nullable=True))
    mirror: str | None = _key(None, _text(nullable=True))

    def resolved_mirror(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The data mirror to read from: `mirror`, else $PTQ_DATA_MIRROR, else None."""
        return self.mirror if self.mirror is not None else (environ.get("PTQ_DATA_MIRROR") or None)


def fewest_bits(bits: int, mixed_from: tuple[str, ...]) -> int:
    """The fewest bits a Linear may get: the scheme's, or a mixed-precision candidate's."""
    from quantlib.spec import parse_scheme

    return min([bits, *(parse_scheme(s).bits for s in mixed_from)])


@dataclass(frozen=True)
class QuantizeParams(_Section):
    """Method (auto = recon at 2 bits, boa at 3, gptq above), scheme (bits, group_size: null = per output channel, sym)
    and solver options. damp: the GPTQ/BoA Hessian damping (a fraction of mean(diag H)); auto = 0.1 at 2
    and 3 bits, where it scores better on the calibration text and off it, 0.01 above (AUTO_DAMP).
    error_sequences: the per-block error F_q vs F in metrics/block_errors.json is
    measured on the first that many calibration sequences (null: all; a full FP pass per block costs ~40%
    of a GPTQ block). inputs: what each block is calibrated on: the quantized prefix's outputs
    (quantized: sequential, as GPTQ) or the FP model's (fp: blocks are independent and run in
    parallel on a task runner; recon windows always take the quantized prefix). targets: blocks (every
    decoder-block Linear), plus lm_head to quantize the LM head too (after the last block, GPTQ for
    the Hessian methods; a head tied to the input embeddings is untied, the embeddings stay FP).
    moe_min_tokens: in a mixture-of-experts model, an expert the router sent fewer calibration tokens
    gets its Hessian shrunk toward the mean of its layer's experts (routers stay full precision).
    activations: null (weight-only), a8 / a4: the release also quantizes every quantized Linear's
    input, symmetric, one dynamic scale per token (quantlib.actquant), or a8s / a4s: one static scale
    per Linear, calibrated on the calibration set by the pack stage (and by QAT for its forward); the
    evaluation scores the release with it, and it needs a compressed-tensors (or ptq) release.
    quantized_inputs: with activations, solve every block with its Linears' inputs quantized as the
    release quantizes them (Hessians from quantized inputs; later blocks calibrated on the quantized
    model's activations; quantlib EngineConfig.act_inputs); gptq, boa, and recon (whose windows
    also train with their Linears' inputs fake-quantized).
    mixed_from: mixed precision (quantlib.mixed): the schemes a Linear may take, e.g. [w2g192, w3g64];
    each group of Linears that share an input gets the one that minimizes the Fisher-estimated loss
    within mixed_bits bits per weight (scales and zeros counted; null: the size of the uniform
    bits/group_size/sym scheme, which also stays the LM head's), measured on the first mixed_samples
    calibration sequences. Empty: every Linear on bits/group_size/sym."""

    SECTION: ClassVar[str] = "quantize"
    method: str = _key("auto", _choice(METHODS))
    bits: int = _key(4, _integer(2, 8))
    group_size: int | None = _key(64, _integer(1, nullable=True))
    sym: bool = _key(False, _boolean())
    act_order: bool = _key(True, _boolean())
    damp: float | str = _key("auto", _or_auto(_open_interval(0, 1), "a number in the open interval (0, 1)"))
    block_size: int = _key(128, _integer(1))
    true_sequential: bool = _key(True, _boolean())
    clip_search: bool = _key(False, _boolean())
    batch_size: int = _key(8, _integer(1))
    spill_to_disk: bool = _key(False, _boolean())
    error_sequences: int | None = _key(16, _integer(1, nullable=True))
    inputs: str = _key("quantized", _choice(BLOCK_INPUTS))
    device: str = _key(
        "auto", _text(pattern=r"auto|cpu|cuda(:\d+)?", rule="must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    )
    targets: tuple[str, ...] = _key(("blocks",), _subset(QUANTIZE_TARGETS, "blocks"))
    moe_min_tokens: int = _key(128, _integer(1))
    activations: str | None = _key(None, _text(nullable=True, pattern=r"a8s?|a4s?",
                                                rule="must be a8, a4 (dynamic), a8s, a4s (static) or null"))
    quantized_inputs: bool = _key(False, _boolean())
    mixed_from: tuple[str, ...] = _key((), _schemes())
    mixed_bits: float | None = _key(None, _or_null(_closed_interval(1, 16)))
    mixed_samples: int = _key(32, _integer(1))

    @property
    def min_bits(self) -> int:
        """The fewest bits a Linear may get (qat.enabled auto decides on it)."""
        return fewest_bits(self.bits, self.mixed_from)

    @property
    def all_sym(self) -> bool:
        """Every scheme a Linear may get is symmetric (what pack.format auto decides on)."""
        from quantlib.spec import parse_scheme

        return self.sym and all(parse_scheme(s).sym for s in self.mixed_from)

    def __post_init__(self) -> None:
        super().__post_init__()
        from quantlib.actquant import parse_activations

        if self.mixed_bits is not None and not self.mixed_from:
            raise ParamsError(f"quantize.mixed_bits: {self.mixed_bits} sizes a mixed-precision plan; list its schemes "
                              "in quantize.mixed_from (e.g. [w2g192, w3g64]) or set mixed_bits: null")

        if self.quantized_inputs and self.activations is not None and parse_activations(self.activations).static:
            raise ParamsError(f"quantize.quantized_inputs: takes dynamic activations (a8, a4), not "
                              f"{self.activations}: static scales are calibrated once the weights are solved")
        if self.quantized_inputs and self.activations is None:
            raise ParamsError("quantize.quantized_inputs: true solves on the inputs quantize.activations quantizes; "
                              "set quantize.activations: a8 or a4, or quantized_inputs: false")
        if self.quantized_inputs and self.resolved_method not in ("gptq", "boa", "recon"):
            raise ParamsError(f"quantize.quantized_inputs: applies to gptq, boa and recon (they solve or train on "
                              f"inputs; {self.resolved_method} reads none); choose one of them, or "
                              "quantized_inputs: false")
        if self.inputs == "fp" and self.resolved_method == "recon":
            auto = " (quantize.method auto is recon at this many bits)" if self.method == "auto" else ""
            raise ParamsError(f"quantize.inputs: fp applies to rtn, gptq and boa; recon windows are trained on the "
                              f"quantized prefix's outputs{auto}: set quantize.inputs: quantized, or quantize.method: "
                              "gptq or boa")

    @property
    def resolved_method(self) -> str:
        """The method that runs: `method`, with auto chosen by bits (AUTO_METHODS, else HIGH_BIT_METHOD)."""
        if self.method != "auto":
            return self.method
        return AUTO_METHODS.get(self.bits, HIGH_BIT_METHOD)

    @property
    def resolved_damp(self) -> float:
        """The GPTQ/BoA Hessian damping: `damp`, with auto chosen by bits (AUTO_DAMP, else HIGH_BIT_DAMP)."""
        if self.damp != "auto":
            return self.damp
        return AUTO_DAMP.get(self.bits, HIGH_BIT_DAMP)


@dataclass(frozen=True)
class ReconParams(_Section):
    """Cross-block reconstruction windows (used when quantize.method is recon).

    window k blocks per window, overlap o < k shared with the next window, lookahead L frozen FP
    blocks after the window the loss is measured at (k=1,o=0,L=0: single-block). learn_clip / learn_scale /
    rounding (nearest | adaround | lora with rank | signed: SignRound's round(W / s + z + v)) / learn_weights
    choose what is trained; init is the
    method the codes start from; grid: init keeps the codes on the initializer's grid and learns the
    dequantization scale (auto: for gptq/boa inits), learned re-derives them on learned clipping (auto:
    for rtn); lr is the rounding rate, clip_lr the clipping/scale rate, optimizer adam or sign (SignRound's
    p -= lr sign(grad), with schedule linear and lr about 1 / iters). heldout: share of the calibration
    batches a window never trains on, whose loss the keep-or-revert guard judges (0: the training
    batches); eval_every > 0 evaluates it during training, keeps the best state and stops after
    `patience` evaluations without improvement (0: never early). amp: the training forward's arithmetic
    (auto: bf16 autocast on CUDA and on a CPU with AMX or AVX512-BF16, else fp32; bf16; fp32).
    """

    SECTION: ClassVar[str] = "recon"
    window: int = _key(1, _integer(1))
    overlap: int = _key(0, _integer(0))
    lookahead: int = _key(0, _integer(0))
    rounding: str = _key("signed", _choice(ROUNDINGS))
    rank: int = _key(4, _integer(1))
    learn_clip: bool = _key(True, _boolean())
    learn_scale: bool = _key(False, _boolean())
    learn_weights: bool = _key(False, _boolean())
    loss: str = _key("mse", _choice(RECON_LOSSES))
    kl_weight: float = _key(1.0, _positive())
    init: str = _key("rtn", _choice(RECON_INITS))
    grid: str = _key("auto", _choice(RECON_GRIDS))
    iters: int = _key(100, _integer(0))
    batch_size: int = _key(4, _integer(1))
    lr: float = _key(1e-2, _positive())
    clip_lr: float = _key(0.3, _positive())
    schedule: str = _key("linear", _choice(SCHEDULES))
    optimizer: str = _key("sign", _choice(RECON_OPTIMIZERS))
    seed: int = _key(0, _integer(0))
    heldout: float = _key(0.0, _fraction())
    eval_every: int = _key(0, _integer(0))
    patience: int = _key(0, _integer(0))
    amp: str = _key("auto", _choice(AMP_MODES))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_every and not self.heldout:
            raise ParamsError("recon.eval_every: early stopping judges on held-out batches: set recon.heldout "
                              "(e.g. 0.125) or eval_every: 0")
        if self.overlap >= self.window:
            raise ParamsError(f"recon.overlap: must be smaller than recon.window ({self.window}), got {self.overlap}")
        if self.learn_weights and self.rounding != "nearest":
            raise ParamsError("recon.learn_weights: training the weights needs recon.rounding: nearest")


@dataclass(frozen=True)
class QatParams(_Section):
    """Global QAT refinement after block-wise PTQ; disabled = pass the quantized state through.

    enabled: true, false, or auto = on for 2- and 3-bit schemes (quantize.bits <= 3), where it measured
    best (docs/benchmarks/quality.md: GPTQ W3 g64 47.73 -> 32.16 with QAT), off at 4 bits and above.
    trainable: scales | scales+zeros | weights; loss: kl (to the FP model's top-k logits) | ce | ce+kl;
    steps / lr: auto = 128 steps at lr 1e-2 at 2 bits, 64 at 5e-3 above (AUTO_QAT_STEPS, AUTO_QAT_LR);
    heldout: fraction of calibration sequences held out and scored every eval_every steps; the best
    scoring state ships (the windows' result if none beats it); patience: stop after that many scores
    without improvement (0 = run every step: at W3 g64 seed 1, patience 3 stopped at step 24 while the
    held-out loss still rose from its warm-up, 31.22; the full 64 steps gave 29.87);
    checkpoint_every: steps between resumable checkpoints (0 = none); amp: the training forward's
    arithmetic, as recon.amp.
    """

    SECTION: ClassVar[str] = "qat"
    enabled: bool | str = _key("auto", _bool_or_auto())
    trainable: str = _key("scales", _choice(QAT_TRAINABLES))
    loss: str = _key("kl", _choice(QAT_LOSSES))
    kl_weight: float = _key(1.0, _positive())
    topk: int = _key(64, _integer(0))
    steps: int | str = _key("auto", _or_auto(_integer(0), "an integer >= 0"))
    lr: float | str = _key("auto", _or_auto(_positive(), "a positive number"))
    batch_size: int = _key(4, _integer(1))
    grad_accum: int = _key(1, _integer(1))
    schedule: str = _key("cosine", _choice(SCHEDULES))
    heldout: float = _key(0.125, _open_interval(0, 1))
    eval_every: int = _key(8, _integer(1))
    patience: int = _key(0, _integer(0))
    grad_checkpoint: bool = _key(False, _boolean())
    checkpoint_every: int = _key(8, _integer(0))
    seed: int = _key(0, _integer(0))
    amp: str = _key("auto", _choice(AMP_MODES))

    def active(self, bits: int) -> bool:
        """Whether the qat stage trains for a scheme of `bits` bits."""
        return bits <= 3 if self.enabled == "auto" else self.enabled

    def resolved_steps(self, bits: int) -> int:
        """`steps`, with auto chosen by the fewest bits (AUTO_QAT_STEPS, else DEFAULT_QAT_STEPS)."""
        return AUTO_QAT_STEPS.get(bits, DEFAULT_QAT_STEPS) if self.steps == "auto" else self.steps

    def resolved_lr(self, bits: int) -> float:
        """`lr`, with auto chosen by the fewest bits (AUTO_QAT_LR, else DEFAULT_QAT_LR)."""
        return AUTO_QAT_LR.get(bits, DEFAULT_QAT_LR) if self.lr == "auto" else self.lr


@dataclass(frozen=True)
class PackParams(_Section):
    """Release format: auto (gptq if symmetric, else gptq_v2), gptq, gptq_v2, compressed-tensors or gguf.

    gguf is llama.cpp's single file (Llama, Mistral without sliding window, Qwen2, Qwen3; groups a
    multiple of 32; see tasks/gguf_release.py for the exact type each scheme gets). gguf_type: exact
    (that legacy type: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, our codes bit for bit) or a K-quant type (Q2_K,
    Q3_K, Q4_K, Q5_K, Q6_K: smaller files, fitted to our dequantized weights, each module's relative
    weight error recorded in quantization.json; rows not a multiple of 256 keep the exact type).

    gptq is GPTQ v1 (zeros stored minus one: vLLM's Marlin and ExLlama kernels, GPTQModel); an
    asymmetric v1 checkpoint cannot store a zero point of 0 and GPTQModel (7.6) refuses to load one,
    so auto writes asymmetric schemes as gptq_v2 (zeros as they are: GPTQModel, vLLM >= 0.11)."""

    SECTION: ClassVar[str] = "pack"
    format: str = _key("auto", _choice(PACK_FORMATS))
    gguf_type: str = _key("exact", _choice(GGUF_TYPES))

    def resolved(self, sym: bool, activations: str | None = None) -> str:
        """The format written for a scheme with this symmetry (and activation quantization: only
        compressed-tensors records it)."""
        if self.format != "auto":
            return self.format
        if activations is not None:
            return "compressed-tensors"
        return "gptq" if sym else "gptq_v2"


@dataclass(frozen=True)
class EvaluateParams(_Section):
    """Perplexity on the prepared windows, plus optional lm-eval tasks (limit null = all docs)."""

    SECTION: ClassVar[str] = "evaluate"
    lm_eval_tasks: tuple[str, ...] = _key((), _text_list())
    lm_eval_limit: int | None = _key(None, _integer(1, nullable=True))
    batch_size: int = _key(4, _integer(1))


@dataclass(frozen=True)
class RegisterParams(_Section):
    """MLflow run and registry (null tracking_uri = $MLFLOW_TRACKING_URI or ./mlflow.db).

    tracking_uri null = env MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db.
    model_name null = derived by the register stage as `ptq-<model>-<scheme>`.
    max_ppl_ratio: the quality gate; the alias moves to a new version only when its perplexity is
    at most this multiple of the FP model's (on the first evaluation source). null = no gate.
    """

    SECTION: ClassVar[str] = "register"
    tracking_uri: str | None = _key(None, _text(nullable=True))
    experiment: str = _key("ptq-pipeline", _text())
    model_name: str | None = _key(
        None, _text(nullable=True, pattern=r"[^/:]+", rule="must not contain '/' or ':' (MLflow)")
    )
    alias: str = _key(
        "candidate",
        _text(
            pattern=r"(?!(?i:latest|v\d+)$)[\w-]+",
            rule="must be letters, digits, '_' or '-', and not 'latest' or 'v<N>' (reserved by MLflow)",
        ),
    )
    max_ppl_ratio: float | None = _key(None, _positive_or_null())

    def resolved_tracking_uri(self, project_root: Path, environ: Mapping[str, str] = os.environ) -> str:
        """`tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite in the project root."""
        if self.tracking_uri is not None:
            return self.tracking_uri
        return environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class OrchestrationParams(_Section):
    """Where tasks run and where their results live; no stage's output depends on these.

    runner: sequential (in the stage's process) | threads | dask | ray; address: an existing cluster
    (dask scheduler `tcp://host:8786`, ray `ray://host:10001` or `auto`), null = a local one with
    `workers` worker processes for the run. storage: the root of the content-addressed cache
    (activation shards, block codes, Prefect results), null = <project>/.cache/ptq; a shared
    filesystem path lets several checkouts or hosts share hits.
    """

    SECTION: ClassVar[str] = "orchestration"
    runner: str = _key("sequential", _choice(RUNNERS))
    address: str | None = _key(
        None, _text(nullable=True, pattern=r"(tcp|tls|ray)://\S+|auto|\S+:\d+",
                    rule="must be a scheduler address: tcp://host:port (dask), ray://host:port or auto (ray)"))
    workers: int = _key(2, _integer(1))
    storage: str | None = _key(
        None, _text(nullable=True, pattern=r"(?![A-Za-z][A-Za-z0-9+.-]*://).+",
                    rule="must be a filesystem path (local, or a shared mount such as NFS or an S3 FUSE mount); "
                         "URLs are not read directly"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.address is not None and self.runner not in ("dask", "ray"):
            raise ParamsError(f"orchestration.address: only the dask and ray runners connect to a cluster "
                              f"(orchestration.runner is {self.runner!r})")
        if self.address is not None and (self.runner == "ray") != self.address.startswith(("ray://", "auto")):
            raise ParamsError(f"orchestration.address: {self.address!r} is not a {self.runner} address "
                              "(dask: tcp://host:port; ray: ray://host:port or auto)")

    def storage_root(self, project_root: Path) -> Path:
        """The cache root: `storage` (relative to the project root), else <project>/.cache/ptq."""
        return Path(project_root) / (self.storage if self.storage is not None else ".cache/ptq")


@dataclass(frozen=True)
class PipelineParams:
    """All of params.yaml: one validated config per section (field name = section name)."""

    fetch_model: FetchModelParams = field(default_factory=FetchModelParams)
    prepare_data: PrepareDataParams = field(default_factory=PrepareDataParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    recon: ReconParams = field(default_factory=ReconParams)
    qat: QatParams = field(default_factory=QatParams)
    pack: PackParams = field(default_factory=PackParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    orchestration: OrchestrationParams = field(default_factory=OrchestrationParams)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), f.default_factory):
                raise _expected(f.name, f.default_factory.__name__, getattr(self, f.name))
        if self.quantize.activations is not None and self.pack.format not in ("auto", "compressed-tensors"):
            raise ParamsError(f"quantize.activations: {self.quantize.activations} needs a release format that records "
                              f"activation quantization; pack.format {self.pack.format} cannot (set pack.format: "
                              "compressed-tensors or auto)")
        if self.pack.gguf_type != "exact" and self.pack.format != "gguf":
            raise ParamsError(f"pack.gguf_type: {self.pack.gguf_type} is a GGUF type; set pack.format: gguf, or "
                              "pack.gguf_type: exact for other formats")
        if self.pack.format == "gguf":
            from quantlib.gguf import gguf_type
            from quantlib.spec import QuantSpec

            from quantlib.spec import parse_scheme

            q = self.quantize
            try:
                for spec in [QuantSpec(q.bits, q.group_size, q.sym), *map(parse_scheme, q.mixed_from)]:
                    gguf_type(spec)
            except ValueError as e:
                raise ParamsError(f"pack.format: {e}") from None


SECTIONS: Mapping[str, type[_Section]] = MappingProxyType(
    {f.name: f.default_factory for f in fields(PipelineParams)}  # type: ignore[misc]
)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, export.


class _Loader(yaml.SafeLoader):
    """SafeLoader reading scalars as YAML 1.2 (and DVC's ruamel.yaml) do where 1.1 differs:
    only true/false are bools (`yes`, `on` stay strings), and `1e-3` is a float."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings _Loader would read as something else (`1e3`), besides those
    YAML 1.1 readers would (`yes`, `1.5`): params.yaml must read back as what was written."""


_Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _Dumper.yaml_implicit_resolvers.setdefault(_first, [])
    _Dumper.yaml_implicit_resolvers[_first] += [r for r in _resolvers if r not in _Dumper.yaml_implicit_resolvers[_first]]


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: Path, overrides: Sequence[str] = ()) -> PipelineParams:
    """Read params.yaml, apply `section.key=value` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        raw = _parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {e}") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {_describe(raw)}")
    for text in overrides:
        _apply_override(raw, text)
    return params_from_dict(raw)


def _apply_override(raw: dict[str, Any], text: str) -> None:
    """Set raw[section][key] from `section.key=value`; checking the result is left to the loader."""
    path, sep, value_text = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not (sep and dot and section and key) or "." in key:
        raise ParamsError(f"{text}: malformed override (expected section.key=value)")
    try:
        value = _parse_yaml(value_text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{section}.{key}: cannot parse override value {value_text!r}: {e}") from e
    body = raw.get(section)
    if body is None:
        body = raw[section] = {}
    if not isinstance(body, dict):
        raise _expected(section, "a mapping of keys", body)
    body[key] = value


def params_from_dict(raw: Mapping[str, Any]) -> PipelineParams:
    """Build and validate configs from a {section: {key: value}} mapping; missing ones default."""
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(f"{name}: unknown section (allowed: {', '.join(SECTIONS)})")
    return PipelineParams(**{name: _section_from_dict(cls, raw.get(name)) for name, cls in SECTIONS.items()})


def _section_from_dict(cls: type[_Section], body: Any) -> _Section:
    body = {} if body is None else body
    if not isinstance(body, Mapping):
        raise _expected(cls.SECTION, "a mapping of keys", body)
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in body:
        if key not in allowed:
            raise ParamsError(f"{cls.SECTION}.{key}: unknown key (allowed: {', '.join(allowed)})")
    return cls(**body)


def params_to_dict(params: PipelineParams) -> dict[str, dict[str, Any]]:
    """Plain {section: {key: value}} with lists, for YAML and MLflow."""
    return {
        s.name: {f.name: _plain(getattr(getattr(params, s.name), f.name)) for f in fields(SECTIONS[s.name])}
        for s in fields(params)
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"quantize": {"bits": 4}} -> {"quantize.bits": "4"}; each value is YAML text that parses back."""
    out: dict[str, str] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = _yaml_scalar(value)
    return out


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # ["a", "b"]: a flow sequence of quoted scalars
        return "[" + ", ".join(_quoted(v) if isinstance(v, str) else _yaml_scalar(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # null, true, false
    if isinstance(value, str):
        return value if _reads_back(value) else _quoted(value)  # '1e3', '|:', '0', control characters
    return repr(value) if isinstance(value, float) else str(value)


def _quoted(text: str) -> str:
    """`text` as one double-quoted YAML scalar, escaped where YAML needs it."""
    out = yaml.dump(text, Dumper=_Dumper, default_style='"', allow_unicode=True, width=2**30)
    return out.strip().removesuffix("...").strip()


def _reads_back(text: str) -> bool:
    try:
        return _parse_yaml(text) == text
    except yaml.YAMLError:
        return False


def section_keys(section_name: str) -> list[str]:
    """The `section.key` names of one section, e.g. for a DVC stage's `params:` list."""
    if section_name not in SECTIONS:
        raise ParamsError(f"{section_name}: unknown section (allowed: {', '.join(SECTIONS)})")
    return [f"{section_name}.{f.name}" for f in fields(SECTIONS[section_name])]  # type: ignore[arg-type]


def dump_default_params() -> str:
    """params.yaml text holding every default, one comment line per section."""
    return dump_params(PipelineParams())


def dump_params(params: PipelineParams) -> str:
    """params.yaml text holding `params`, one comment line per section."""
    chunks = [
        "# ptq-pipeline parameters: one section per DVC stage. Keys, types and allowed values are\n"
        "# defined and checked in flows/params.py; override one with `-S section.key=value`.\n"
    ]
    for name, body in params_to_dict(params).items():
        comment = (SECTIONS[name].__doc__ or "").strip().splitlines()[0]
        chunks.append(f"# {comment}\n" + yaml.dump({name: body}, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                                                             default_flow_style=False))
    return "\n".join(chunks)
