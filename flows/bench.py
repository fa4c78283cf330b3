"""`ptq bench quality` (docs/protocol.md, one subprocess per row for honest time and peak memory)
and `ptq demo`.

Rows are appended to docs/benchmarks/quality.json; docs/benchmarks/quality.md is regenerated from it.
Methods arrive parsed (flows/methods.py); a worker receives its MethodChoice as JSON.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import quantlib
from quantlib.actquant import parse_activations
from quantlib.adapters import get_adapter
from quantlib.boa import BoAConfig
from quantlib.engine import EngineConfig
from quantlib.gptq import GPTQConfig
from quantlib.mixed import MixedConfig, plan_from_json, plan_mixed, plan_split
from quantlib.qat import QATConfig
from quantlib.qweight import bits_per_weight
from quantlib.recon import ReconConfig
from quantlib.rotation import ROTATABLE, ROTATION_MODES, rotate_model
from quantlib.rtn import RTNConfig
from quantlib.spec import parse_scheme
from tasks.io import atomic_write_bytes, atomic_write_json
from tasks.sources import load_model, load_tokenizer
from tasks.textdata import parse_calibration_source, read_token_ids

from . import commands as C
from . import stages as S
from .methods import MethodChoice
from .table import print_table

__all__ = ["QualityBench", "run_quality", "run_demo", "render_quality_md"]

CALIB = dict(n=128, seqlen=512, seed=0, window=1024, n_windows=16)


@dataclass(frozen=True)
class QualityBench:
    """One `ptq bench quality` invocation: every method on every scheme (plus an fp32 row if fp32),
    calibrated on n_samples x seqlen tokens (protocol: 128 x 512), each row in its own process.

    schemes are QuantSpec names (w4pc, w3g64, ...); device is a resolved torch device ("cpu", "cuda")."""

    model: str
    methods: tuple[MethodChoice, ...]
    schemes: tuple[str, ...]
    out: Path
    fp32: bool = True
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0  # the calibration draw (protocol: 0); rows at other seeds are kept apart and averaged
    calib: str = "wikitext2"  # the calibration text (tasks.textdata spec; "a+b" mixes equal shares)
    device: str = "cpu"
    batch_size: int = 8
    true_sequential: bool = True
    mirror: str | None = None
    activations: str | None = None  # quantlib.actquant: a8, a4 (rows' scheme gets the suffix), None weight-only
    smooth: float | None = None  # SmoothQuant alpha before each block (rows' method gets +sq<alpha>)
    rotate: str | None = None  # quantlib.rotation mode before quantizing (rows' method gets +rot / +rotres)
    quantized_inputs: bool = False  # solve on the activations' quantized inputs (EngineConfig.act_inputs; +qin)
    mixed: MixedConfig | None = None  # a scheme per Linear (quantlib.mixed); rows' scheme is mix(...)@size

    def __post_init__(self) -> None:
        parse_activations(self.activations)
        if self.quantized_inputs and self.activations is None:
            raise ValueError("quantized_inputs solves on the quantized inputs of `activations`: set activations")
        if self.quantized_inputs:
            for m in self.methods:
                check_quantized_inputs(m)
        EngineConfig(smooth=self.smooth)  # validates alpha
        if self.rotate is not None and self.rotate not in ROTATION_MODES:
            raise ValueError(f"--rotate must be one of {', '.join(ROTATION_MODES)}, got {self.rotate!r}")
        parse_calibration_source(self.calib)
        if self.n_samples < 1 or self.seqlen < 2:
            raise ValueError(f"--n-samples must be >= 1 and --seqlen >= 2, got {self.n_samples} and {self.seqlen}")
        if not all(isinstance(m, MethodChoice) for m in self.methods):
            raise TypeError("methods must be MethodChoice objects (flows.methods.parse_method)")
        for s in self.schemes:
            parse_scheme(s)


_CONFIG_TYPES = {t.__name__: t for t in (RTNConfig, GPTQConfig, BoAConfig, ReconConfig, QATConfig)}


def _config_to_json(cfg) -> dict:
    return {"type": type(cfg).__name__, "fields": asdict(cfg)}


def _config_from_json(d: dict):
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d["fields"].items()}  # JSON lists were tuples
    return _CONFIG_TYPES[d["type"]](**values)


def _choice_to_json(m: MethodChoice) -> dict:
    return {"base": _config_to_json(m.base), "qat": None if m.qat is None else _config_to_json(m.qat),
            "label": m.label, "base_label": m.base_label}


def _choice_from_json(d: dict) -> MethodChoice:
    return MethodChoice(_config_from_json(d["base"]), None if d["qat"] is None else _config_from_json(d["qat"]),
                        label=d["label"], base_label=d["base_label"])


def _mixed_to_json(m: MixedConfig) -> dict:
    return {"candidates": [c.name for c in m.candidates], "bits": m.bits, "samples": m.samples}


def _mixed_from_json(d: dict) -> MixedConfig:
    return MixedConfig(tuple(parse_scheme(c) for c in d["candidates"]), d["bits"], d["samples"])


def _plan(model, calib: torch.Tensor, default, mixed: dict) -> tuple[object, dict]:
    """quantlib.mixed's plan for the loaded model and what a row records of it: the target, the
    Fisher sequences, how many Linears took each scheme and the scheme of each unit in model order."""
    cfg = _mixed_from_json(mixed)
    plan, units, target = plan_mixed(get_adapter(model), calib, cfg, default)
    return plan, {**mixed, "target_bpw": round(target, 4), "linears": plan_split(plan),
                  "units": [plan[u.paths[0]].name for u in units]}


ROTATION_SUFFIX = {"full": "+rot", "residual": "+rotres"}


def check_quantized_inputs(method: MethodChoice) -> None:
    """Quantized inputs change what GPTQ and BoA solve on and what reconstruction windows train on;
    RTN reads no inputs: refuse rather than label a row +qin for nothing."""
    if not isinstance(method.base, (GPTQConfig, BoAConfig, ReconConfig)):
        raise ValueError(f"--quantized-inputs applies to gptq, boa and recon (they solve or train on inputs), "
                         f"not {method.label}")


def _versions() -> dict:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    commit += "-dirty" if commit and dirty else ""  # uncommitted changes to tracked files ran too
    return {"quantlib": quantlib.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git": commit or None, "threads": torch.get_num_threads(),
            # torch's count misses what OpenMP / MKL were told, which also reorders float sums
            **{k.lower(): os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _worker(job: dict) -> list[dict]:
    """One benchmark row in this process: load, (quantize,) evaluate. A `<method>+qat` job also
    evaluates the block-wise result before QAT and returns it as a `<method>` row first (its time is
    the block-wise quantization alone, without the FP teacher pass), so both come from one quantization."""
    model_dir = Path(job["model_dir"])
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    calib = CALIB | job["calib"]
    source = calib.pop("source", "wikitext2")
    data = C.protocol_data(tok, source, "wikitext2", mirror=job.get("mirror"), **calib)
    offdomain = C.offdomain_windows(tok, job.get("mirror"), calib["window"], calib["n_windows"])

    def scores() -> dict:  # wiki (the calibration domain) and, where the mirror has it, the Python docs
        return {"ppl": C.eval_ppl(model, data.windows),
                "ppl_pydocs": None if offdomain is None else C.eval_ppl(model, offdomain, desc="python-docs")}

    seconds = 0.0
    settings = dict(calib, dtype="float32", device=job["device"], **({} if source == "wikitext2" else {"calib": source}))
    shown = job["scheme"] + (f"-{job['activations']}" if job.get("activations") else "")  # w8pcs-a8
    rows, size = [], {}  # size: effective bits per weight of a quantized row
    if job["method"] is not None:
        method = _choice_from_json(job["method"])
        cfg, qat = method.base, method.qat
        spec = parse_scheme(job["scheme"])
        engine = EngineConfig(batch_size=job["batch_size"], true_sequential=job["true_sequential"], device=job["device"],
                              smooth=job.get("smooth"), act_inputs=job.get("activations") if job.get("quantized_inputs") else None)
        t0 = time.perf_counter()
        if job.get("rotate"):  # FP-exact, so the FP teacher and the fp32 row are unchanged
            settings["rotation_seed"] = rotate_model(get_adapter(model), job["rotate"])["seed"]
        teacher = C.qat_teacher(model, data.calib, qat)  # FP logits, before quantizing
        t_quant = time.perf_counter()
        if job.get("mixed"):  # timed as part of the method
            spec, settings["mixed"] = _plan(model, data.calib, spec, job["mixed"])
            shown = shown.replace(job["scheme"], _mixed_from_json(job["mixed"]).label(spec.default), 1)
        results, _, _ = C.quantize_loaded(model, data.calib, spec, cfg, engine)
        # QAT replaces, then restores, these modules; static scales are calibrated on the calibration ids
        C.quantize_activations(model, results, job.get("activations"), data.calib)
        size = {"bpw": round(bits_per_weight(results), 4)}  # QAT keeps the scheme: one size for both rows
        settings |= {"method_config": cfg.__dict__, "true_sequential": job["true_sequential"], "batch_size": job["batch_size"],
                     **{k: job[k] for k in ("activations", "smooth", "rotate", "quantized_inputs") if job.get(k) not in (None, False)}}
        if qat is not None:
            t_eval = time.perf_counter()
            rows.append({"method": method.base_label + job.get("method_suffix", ""), "scheme": shown, **size, **scores(),
                         "quant_seconds": round(t_eval - t_quant, 1), "peak_rss_mb": _rss_mb(), "settings": dict(settings)})
            t0 += time.perf_counter() - t_eval  # the evaluation is not quantization time
            results, qst = C.refine_qat(model, data.calib, results, qat, teacher)
            settings["qat"] = qat.__dict__ | {k: getattr(qst, k) for k in (
                "steps", "init_heldout", "best_heldout", "best_step", "kept_init", "stopped_early", "seconds", "bf16")}
        seconds = time.perf_counter() - t0
    return rows + [{"method": job["label"], "scheme": shown, **size, **scores(), "quant_seconds": round(seconds, 1),
                    "peak_rss_mb": _rss_mb(), "settings": settings}]


def _run_job(job: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        r = subprocess.run([sys.executable, "-m", "flows.bench", json.dumps(job), str(out)])
        if r.returncode != 0:
            raise RuntimeError(f"benchmark worker failed for {job['label']} {job['scheme']} (exit {r.returncode})")
        return json.loads(out.read_text())


def _jobs(bench: QualityBench, model_dir: Path) -> list[dict]:
    """One JSON job per row: fp32 first (if asked), then every method per scheme."""
    base = {"model_dir": str(model_dir), "mirror": bench.mirror, "device": bench.device,
            "batch_size": bench.batch_size, "true_sequential": bench.true_sequential,
            "calib": {"n": bench.n_samples, "seqlen": bench.seqlen, "seed": bench.seed, "source": bench.calib}}
    jobs = [dict(base, method=None, label="fp32", scheme="fp32")] if bench.fp32 else []
    suffix = ("" if bench.rotate is None else ROTATION_SUFFIX[bench.rotate]) + \
        ("" if bench.smooth is None else f"+sq{bench.smooth:g}") + ("+qin" if bench.quantized_inputs else "")
    act = {"activations": bench.activations, "smooth": bench.smooth, "rotate": bench.rotate,
           "quantized_inputs": bench.quantized_inputs, "method_suffix": suffix,
           "mixed": None if bench.mixed is None else _mixed_to_json(bench.mixed)}
    return jobs + [dict(base, **act, method=_choice_to_json(m), label=m.label + act["method_suffix"],
                        scheme=s)
                   for s in bench.schemes for m in bench.methods]


def run_quality(bench: QualityBench) -> int:
    """Run every row of `bench`, appending each to bench.out (JSON) and regenerating its .md."""
    model_dir = C.cached_model(bench.model)
    if bench.rotate is not None:  # before any row: quantlib.rotation refuses other families
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model_dir).model_type
        if model_type not in ROTATABLE:
            raise ValueError(f"--rotate supports {', '.join(ROTATABLE)}; {bench.model} is {model_type!r}")
    jobs = _jobs(bench, model_dir)
    out = bench.out
    command = "ptq " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows, versions = [], _versions()  # the code the workers run: read once, before the first row
    for job in jobs:
        new = [r | {"model": bench.model, "versions": versions, "command": command,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")} for r in _run_job(job)]
        rows += new
        # re-read before appending: another bench may have added rows meanwhile
        records = (json.loads(out.read_text()) if out.exists() else []) + new
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, records)  # after every job: a killed bench keeps what finished
        atomic_write_bytes(out.with_suffix(".md"), render_quality_md(records).encode())
        for row in new:
            print(f"{row['method']:>6} {row['scheme']:>6}  ppl {row['ppl']:.2f}  {row['quant_seconds']:.0f} s", flush=True)
    print_table(rows, ["method", "scheme", "ppl", "quant_seconds", "peak_rss_mb"])
    return 0


def render_quality_md(records: list[dict]) -> str:
    """Latest record per (model, method, scheme, calibration size) as a markdown table, with the
    commands that made them."""
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r.get("model", "smollm2-135m"), r["method"], r["scheme"], _calib(r))] = r
    lines = ["# Quality benchmark", "",
             "Protocol (docs/protocol.md): WikiText-2 test, calibration 128 x 512 from the first half (seed 0), ",
             "perplexity on the first 16 x 1024-token windows of the second half; fp32 on CPU. ",
             "python-docs: the off-domain check of docs/protocol.md (first 200,000 characters of the Python ",
             "docs, 16 x 1024 windows; fp32 11.60), for rows made since it was added. ",
             "Generated from quality.json by `ptq bench quality` (latest row per method, scheme and calibration).", "",
             "bits/w: effective bits per quantized weight (codes, an fp16 scale per group, a zero point per group ",
             "when asymmetric; quantlib.qweight.bits_per_weight), for rows made since it was added. ",
             "mix(A+B)@S: mixed precision (quantlib.mixed), each Linear on A or B, sized as uniform S (or at S bits ",
             "per weight); listed beside S's rows, with the split in the table after the main one.", "",
             "| model | method | scheme | bits/w | ppl | python-docs | quant s | threads | peak RSS MB | calib | date |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for (model, method, scheme, calib), r in sorted(latest.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][2]),
                                                                                      kv[0][2], kv[0][1])):
        off = "" if r.get("ppl_pydocs") is None else f"{r['ppl_pydocs']:.2f}"
        bpw = "" if r.get("bpw") is None else f"{r['bpw']:.2f}"
        lines.append(f"| {model} | {method} | {scheme} | {bpw} | {r['ppl']:.2f} | {off} | {r['quant_seconds']:.0f} | "
                     f"{r.get('versions', {}).get('threads', '')} | "
                     f"{r['peak_rss_mb']:.0f} | {calib} | {r['date'][:10]} |")
    lines += _mixed_table(list(latest.values()))
    lines += _seeds_table(list(latest.values()))
    lines += _settings_table([r for r in latest.values() if _is_recon(r) or "qat" in r["settings"]])
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in latest.values())]
    return "\n".join(lines) + "\n"


def _size_key(scheme: str) -> str:
    """A mixed row sorts with the uniform scheme it is sized as (mix(...)@w2g64 beside w2g64)."""
    return scheme.rsplit("@", 1)[-1] if scheme.startswith("mix(") else scheme


def _mixed_table(rows: list[dict]) -> list[str]:
    mixed = [r for r in rows if r["settings"].get("mixed")]
    if not mixed:
        return []
    lines = ["", "Mixed-precision plans (Linears per scheme; target bits per weight; Fisher sequences):", "",
             "| method | scheme | Linears per scheme | target bits/w | Fisher sequences |", "|---|---|---|---:|---:|"]
    for r in sorted(mixed, key=lambda r: (r["scheme"], r["method"])):
        m = r["settings"]["mixed"]
        split = ", ".join(f"{n} {s}" for s, n in m["linears"].items())
        lines.append(f"| {r['method']} | {r['scheme']} | {split} | {m['target_bpw']:.3f} | {m['samples']} |")
    return lines


RECON_KEYS = ("window", "overlap", "lookahead", "rounding", "rank", "learn_clip", "loss", "init", "grid", "iters", "batch_size", "lr",
              "clip_lr", "optimizer", "heldout", "eval_every")
QAT_KEYS = ("trainable", "loss", "steps", "lr", "batch_size", "heldout", "best_step", "kept_init", "bf16")


def _calib(r: dict, seed: bool = True) -> str:
    """`128x512`, with the text when it is not WikiText-2 and ` seed 1` for a draw other than the protocol's."""
    st = r["settings"]
    size = f"{st.get('n', CALIB['n'])}x{st.get('seqlen', CALIB['seqlen'])}" + (f" {st['calib']}" if "calib" in st else "")
    return size + (f" seed {st['seed']}" if seed and st.get("seed", 0) != CALIB["seed"] else "")


def _seeds_table(latest: list[dict]) -> list[str]:
    """Mean +- std (sample) over calibration seeds, for every method, scheme and size measured at
    more than one seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in latest:
        groups.setdefault((r.get("model", "smollm2-135m"), r["method"], r["scheme"], _calib(r, seed=False)), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["settings"].get("seed", 0) for r in v}) > 1}
    if not groups:
        return []

    def stat(values: list[float]) -> str:
        t = torch.tensor(values, dtype=torch.float64)
        return f"{float(t.mean()):.2f} ± {float(t.std()):.2f}"

    out = ["", "## Over calibration seeds", "", "| model | method | scheme | calib | seeds | ppl | python-docs |",
           "|---|---|---|---|---|---:|---:|"]
    for (model, method, scheme, calib), rows in sorted(groups.items()):
        off = [r["ppl_pydocs"] for r in rows if r.get("ppl_pydocs") is not None]
        seeds = ",".join(str(s) for s in sorted(r["settings"].get("seed", 0) for r in rows))
        out.append(f"| {model} | {method} | {scheme} | {calib} | {seeds} | {stat([r['ppl'] for r in rows])} | "
                   f"{stat(off) if len(off) == len(rows) else ''} |")
    return out


def _is_recon(r: dict) -> bool:
    return "window" in r["settings"].get("method_config", {})  # a ReconConfig's fields


def _settings_table(rows: list[dict]) -> list[str]:
    """Reconstruction / QAT rows with the settings that distinguish them (ablation view)."""
    if not rows:
        return []
    out = ["", "## Reconstruction and QAT settings", "",
           "| method | scheme | calib | ppl | quant s | reconstruction | qat |", "|---|---|---|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["scheme"], _calib(r), r["method"])):
        st = r["settings"]
        mc = st.get("method_config", {})
        recon = ", ".join(f"{k}={mc[k]}" for k in RECON_KEYS if k in mc) if _is_recon(r) else ""
        qat = ", ".join(f"{k}={st['qat'][k]}" for k in QAT_KEYS if k in st.get("qat", {}))
        out.append(f"| {r['method']} | {r['scheme']} | {_calib(r)} | {r['ppl']:.2f} | {r['quant_seconds']:.0f} | {recon} | {qat} |")
    return out


def _stage_seconds(*names: str) -> float:
    """Wall time of the pipeline stages `names` when they last ran (metrics/stages/<name>.json)."""
    files = [Path(S.get_stage(n).timings) for n in names]
    return sum(json.loads(f.read_text())["seconds"] for f in files if f.is_file())


def run_demo() -> int:
    """The main job on the default model: `ptq run` with ./params.yaml (GPTQ W4 g64 by default) in a
    child process, then round-to-nearest on the same model and windows for comparison."""
    if subprocess.run([sys.executable, "-m", "flows.cli", "run", "-p", "params.yaml"]).returncode != 0:
        return 1
    tokens = json.loads(Path(S.TOKENS, "tokens.json").read_text())
    first = next(iter(tokens["eval"].values()))
    windows = read_token_ids(Path(S.TOKENS) / first["file"], first["sha256"])["windows"]
    metrics = json.loads(Path(S.METRICS).read_text())
    model = load_model(S.MODEL)
    plan = Path(S.QUANTIZED) / "mixed_plan.json"  # mixed precision: RTN on the same per-Linear schemes
    scheme = plan_from_json(json.loads(plan.read_text())) if plan.is_file() else parse_scheme(metrics["scheme"])
    _, _, seconds = C.quantize_loaded(model, None, scheme, RTNConfig(), EngineConfig())
    rows = [{"method": "fp32", "scheme": "-", "ppl": next(iter(metrics["fp32_ppl"].values()))},
            {"method": "rtn", "scheme": metrics["scheme"], "ppl": C.eval_ppl(model, windows, desc="rtn perplexity"),
             "quant_seconds": seconds},
            {"method": metrics["method"], "scheme": metrics["scheme"], "ppl": next(iter(metrics["ppl"].values())),
             "quant_seconds": _stage_seconds("quantize", "qat")}]
    print()
    print_table(rows, ["method", "scheme", "quant_seconds", "ppl"])
    return 0


if __name__ == "__main__":
    rows = _worker(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(rows))
