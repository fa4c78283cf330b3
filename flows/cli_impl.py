"""Command implementations behind flows/cli.py: validate everything, then do the work."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quantlib.actquant import input_scales, scales_to_json
from quantlib.adapters import check_spec_fits, get_adapter
from quantlib.data import eval_windows
from quantlib.engine import EngineConfig
from quantlib.rotation import attach_online, check_rotatable, rotate_model
from quantlib.mixed import MixedConfig, plan_mixed
from quantlib.qweight import bits_per_weight
from quantlib.spec import QuantSpec, parse_scheme
from quantlib.windows import WindowStats
from tasks.sources import load_model, load_tokenizer
from tasks.inputs import evaluation_ids
from tasks.textdata import calibration_parts, parse_calibration_source, parse_text_source

from . import commands as C
from .bench import QualityBench, check_quantized_inputs, run_demo, run_quality
from .bench_kernels import run_decode, run_kernels
from .methods import MethodChoice, parse_method, resolve_device
from .table import print_table

__all__ = ["dispatch", "engine_config", "method_choice", "quality_bench"]


def _act_inputs(args: argparse.Namespace) -> str | None:
    if args.quantized_inputs and args.activations is None:
        raise ValueError("--quantized-inputs solves on the quantized inputs of --activations: give --activations a8|a4")
    return args.activations if args.quantized_inputs else None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(batch_size=args.batch_size, true_sequential=args.true_sequential,
                        device=resolve_device(args.device), spill_dir=args.spill_dir, smooth=args.smooth,
                        act_inputs=_act_inputs(args))


RECON_FLAGS = ("window", "overlap", "lookahead", "rounding", "rank", "iters", "loss", "lr", "clip_lr", "optimizer",
               "schedule", "init", "grid", "cfp", "heldout", "eval_every", "patience", "amp")
QAT_FLAGS = {"qat_trainable": "trainable", "qat_loss": "loss", "qat_steps": "steps", "qat_lr": "lr",
             "qat_batch_size": "batch_size", "qat_heldout": "heldout", "qat_topk": "topk", "qat_amp": "amp",
             "qat_patience": "patience"}


def method_choice(args: argparse.Namespace, name: str) -> MethodChoice:
    """The typed method a name spells, with the solver, --recon-* and --qat-* flags given."""
    recon = {k: getattr(args, k) for k in RECON_FLAGS if getattr(args, k, None) is not None}
    qat = {k: getattr(args, f) for f, k in QAT_FLAGS.items() if getattr(args, f, None) is not None}
    return parse_method(name, act_order=args.act_order, damp=args.damp, block_size=args.block_size,
                        clip_search=args.clip_search, recon=recon, qat=qat)


def stats_info(stats: list) -> dict:
    """What quantization.json keeps of the quantize stats: each Linear's relative output error
    (block-wise methods: engine.BlockStats), or each reconstruction window's blocks and its hardened
    loss at the init and as shipped (windows.WindowStats; the guard keeps the init when training lost)."""
    if stats and isinstance(stats[0], WindowStats):
        return {"windows": [{"blocks": list(range(s.start, s.end)), "loss_init": s.loss_init, "loss_final": s.loss_final,
                             "kept_init": s.kept_init} for s in stats]}
    return {"layer_errors": {f"{s.index}.{k}": v for s in stats for k, v in s.layer_errors.items()}}


def cmd_quantize(args: argparse.Namespace) -> int:
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=args.sym)
    method = method_choice(args, args.method)
    engine = engine_config(args)
    mixed = mixed_config(args)
    if engine.act_inputs is not None:
        check_quantized_inputs(method)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "quantization.json").exists():
        raise ValueError(f"--out {out} exists and is not a ptq output folder; choose an empty or new folder")
    parse_calibration_source(args.calib)
    model_dir = C.cached_model(args.model, args.trust_remote_code)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    adapter = get_adapter(model)
    check_spec_fits(adapter, spec.group_size)
    if args.rotate:
        check_rotatable(adapter)
    data = C.protocol_data(tok, args.calib, calibration_parts(args.calib)[0], n=args.n_samples, seqlen=args.seqlen,
                           seed=args.seed, mirror=args.mirror)
    t0 = time.perf_counter()
    rotation = rotate_model(adapter, args.rotate) if args.rotate else None  # FP-exact: before the FP score
    rotate_seconds = time.perf_counter() - t0
    fp_ppl = C.eval_ppl(model, data.windows, desc="fp32 perplexity") if args.eval else None
    t0 = time.perf_counter()
    teacher = C.qat_teacher(model, data.calib, method.qat)  # FP logits, before quantizing
    plan = spec if mixed is None else plan_mixed(adapter, data.calib, mixed, spec)[0]
    results, stats, _ = C.quantize_loaded(model, data.calib, plan, method.base, engine)
    # QAT trains with them (it swaps, then restores, the modules); static scales calibrated on the calibration ids
    C.quantize_activations(model, results, args.activations, data.calib)
    if method.qat is not None:
        results, _ = C.refine_qat(model, data.calib, results, method.qat, teacher)
    seconds = time.perf_counter() - t0 + rotate_seconds
    info = {"method": method.label, "spec": C.spec_dict(spec), "model": args.model, "calib": args.calib,
            "method_config": asdict(method.base), "qat_config": None if method.qat is None else asdict(method.qat),
            "mixed": None if mixed is None else {p: s.name for p, s in plan.layers},
            "activations": args.activations, "input_scales": scales_to_json(input_scales(model)),
            "quantized_inputs": engine.act_inputs is not None, "smooth": args.smooth,
            "rotation": rotation, "modules": sorted(results),
            "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": args.seed, "quant_seconds": seconds,
            **stats_info(stats)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    C.save_quantized(tmp, model, tok, results, info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    rows = [{"model": "quantized", "method": method.label, "seconds": seconds,
             "scheme": (spec.name if mixed is None else mixed.label(spec)) + (f"-{args.activations}" if args.activations else ""),
             "bits/w": round(bits_per_weight(results), 3)}]
    if args.eval:
        rows[0]["ppl"] = C.eval_ppl(model, data.windows, desc="quantized perplexity")
        rows.insert(0, {"model": "fp32", "method": "-", "scheme": "-", "ppl": fp_ppl})
    print_table(rows, ["model", "method", "scheme", "bits/w", "seconds", "ppl"])
    print(f"wrote {out}")
    return 0


def _eval_model(spec: str, dtype: torch.dtype):
    """(model, tokenizer): a release folder (its quantization.json names a release format) through
    load_release, verified against its MANIFEST; anything else as a model source."""
    from tasks.release import load_release

    folder = Path(spec)
    info = json.loads((folder / "quantization.json").read_text()) if (folder / "quantization.json").is_file() else {}
    if folder.is_dir() and "format" in info:
        return load_release(folder, dtype=dtype), load_tokenizer(folder)
    model_dir = C.cached_model(spec)
    model = load_model(model_dir, dtype=dtype)
    if info:  # `ptq quantize` output: dense weights; its online rotations and activation quantizers come back
        attach_online(model, info.get("rotation"))
        C.quantize_activations(model, dict.fromkeys(info.get("modules", [])), info.get("activations"),
                               scales=info.get("input_scales"))
    return model, load_tokenizer(model_dir)


def cmd_eval(args: argparse.Namespace) -> int:
    parse_text_source(args.data)
    model, tok = _eval_model(args.model, getattr(torch, args.dtype))
    ids = evaluation_ids(args.data, tok, args.mirror, second_half=args.split == "second_half")  # python-docs: never halved
    stride = args.stride or args.window
    windows = eval_windows(ids, args.window, args.windows or None, stride)
    ppl = C.eval_ppl(model, windows, args.batch_size, score_from=args.window - stride)
    print_table([{"model": args.model, "data": args.data, "dtype": args.dtype, "windows": windows.shape[0], "ppl": ppl}],
                ["model", "data", "dtype", "windows", "ppl"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo()


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def quality_bench(args: argparse.Namespace) -> QualityBench:
    """`ptq bench quality` arguments as a validated QualityBench; bad names fail before any work."""
    methods = tuple(method_choice(args, name) for name in _csv(args.methods))
    return QualityBench(model=args.model, methods=methods, schemes=_csv(args.schemes), out=Path(args.out),
                        fp32=args.fp32, n_samples=args.n_samples, seqlen=args.seqlen, seed=args.seed, calib=args.calib,
                        device=resolve_device(args.device),
                        batch_size=args.batch_size, true_sequential=args.true_sequential, mirror=args.mirror,
                        activations=args.activations, smooth=args.smooth, rotate=args.rotate,
                        quantized_inputs=_act_inputs(args) is not None, mixed=mixed_config(args))


def mixed_config(args: argparse.Namespace) -> MixedConfig | None:
    """--mixed-from / --mixed-bits / --mixed-samples as a MixedConfig (None without --mixed-from)."""
    if args.mixed_from is None:
        if args.mixed_bits is not None:
            raise ValueError("--mixed-bits sizes a mixed-precision plan: give the schemes too, e.g. --mixed-from w2g128,w3g64")
        return None
    return MixedConfig(tuple(parse_scheme(s) for s in _csv(args.mixed_from)), args.mixed_bits, args.mixed_samples)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "kernels":
        rows = run_kernels(args.out, w8a8=args.w8a8)
    elif args.bench == "decode":
        rows = run_decode(args.out, model=args.model, scheme=args.scheme, new_tokens=args.new_tokens)
    elif args.bench == "orchestration":
        from .bench_orchestration import run_orchestration

        rows = run_orchestration(args.out, keep=args.keep)
    else:
        return run_quality(quality_bench(args))
    print(json.dumps(rows, indent=1))
    return 0


def dispatch(args: argparse.Namespace) -> int:
    return {"quantize": cmd_quantize, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench}[args.command](args)
