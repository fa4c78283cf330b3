"""Method choices: the one parser of the method shorthand, and the device choice.

A name such as `recon-k2o1-gptq-i40+qat128` is a command-line and benchmark shorthand only. It is
parsed here, once, into a `MethodChoice` (a frozen quantlib config for the block-wise method plus an
optional `QATConfig`); everything downstream receives that object, never the name.

Grammar (see METHOD_FORMS):
  NAME   := BASE [ "+qat" [STEPS] ["-bf16"] ]   e.g. gptq, boa+qat, boa+qat128, boa+qat-bf16
  BASE   := rtn | (gptq | boa) [ "-d" DAMP ] | recon [ "-" PART ]...   (gptq-d0.1: damping 0.1)
  PART   := k<window>[o<overlap>][L<lookahead>]   (k2o1, k3, k3o1L1; no o = no overlap)
          | L<n> | la<n>                          look-ahead blocks
          | nearest | adaround | lora | signed    rounding (signed: SignRound's round(W / s + z + v))
          | mse | kl | mse+kl                     loss
          | rtn | gptq | boa                      initializer
          | i<n>                                  iterations
          | cfp                                   CBQ outlier pre-processing of each block
          | cfpa                                  its activation half only (no weight truncation)
          | bf16                                  train the windows under bf16 autocast (amp)
          | sign                                  SignRound's optimizer (p -= lr sign(grad)), linear decay, lr 1/iters
-bf16 after +qat trains QAT under bf16 autocast (QATConfig.amp; quantlib.optim.training_autocast).
Parts set ReconConfig fields; explicit overrides (the CLI's flags, params.yaml) are applied on top.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch

from quantlib.boa import BoAConfig
from quantlib.gptq import GPTQConfig
from quantlib.qat import QATConfig
from quantlib.recon import INITS, LOSSES, ROUNDINGS, ReconConfig
from quantlib.rtn import RTNConfig

__all__ = ["METHOD_NAMES", "METHOD_FORMS", "BlockConfig", "MethodChoice", "parse_method", "method_config",
           "resolve_device"]

BlockConfig = Union[RTNConfig, GPTQConfig, BoAConfig, ReconConfig]
METHOD_NAMES = ("rtn", "gptq", "boa", "recon")
_LABELS = {RTNConfig: "rtn", GPTQConfig: "gptq", BoAConfig: "boa", ReconConfig: "recon"}
METHOD_FORMS = (
    "rtn, gptq[-d<damp>], boa[-d<damp>] or recon[-PART...], optionally followed by +qat or +qat<steps>, "
    "then -bf16 to train QAT under bf16 autocast (e.g. boa+qat128, boa+qat-bf16, gptq-d0.1); "
    "recon parts: k<window>[o<overlap>][L<lookahead>], L<n> or la<n> (look-ahead), "
    f"a rounding ({', '.join(ROUNDINGS)}), a loss ({', '.join(LOSSES)}), an init ({', '.join(INITS)}), "
    "i<iterations>, cfp (CBQ outlier pre-processing), cfpa (its activation half only), "
    "bf16 (windows under bf16 autocast), sign (SignRound's optimizer, linear decay); "
    "e.g. recon-k2o1-gptq-i40+qat128"
)
_QAT_SUFFIX = re.compile(r"(.+)\+qat(\d+)?(-bf16)?")
_WINDOW = re.compile(r"k(\d+)(?:o(\d+))?(?:L(\d+))?")
_LOOKAHEAD = re.compile(r"(?:L|la)(\d+)")
_ITERS = re.compile(r"i(\d+)")


@dataclass(frozen=True)
class MethodChoice:
    """A block-wise method and, when qat is set, global QAT after it.

    base: the frozen quantlib config of the block-wise method (RTN, GPTQ, BoA or reconstruction).
    qat: the QAT refinement config, or None for none.
    label, base_label: names for reports and benchmark rows (the shorthand it was parsed from, and
    its block-wise part); labels only, never parsed again. They default to the method's short name.
    """

    base: BlockConfig
    qat: QATConfig | None = None
    label: str = ""
    base_label: str = ""

    def __post_init__(self) -> None:
        if type(self.base) not in _LABELS:
            raise TypeError(f"base must be one of {', '.join(t.__name__ for t in _LABELS)}, got {type(self.base).__name__}")
        if self.qat is not None and not isinstance(self.qat, QATConfig):
            raise TypeError(f"qat must be a QATConfig or None, got {type(self.qat).__name__}")
        base_label = self.base_label or _LABELS[type(self.base)]
        object.__setattr__(self, "base_label", base_label)
        object.__setattr__(self, "label", self.label or base_label + ("+qat" if self.qat is not None else ""))


def parse_method(name: str, *, act_order: bool = True, damp: float = 0.01, block_size: int = 128,
                 clip_search: bool = False, recon: Mapping[str, Any] | None = None,
                 qat: Mapping[str, Any] | None = None) -> MethodChoice:
    """The MethodChoice a shorthand name spells (grammar: module docstring, METHOD_FORMS).

    act_order, damp, block_size, clip_search: solver settings (GPTQ; BoA takes all but clip_search;
    RTN only clip_search). recon: ReconConfig overrides, applied over the name's parts (recon only).
    qat: QATConfig overrides (only with +qat); a step count in the name must agree with qat["steps"].
    Raises ValueError naming the part that does not parse, or the invalid setting.
    """
    base_name, named = _split_qat(name)
    head, *parts = base_name.split("-")
    if head not in METHOD_NAMES:
        raise ValueError(_unknown(head, name))
    if parts and head in ("gptq", "boa"):  # the one part they take: the Hessian damping
        damp = _damp_part(parts, name)
        parts = []
    if parts and head != "recon":
        raise ValueError(f"cannot parse {'-'.join(parts)!r} in method {name!r}: only recon takes -parts "
                         f"(gptq and boa a damping d<fraction>); accepted: {METHOD_FORMS}")
    recon_fields = (_recon_parts(parts, name) | dict(recon or {})) if head == "recon" else {}
    try:  # the configs validate themselves; their messages name the setting
        base = _base_config(head, recon_fields, act_order=act_order, damp=damp, block_size=block_size,
                            clip_search=clip_search)
        return MethodChoice(base, _qat_config(named, qat or {}), label=name, base_label=base_name)
    except ValueError as e:
        raise ValueError(f"method {name!r}: {e}") from None


def _damp_part(parts: list[str], name: str) -> float:
    """`d<fraction>` (e.g. gptq-d0.1): the damping, as a fraction of the Hessian's mean diagonal."""
    m = re.fullmatch(r"d(\d*\.?\d+)", parts[0]) if len(parts) == 1 else None
    if m is None:
        raise ValueError(f"cannot parse {'-'.join(parts)!r} in method {name!r}: gptq and boa take one part, "
                         f"d<fraction> (e.g. gptq-d0.1); accepted: {METHOD_FORMS}")
    return float(m.group(1))


def method_config(name: str, *, act_order: bool = True, damp: float = 0.01, block_size: int = 128,
                  clip_search: bool = False, recon: Mapping[str, Any] | None = None) -> BlockConfig:
    """The block-wise config alone (e.g. params.yaml's quantize.method); a +qat name is refused."""
    choice = parse_method(name, act_order=act_order, damp=damp, block_size=block_size,
                          clip_search=clip_search, recon=recon)
    if choice.qat is not None:
        raise ValueError(f"method {name!r}: +qat is not accepted here, only a block-wise method "
                         f"({', '.join(METHOD_NAMES)} or recon-PART...)")
    return choice.base


def resolve_device(device: str) -> str:
    """The torch device for a --device / quantize.device value: auto is cuda when available, else cpu;
    a cuda device without CUDA is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def _split_qat(name: str) -> tuple[str, dict | None]:
    """`boa+qat128` -> ("boa", {"steps": 128}); `gptq+qat` -> ("gptq", {}); `gptq+qat-bf16` ->
    ("gptq", {"amp": "bf16"}); `gptq` -> ("gptq", None)."""
    m = _QAT_SUFFIX.fullmatch(name)
    if m is None:
        return name, None
    return m[1], ({"steps": int(m[2])} if m[2] else {}) | ({"amp": "bf16"} if m[3] else {})


def _unknown(head: str, name: str) -> str:
    known, plus, _ = head.partition("+")
    if plus and known in METHOD_NAMES:  # e.g. gptq+foo, gptq+qat-fp16: the suffix is the bad part
        rest = name.partition("+")[2]
        return (f"unknown method {name!r}: cannot parse '+{rest}'; only +qat, +qat<steps> or +qat[<steps>]-bf16 may "
                f"follow; accepted: {METHOD_FORMS}")
    return f"unknown method {head!r} in {name!r}; accepted: {METHOD_FORMS}"


def _base_config(head: str, recon_fields: dict[str, Any], *, act_order: bool, damp: float, block_size: int,
                 clip_search: bool) -> BlockConfig:
    if head == "recon":
        return ReconConfig(**({"init_damp": damp} | recon_fields))
    if head == "rtn":
        return RTNConfig(clip_search=clip_search)
    if head == "gptq":
        return GPTQConfig(block_size=block_size, damp=damp, act_order=act_order, clip_search=clip_search)
    return BoAConfig(block_size=block_size, damp=damp, act_order=act_order)


def _recon_parts(parts: list[str], name: str) -> dict[str, Any]:
    """ReconConfig fields the `-`-separated parts after `recon` spell."""
    kw: dict[str, Any] = {}
    for part in parts:
        if m := _WINDOW.fullmatch(part):
            kw |= {"window": int(m[1]), "overlap": int(m[2] or 0)} | ({"lookahead": int(m[3])} if m[3] else {})
        elif m := _LOOKAHEAD.fullmatch(part):
            kw["lookahead"] = int(m[1])
        elif part in ROUNDINGS:
            kw["rounding"] = part
        elif part in LOSSES:
            kw["loss"] = part
        elif part in INITS:
            kw["init"] = part
        elif m := _ITERS.fullmatch(part):
            kw["iters"] = int(m[1])
        elif part == "cfp":
            kw["cfp"] = True
        elif part == "cfpa":
            if "cfp" in parts:
                raise ValueError(f"method {name!r}: cfp (both halves) and cfpa (the activation half) exclude "
                                 "each other; keep one")
            kw["cfp"], kw["cfp_weights"] = True, False
        elif part == "bf16":
            kw["amp"] = "bf16"
        elif part == "sign":
            kw |= {"optimizer": "sign", "schedule": "linear"}
        else:
            raise ValueError(f"cannot parse {part!r} in method {name!r}; accepted: {METHOD_FORMS}")
    if kw.get("optimizer") == "sign":  # a sign step moves lr per step: SignRound's 1 / iters
        kw.setdefault("lr", 1 / kw.get("iters", ReconConfig.iters))
    return kw


def _qat_config(named: dict | None, flags: Mapping[str, Any]) -> QATConfig | None:
    """QATConfig from the flags with the name's step count on top; None without +qat."""
    if named is None:
        return None
    if "steps" in named and flags.get("steps", named["steps"]) != named["steps"]:
        raise ValueError(f"the name asks for {named['steps']} QAT steps but --qat-steps says "
                         f"{flags['steps']}; drop one of them")
    return QATConfig(**(dict(flags) | named))
