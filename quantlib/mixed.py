"""Mixed precision at a given size: one scheme per Linear, chosen from measured sensitivity.

Sensitivity. The FP model's calibration loss L, to second order around the FP weights with the
empirical Fisher F = E_seq[g * g] (g: the gradient of one sequence's mean token loss) standing in
for the Hessian's diagonal (HAWQ, SqueezeLLM), costs

    dL(W -> W_hat) ~= 1/2 * sum(F * (W - W_hat)^2)

for quantizing one Linear, with W_hat its round-to-nearest weight on a candidate grid. Costs of
different Linears add (the diagonal approximation), so a plan is a sum.

Allocation. Linears that see one input (q/k/v, gate/up) form a unit and get one scheme: runtimes
fuse them (vLLM's qkv_proj, gate_up_proj) and BoA solves q/k jointly. Each unit takes one candidate
scheme; the plan minimizes the summed cost subject to an average size in bits per weight that counts
codes, scales and zeros (QuantSpec.stored_bits, what quantlib.qweight.bits_per_weight reports). That is a multiple-choice
knapsack, solved by dynamic programming over the budget cut into `resolution` steps; the plan's exact
size never exceeds the budget.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters import ModelAdapter, check_spec_fits
from .rtn import RTNConfig, rtn_quantize
from .spec import QuantSpec, SpecMap, parse_scheme

__all__ = ["MixedConfig", "Unit", "fisher_diagonal", "model_units", "check_target", "sensitivity_units",
           "allocate", "plan_mixed",
           "uniform_bits", "plan_to_json", "plan_from_json", "plan_split"]


@dataclass(frozen=True)
class MixedConfig:
    """candidates: the schemes a unit may take; bits: the average size in bits per weight (codes,
    scales, zeros), or None for the size the uniform default scheme has on this model (an equal-size
    comparison); samples: the first calibration sequences the Fisher pass reads."""

    candidates: tuple[QuantSpec, ...]
    bits: float | None = None
    samples: int = 32

    def __post_init__(self) -> None:
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError("mixed precision needs one or more distinct candidate schemes, e.g. w2g128,w3g64")
        if not all(isinstance(c, QuantSpec) for c in self.candidates):
            raise TypeError("MixedConfig.candidates holds QuantSpecs (quantlib.spec.parse_scheme)")
        if self.bits is not None and not (isinstance(self.bits, (int, float)) and 1 <= self.bits <= 16):
            raise ValueError(f"mixed precision bits per weight must be a number in [1, 16], got {self.bits!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"mixed precision samples must be a positive integer, got {self.samples!r}")

    def label(self, default: QuantSpec) -> str:
        """mix(w2g128+w3g64)@w2g64 (sized as uniform w2g64) or mix(w2g128+w3g64)@2.40."""
        size = default.name if self.bits is None else f"{self.bits:.2f}"
        return f"mix({'+'.join(c.name for c in self.candidates)})@{size}"


@dataclass(frozen=True)
class Unit:
    """Linears that get one scheme: their full paths, total weights, input size, and the Fisher cost
    of each candidate scheme (same order as the candidates)."""

    paths: tuple[str, ...]
    weights: int
    in_features: int
    costs: tuple[float, ...]


def fisher_diagonal(adapter: ModelAdapter, calib_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{full path: (out, in) float32 E_seq[g^2]} for every decoder-block Linear, one backward pass
    per calibration sequence (calib_ids: (N, T)); the model's weights are left as they were."""
    model = adapter.model
    linears = {f"{adapter.family.layers}.{i}.{n}": m
               for i, b in enumerate(adapter.blocks) for n, m in adapter.linears(b).items()}
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    fisher = {path: torch.zeros_like(m.weight, dtype=torch.float32) for path, m in linears.items()}
    device = next(model.parameters()).device
    try:
        for ids in calib_ids:
            ids = ids[None].to(device)
            logits = model(ids).logits[0, :-1].float()  # (T-1, V)
            F.cross_entropy(logits, ids[0, 1:]).backward()
            for path, m in linears.items():
                fisher[path] += m.weight.grad.float() ** 2
                m.weight.grad = None
    finally:
        for p, r in was.items():
            p.requires_grad_(r)
    n = max(len(calib_ids), 1)
    return {path: adapter.out_in(linears[path], f / n).cpu() for path, f in fisher.items()}


def model_units(adapter: ModelAdapter) -> list[Unit]:
    """The units with their sizes and no costs (Linears sharing an input, block by block): shapes
    only, so a meta-device model will do."""
    units = []
    for i, block in enumerate(adapter.blocks):
        for group in adapter.groups(block):
            for names in adapter.input_sets(list(group)):
                ws = [adapter.get_weight(block.get_submodule(n)) for n in names]
                units.append(Unit(tuple(f"{adapter.family.layers}.{i}.{n}" for n in names),
                                  sum(w.numel() for w in ws), ws[0].shape[1], ()))
    return units


def _check_fits(units: list[Unit], candidates: tuple[QuantSpec, ...], target: float) -> None:
    """ValueError naming the fix when even every unit on its smallest candidate exceeds `target`."""
    lo = sum(min(c.stored_bits(u.in_features) for c in candidates) * u.weights for u in units)
    lo /= sum(u.weights for u in units)
    if target < lo:
        raise ValueError(f"mixed precision: {target:.4f} bits per weight is below the smallest plan "
                         f"({lo:.4f}: every Linear on its smallest candidate); raise the target or add smaller schemes")


def check_target(adapter: ModelAdapter, cfg: MixedConfig, default: QuantSpec) -> float:
    """The plan's target bits per weight, after checking from shapes alone that every candidate's
    groups fit and that some plan fits the target; ValueError naming the fix otherwise."""
    for c in cfg.candidates + (default,):
        check_spec_fits(adapter, c.group_size)
    units = model_units(adapter)
    target = cfg.bits if cfg.bits is not None else uniform_bits(units, default)
    _check_fits(units, cfg.candidates, target)
    return target


def sensitivity_units(adapter: ModelAdapter, fisher: dict[str, torch.Tensor],
                      candidates: tuple[QuantSpec, ...]) -> list[Unit]:
    """The model's units (model_units) with each candidate's cost 1/2 sum(F * (W - RTN(W))^2),
    summed over the unit's Linears."""
    units = []
    for u in model_units(adapter):
        ws = [adapter.get_weight(adapter.model.get_submodule(p)).detach().float().cpu() for p in u.paths]
        costs = tuple(sum(_cost(w, fisher[p], c) for w, p in zip(ws, u.paths)) for c in candidates)
        units.append(Unit(u.paths, u.weights, u.in_features, costs))
    return units


def _cost(w: torch.Tensor, fisher: torch.Tensor, spec: QuantSpec) -> float:
    d = w - rtn_quantize(w, spec, RTNConfig()).dequantize()
    return 0.5 * float((fisher.double() * d.double() ** 2).sum())


def allocate(units: list[Unit], candidates: tuple[QuantSpec, ...], target_bpw: float,
             resolution: int = 1 << 16) -> list[int]:
    """Index of the candidate each unit takes: minimum summed cost with average bits per weight
    <= target_bpw. Sizes are counted in steps of budget / resolution, rounded up, and the table runs
    one step per unit past the budget so plans the rounding pushed over are still seen; the cheapest
    plan whose exact size fits wins. Raises ValueError naming the feasible range when none fits."""
    _check_fits(units, candidates, target_bpw)
    total = sum(u.weights for u in units)
    sizes = [[c.stored_bits(u.in_features) * u.weights for c in candidates] for u in units]
    step, top = target_bpw * total / resolution, resolution + len(units)
    steps = [[math.ceil(b / step - 1e-9) for b in s] for s in sizes]
    dp = torch.full((top + 1,), math.inf, dtype=torch.float64)  # dp[b]: least cost using b steps
    dp[0] = 0.0
    choice = torch.empty((len(units), top + 1), dtype=torch.int16)
    for k, u in enumerate(units):
        new, arg = torch.full_like(dp, math.inf), torch.full((top + 1,), -1, dtype=torch.int16)
        for c, (n, cost) in enumerate(zip(steps[k], u.costs)):
            if n > top:
                continue
            shifted = torch.full_like(dp, math.inf)
            shifted[n:] = dp[: top + 1 - n] + cost
            better = shifted < new
            new[better], arg[better] = shifted[better], c
        dp, choice[k] = new, arg
    for b in torch.argsort(dp, stable=True).tolist():  # cheapest first; every b <= resolution fits
        if not math.isfinite(dp[b]):
            break
        picks = _backtrack(choice, steps, b)
        if sum(s[c] for s, c in zip(sizes, picks)) <= target_bpw * total:
            return picks
    raise ValueError(f"mixed precision: no plan fits {target_bpw} bits per weight; raise it slightly")


def _backtrack(choice: torch.Tensor, steps: list[list[int]], b: int) -> list[int]:
    picks = []
    for k in range(choice.shape[0] - 1, -1, -1):
        c = int(choice[k, b])
        picks.append(c)
        b -= steps[k][c]
    return picks[::-1]


def plan_mixed(adapter: ModelAdapter, calib_ids: torch.Tensor, cfg: MixedConfig,
               default: QuantSpec) -> tuple[SpecMap, list[Unit], float]:
    """Measure, allocate; returns the plan (every block Linear listed; `default` for any other
    quantized Linear, e.g. the LM head), the measured units and the target bits per weight."""
    target = check_target(adapter, cfg, default)  # before the Fisher pass
    units = sensitivity_units(adapter, fisher_diagonal(adapter, calib_ids[: cfg.samples]), cfg.candidates)
    picks = allocate(units, cfg.candidates, target)
    layers = sorted((p, cfg.candidates[c]) for u, c in zip(units, picks) for p in u.paths)
    return SpecMap(default, tuple(layers)), units, target


def uniform_bits(units: list[Unit], spec: QuantSpec) -> float:
    """Bits per weight of every unit on `spec`."""
    return sum(spec.stored_bits(u.in_features) * u.weights for u in units) / sum(u.weights for u in units)


def plan_to_json(plan: SpecMap, units: list[Unit], target: float, cfg: MixedConfig) -> dict:
    """What a plan is and why: the target, the candidates, each Linear's scheme, and every unit's
    size and measured cost per candidate (an auditor can re-run `allocate` on it)."""
    return {"target_bpw": target, "candidates": [c.name for c in cfg.candidates], "samples": cfg.samples,
            "default": plan.default.name, "layers": {p: s.name for p, s in plan.layers},
            "units": [{"paths": list(u.paths), "weights": u.weights, "in_features": u.in_features,
                       "costs": list(u.costs)} for u in units]}


def plan_split(plan: SpecMap) -> dict[str, int]:
    """{scheme name: how many Linears the plan puts on it}, by name."""
    return dict(sorted(Counter(s.name for _, s in plan.layers).items()))


def plan_from_json(d: dict) -> SpecMap:
    return SpecMap(parse_scheme(d["default"]), tuple(sorted((p, parse_scheme(s)) for p, s in d["layers"].items())))
