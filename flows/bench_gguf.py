"""GGUF export benchmark: what our codes are worth inside llama.cpp's file format.

On the default model and the protocol of docs/protocol.md (calibration 128 x 512 from the first half of
WikiText-2 test, 16 windows x 1024 from its second half), for each scheme with an exact GGUF type:
  ours        the scheme quantized by `--method` (gptq by default), scored as our fake-quant model;
  ours.gguf   the same codes written by `pack.format: gguf` and read back by transformers' GGUF
              loader (a reader that is not ours): equal to `ours` up to the fp16 block scales;
  rtn.gguf    the FP weights quantized by the gguf package's reference quantizer for the type (what
              llama.cpp's `llama-quantize` does for it without an importance matrix), same file layout.
Every row also has the file size. Caveat printed with the table: the default model is itself
distributed as Q4_1 (dequantized by the fetch stage), so its weights already lie on a Q4_1 grid.

    python -m flows.bench_gguf                      # appends to docs/benchmarks/gguf.json, writes gguf.md
    python -m flows.bench_gguf --schemes w4g32 --n-samples 32    # a quicker, reduced-protocol row
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["run_gguf", "render_gguf_md", "SCHEMES"]

DEFAULT_OUT = "docs/benchmarks/gguf.json"
SCHEMES = ("w4g32s", "w4g32", "w5g32", "w8g32s")  # Q4_0, Q4_1, Q5_1, Q8_0


def _rtn_blocks(model, names: list[str], kind: str) -> dict[str, tuple[str, torch.Tensor]]:
    """The gguf package's reference quantizer (llama.cpp's *_ref functions) on each FP weight."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from quantlib.adapters import get_adapter

    adapter = get_adapter(model)
    out = {}
    for name in names:
        w = adapter.get_weight(model.get_submodule(name)).detach().float().numpy()
        out[name] = (kind, torch.from_numpy(quantize(w, GGMLQuantizationType[kind])))
    return out


def _score(path: Path, config_dir: Path, windows) -> float:
    """Perplexity of a GGUF file read by transformers' GGUF loader, with the source architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import commands as C

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32).eval()
    return C.eval_ppl(model, windows)


def _row(scheme: str, kind: str, label: str, ppl: float, size: int, seconds: float, settings: dict) -> dict:
    return {"scheme": scheme, "gguf_type": kind, "method": label, "ppl": ppl, "file_mb": round(size / 2**20, 2),
            "seconds": round(seconds, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "settings": settings}


def _one_scheme(model_dir: Path, data, scheme: str, method: str, tmp: Path) -> list[dict]:
    from quantlib.engine import EngineConfig
    from quantlib.gguf import gguf_blocks, gguf_type
    from quantlib.spec import parse_scheme
    from tasks.gguf_release import write_gguf_file
    from tasks.sources import load_model

    from . import commands as C
    from .methods import parse_method

    spec = parse_scheme(scheme)
    kind = gguf_type(spec)
    model = load_model(model_dir)
    settings = {"n_samples": int(data.calib.shape[0]), "seqlen": int(data.calib.shape[1]), "windows": len(data.windows)}
    t0 = time.perf_counter()
    results, _, _ = C.quantize_loaded(model, data.calib, spec, parse_method(method).base, EngineConfig())
    seconds = time.perf_counter() - t0
    names = sorted(results)
    rows = [_row(scheme, kind, method, C.eval_ppl(model, data.windows), 0, seconds, settings)]
    path = tmp / f"{scheme}-{method}.gguf"
    write_gguf_file(path, model_dir, {n: gguf_blocks(results[n]) for n in names}, torch.float16, f"{scheme} {method}")
    rows.append(_row(scheme, kind, f"{method}.gguf", _score(path, model_dir, data.windows), path.stat().st_size, seconds,
                     settings))
    t1 = time.perf_counter()
    rtn = _rtn_blocks(load_model(model_dir), names, kind)
    path = tmp / f"{scheme}-rtn.gguf"
    write_gguf_file(path, model_dir, rtn, torch.float16, f"{scheme} llama.cpp rtn")
    rows.append(_row(scheme, kind, "rtn.gguf", _score(path, model_dir, data.windows), path.stat().st_size,
                     time.perf_counter() - t1, settings))
    return rows


def run_gguf(model: str, schemes: tuple[str, ...], method: str, n_samples: int, out: Path) -> list[dict]:
    from tasks.io import atomic_write_bytes
    from tasks.sources import load_model, load_tokenizer

    from . import commands as C
    from .bench import CALIB

    model_dir = C.cached_model(model)
    calib = dict(CALIB, n=n_samples)
    data = C.protocol_data(load_tokenizer(model_dir), "wikitext2", None, **calib)
    fp = C.eval_ppl(load_model(model_dir), data.windows)
    command = "python -m flows.bench_gguf " + shlex.join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in schemes:  # each scheme's rows are written as soon as they exist
            done = [r | {"model": model, "fp32_ppl": fp, "command": command, "date": dt.date.today().isoformat()}
                    for r in _one_scheme(model_dir, data, scheme, method, Path(tmp))]
            for r in done:
                print(json.dumps({k: r[k] for k in ("scheme", "gguf_type", "method", "ppl", "file_mb")}), flush=True)
            records = (json.loads(out.read_text()) if out.is_file() else []) + done
            atomic_write_bytes(out, (json.dumps(records, indent=1) + "\n").encode())
            atomic_write_bytes(out.with_suffix(".md"), render_gguf_md(records).encode())
            rows += done
    return rows


def render_gguf_md(records: list[dict]) -> str:
    lines = ["# GGUF export", "",
             "Perplexity (WikiText-2 test, second half, 16 x 1024) of our codes written as GGUF and read back",
             "by transformers' GGUF loader, against the same GGUF type made by the gguf package's reference",
             "quantizer (llama.cpp's round-to-nearest for that type, no importance matrix). Produced by",
             "`flows/bench_gguf.py`; the command of each row is in gguf.json. The default model is itself",
             "distributed as Q4_1, so its weights already lie on a Q4_1 grid: a round-to-nearest Q4_1 (or a",
             "finer type) of it loses almost nothing, which favours `rtn.gguf` in the Q4_1 and Q5_1 rows.", "",
             "| model | scheme | GGUF type | codes | ppl | fp32 ppl | file MB | quant s | calib | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["settings"]
        lines.append(f"| {r['model']} | {r['scheme']} | {r['gguf_type']} | {r['method']} | {r['ppl']:.2f} | "
                     f"{r['fp32_ppl']:.2f} | {r['file_mb'] or ''} | {r['seconds']} | {s['n_samples']}x{s['seqlen']} | "
                     f"{r['date']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_gguf", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--method", default="gptq")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    a = p.parse_args(argv)
    run_gguf(a.model, tuple(a.schemes), a.method, a.n_samples, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
