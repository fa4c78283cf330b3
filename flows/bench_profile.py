"""Where the time goes: one reconstruction window and a few QAT steps, profiled on this machine.

    python -m flows.bench_profile [--iters 40] [--qat-steps 4] [--amp auto|bf16|fp32] [--out docs/benchmarks/profile.json]

Reconstruction: SmolLM2-135M cut to its first 2 blocks, one recon-k2o1 window (the bench's settings:
LoRA-Rounding rank 4, mse+kl, batch 4 x 512, GPTQ init) on the protocol calibration draw (seed 0),
`--n-samples` sequences. QAT: the whole model after RTN W3 g64 (QAT's per-step cost does not depend on
how the codes were made), QAT's defaults (scales, KL on the teacher's top-64, batch 4 x 512). --amp
sets the training forward's arithmetic of both (quantlib.optim.training_autocast; each heading says
which ran): the weights are fp32 either way.

torch.profiler records every op; regions are marked by wrapping the library's own functions with
record_function (no change to quantlib): the GPTQ init, the FP targets, the training loop, fake-quant
(the forward of LearnableLinear.weight_hat / QATLinear.fake_quant), the losses, the held-out
evaluation. Backward is every `autograd::engine::evaluate_function` event. Each op's self time goes
into one category (matmul, attention, softmax/KL, elementwise, optimizer, other); what the profiler
does not see (wall time minus the ops' self time) is Python and framework overhead.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from quantlib.optim import AMP_MODES, uses_bf16
from tasks.sources import load_model, load_tokenizer

from . import commands as C
from .bench import CALIB, _versions
from .table import append_records

DEFAULT_OUT = "docs/benchmarks/profile.json"
CATEGORIES = (  # first match wins, on the op name
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul", "aten::dot")),
    ("softmax/KL", ("softmax", "aten::topk", "aten::gather", "aten::scatter", "logsumexp", "nll_loss")),
    ("optimizer", ("_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul")),
    ("data movement", ("aten::copy_", "aten::cat", "aten::index", "aten::clone", "aten::contiguous", "aten::to",
                       "aten::stack", "aten::empty", "aten::zeros", "aten::fill_", "aten::zero_", "aten::slice")),
    ("elementwise", ("aten::",)),
)


@contextlib.contextmanager
def _labelled(targets: list[tuple[object, str, str]]):
    """Wrap obj.attr in record_function(label) for every (obj, attr, label); restore afterwards."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]

    def wrap(fn, label):
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return inner

    for (obj, attr, label), (_, _, fn) in zip(targets, saved):
        setattr(obj, attr, wrap(fn, label))
    try:
        yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)


def _category(name: str) -> str:
    return next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")


def summarize(prof, wall: float, labels: list[str], steps: int) -> dict:
    """Seconds per region, per op category (self time), backward, overhead; the top ops."""
    avg = prof.key_averages()
    regions = {lab: round(sum(e.cpu_time_total for e in avg if e.key == lab) / 1e6, 3) for lab in labels}
    backward = sum(e.cpu_time_total for e in avg if e.key.startswith("autograd::engine::evaluate_function")) / 1e6
    cats: dict[str, float] = {}
    for e in avg:  # wrappers (autograd nodes, the optimizer's step, our labels) hold ops, not work of their own
        if not e.key.startswith(("autograd::", "Optimizer.", "ProfilerStep")) and e.key not in labels:
            cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + e.self_cpu_time_total / 1e6
    ops = sum(cats.values())
    top = sorted(avg, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"wall_s": round(wall, 2), "steps": steps, "regions_s": regions, "backward_s": round(backward, 2),
            # 4 digits: a tiny model's whole matmul time can be under 5 ms, which 2 digits would call 0
            "categories_s": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "overhead_s": round(max(wall - ops, 0.0), 2),
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count} for e in top]}


def _keep_blocks(model, k: int) -> None:
    """Cut the model to its first k decoder blocks."""
    from quantlib.adapters import get_adapter

    parent, _, name = get_adapter(model).family.layers.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, name, getattr(holder, name)[:k])
    model.config.num_hidden_layers = k


def profile_recon(model_dir: Path, n: int, seqlen: int, iters: int, amp: str = "auto") -> dict:
    """One k=2 window over blocks 0-1 (the cut model's only window)."""
    import quantlib.windows as W
    from quantlib.engine import EngineConfig
    from quantlib.recon import LearnableLinear
    from quantlib.spec import parse_scheme

    from .methods import parse_method

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    _keep_blocks(model, 2)
    data = C.protocol_data(tok, "wikitext2", None, **(CALIB | {"n": n, "seqlen": seqlen}))
    cfg = parse_method(f"recon-k2o1-gptq-i{iters}", recon={"amp": amp}).base
    labels = [(W, "init_block", "init (GPTQ)"), (W.FPCursor, "at", "FP targets"), (W, "_train", "training loop"),
              (W, "_eval_loss", "loss before/after"), (W, "recon_loss", "loss (mse+kl)"),
              (LearnableLinear, "weight_hat", "fake-quant")]
    with _labelled(labels), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        C.quantize_loaded(model, data.calib, parse_scheme("w3g64"), cfg, EngineConfig(batch_size=8))
        wall = time.perf_counter() - t0
    return summarize(prof, wall, [lab for *_, lab in labels], iters) | {"n": n, "seqlen": seqlen,
                                                                          "method": f"recon-k2o1-gptq-i{iters}"}


def profile_qat(model_dir: Path, n: int, seqlen: int, steps: int, amp: str = "auto") -> dict:
    """`steps` QAT steps on the whole model (RTN W3 g64 codes), teacher included."""
    import quantlib.distill as D
    import quantlib.qat as Q
    from quantlib.engine import EngineConfig
    from quantlib.qat import QATConfig, QATLinear
    from quantlib.rtn import RTNConfig
    from quantlib.spec import parse_scheme

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    data = C.protocol_data(tok, "wikitext2", None, **(CALIB | {"n": n, "seqlen": seqlen}))
    cfg = QATConfig(steps=steps, eval_every=steps, amp=amp)
    teacher = C.qat_teacher(model, data.calib, cfg)
    results, _, _ = C.quantize_loaded(model, data.calib, parse_scheme("w3g64"), RTNConfig(), EngineConfig())
    labels = [(Q, "chunked_qat_loss", "forward + loss"), (D, "_kl_sum", "KL over top-k"),
              (QATLinear, "fake_quant", "fake-quant"), (Q._Run, "evaluate", "held-out evaluation")]
    with _labelled(labels), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        C.refine_qat(model, data.calib, results, cfg, teacher)
        wall = time.perf_counter() - t0
    return summarize(prof, wall, [lab for *_, lab in labels], steps) | {
        "n": n, "seqlen": seqlen, "qat": {"steps": steps, "batch_size": cfg.batch_size}}


def render_profile_md(records: list[dict]) -> str:
    lines = ["# Where the time goes: a reconstruction window and QAT steps", "",
             "Generated by `python -m flows.bench_profile` (flows/bench_profile.py says what is measured and how);",
             "SmolLM2-135M, fp32 weights on this CPU; each heading says the training forward's arithmetic (fp32,",
             "or bf16 autocast: quantlib.optim.training_autocast). Seconds of the profiled run (the profiler itself",
             "adds a little).", ""]
    for r in records:
        lines += [f"## {r['what']} ({r['date'][:10]}, {r['versions']['threads']} threads, git {r['versions']['git']}, "
                  f"{r['n']} x {r['seqlen']} calibration)", "",
                  f"Wall {r['wall_s']:.1f} s for {r['steps']} steps; backward {r['backward_s']:.1f} s; "
                  f"Python/framework overhead {r['overhead_s']:.1f} s.", "",
                  "| region (inclusive) | s | share of wall |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.2f} | {100 * v / r['wall_s']:.0f}% |" for k, v in r["regions_s"].items()]
        lines += ["", "| op category (self time) | s | share of wall |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.2f} | {100 * v / r['wall_s']:.0f}% |" for k, v in r["categories_s"].items()]
        lines += ["", "| top ops (self time) | s | calls |", "|---|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['self_s']:.2f} | {o['calls']} |" for o in r["top_ops"]]
        lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.bench_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration sequences (recon window and QAT)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=40, help="iterations of the window")
    ap.add_argument("--qat-steps", type=int, default=4)
    ap.add_argument("--only", choices=("recon", "qat"), default=None)
    ap.add_argument("--amp", choices=AMP_MODES, default="auto", help="the training forward's arithmetic (auto: "
                    "bf16 autocast where the CPU has AMX or AVX512-BF16)")
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    a = ap.parse_args(argv)
    model_dir = C.cached_model(a.model)
    stamp = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
             "model": a.model}
    new, arith = [], "bf16 autocast" if uses_bf16(torch.device("cpu"), a.amp) else "fp32"
    if a.only in (None, "recon"):
        new.append(stamp | {"what": f"one recon-k2o1 window (blocks 0-1), {arith}", "bf16": arith != "fp32"}
                   | profile_recon(model_dir, a.n_samples, a.seqlen, a.iters, a.amp))
    if a.only in (None, "qat"):
        new.append(stamp | {"what": f"QAT steps (whole model), {arith}", "bf16": arith != "fp32"}
                   | profile_qat(model_dir, a.n_samples, a.seqlen, a.qat_steps, a.amp))
    append_records(a.out, new, render_profile_md)
    print(render_profile_md(new))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
