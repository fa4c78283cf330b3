"""GGUF export benchmark: what our codes are worth inside llama.cpp's file format, and in llama.cpp.

On the default model and the protocol of docs/protocol.md (calibration 128 x 512 from the first half of
WikiText-2 test, 16 windows x 1024 from its second half), for each scheme (`w4g32`, or `w4g32:Q4_K`
to add a K-quant type):
  ours        the scheme quantized by `--method` (gptq by default), or the codes of a `ptq quantize`
              output (`--codes DIR`: any method, QAT included), scored as our fake-quant model;
  ours.gguf   the same codes written by `pack.format: gguf` and read back by transformers' GGUF
              loader (a reader that is not ours): equal to `ours` up to the fp16 block scales;
  rtn.gguf    the FP weights quantized by the gguf package's reference quantizer for the type (what
              llama.cpp's `llama-quantize` does for it without an importance matrix), same file layout;
  ours.K      with a K type: our codes fitted into it (`pack.gguf_type`), with the mean relative
              weight error against our codes;
  llama.cpp.K with a K type and llama.cpp: llama.cpp's own quantizer (`pure`, embeddings F16) on the
              F16 file of the FP model (it substitutes its fallback types for rows not whole blocks).
Every row has the file size. With `--llama-cpp PYTHON` (an interpreter with llama-cpp-python,
`make llama-cpp-env`; default $PTQ_LLAMA_CPP_PYTHON) each K-type file is also scored by llama.cpp itself
(perplexity on the same windows, ~4 min a file on 2 cores) and its tokenizer checked against ours;
`--decode` measures greedy batch-1 decode tokens/s. Caveat printed with the table: the
default model is itself distributed as Q4_1 (dequantized by the fetch stage), so its weights already
lie on a Q4_1 grid.

    python -m flows.bench_gguf --schemes w4g32:Q4_K w2g64:Q2_K    # appends to docs/benchmarks/gguf.json
    python -m flows.bench_gguf --decode                            # decode tokens/s: torch vs llama.cpp
    # the 2-bit default's codes in Q2_K (one command line each):
    ptq quantize --method recon-k1-rtn-signed-sign-mse-i100-bf16+qat128-bf16 --bits 2 --group-size 64
        --clip-lr 0.3 --grid learned --qat-lr 0.01 --qat-patience 0 --out q2
    python -m flows.bench_gguf --codes q2 --schemes w2g64:Q2_K
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench_kernels import DECODE_PROMPT, _decode_tokens_per_s

__all__ = ["run_gguf", "run_gguf_decode", "render_gguf_md", "read_codes", "SCHEMES"]

DEFAULT_OUT = "docs/benchmarks/gguf.json"
SCHEMES = ("w4g32s", "w4g32:Q4_K", "w5g32", "w8g32s")  # Q4_0, Q4_1 (+ Q4_K), Q5_1, Q8_0
TOOL = Path(__file__).with_name("llama_cpp_tool.py")
# what a --codes row records of the `ptq quantize` run that made its codes
CODES_KEYS = ("method", "method_config", "qat_config", "calib", "seed", "quantized_sha256", "quant_seconds")


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


def _llama_cpp(python: str, *args: str) -> list[dict]:
    """Run flows/llama_cpp_tool.py in the llama.cpp interpreter; its JSON lines."""
    done = subprocess.run([python, str(TOOL), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama.cpp tool failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _llama_cpp_scores(python: str, files: list[Path], windows, new_tokens: int, tmp: Path,
                      texts: list[dict] = ()) -> dict[str, dict]:
    job = tmp / "job.json"
    job.write_text(json.dumps({"files": [str(f) for f in files], "windows": windows.tolist(), "prompt": DECODE_PROMPT,
                               "new_tokens": new_tokens, "threads": torch.get_num_threads(), "texts": list(texts)}))
    return {r["file"]: r for r in _llama_cpp(python, "score", str(job))}


def _row(scheme: str, kind: str, label: str, ppl: float | None, path: Path | None, seconds: float,
         settings: dict, **extra) -> dict:
    return {"scheme": scheme, "gguf_type": kind, "method": label, "ppl": ppl,
            "file_mb": round(path.stat().st_size / 2**20, 2) if path else 0.0, "seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "settings": settings, "path": str(path) if path else None, **extra}


def read_codes(folder: Path, model: str, schemes: tuple[str, ...]) -> tuple[dict, dict]:
    """(codes by module, quantization.json) of a `ptq quantize --out` folder, checked before any work:
    its files match its MANIFEST, it was made from `model`, only its Linears' weights differ from the
    source (a GGUF file here takes every other tensor from the source), its scheme has a GGUF type, and
    every `schemes` entry names that scheme."""
    from quantlib.gguf import gguf_type
    from quantlib.spec import parse_scheme
    from tasks.io import verify_manifest
    from tasks.qat import load_quantized

    info = _codes_info(folder)
    bad = verify_manifest(folder)
    if bad:
        raise ValueError(f"--codes {folder}: {', '.join(bad)} differ from its MANIFEST.json; re-run ptq quantize")
    if info.get("model") != model:
        raise ValueError(f"--codes {folder} was made from {info.get('model')!r}, not --model {model!r}; pass "
                         f"--model {info.get('model')}")
    changed = _beyond_the_linears(info)
    if changed:
        raise ValueError(f"--codes {folder} was made with {changed}, which changes more than the quantized weights; "
                         "a GGUF file of its codes and the source model's other tensors cannot carry it: quantize "
                         "without it")
    name = info["spec"]["name"]
    gguf_type(parse_scheme(name))  # refuses a scheme with no GGUF type, naming the fix
    wrong = [s for s in schemes if parse_scheme(s.partition(":")[0]).name != name]
    if wrong:
        raise ValueError(f"--schemes {' '.join(wrong)}: the codes in {folder} are {name}; pass --schemes {name} "
                         f"or {name}:K_TYPE")
    return load_quantized(folder / "quantized.safetensors", info["quantized_sha256"], info["modules"]), info


def _codes_info(folder: Path) -> dict:
    """quantization.json of a `ptq quantize --out` folder (a release folder is refused)."""
    path = folder / "quantization.json"
    if not path.is_file():
        raise ValueError(f"--codes {folder}: no quantization.json; give the --out folder of a `ptq quantize` run")
    info = json.loads(path.read_text())
    if "format" in info or "quantized_sha256" not in info:
        raise ValueError(f"--codes {folder}: a release folder, not a `ptq quantize --out` folder (which keeps the "
                         "codes in quantized.safetensors); give the folder `ptq quantize --out` wrote")
    return info


def _beyond_the_linears(info: dict) -> str | None:
    """What in a `ptq quantize` run changed tensors besides the quantized Linears' weights (norms,
    embeddings, online transforms) or mixed their schemes; None when nothing did."""
    for key in ("rotation", "activations", "mixed", "smooth"):  # None when unused (smooth 0 is a setting)
        if info.get(key) is not None:
            return f"{key} {info[key]!r}"
    if (info.get("method_config") or {}).get("cfp") or re.search(r"-cfpa?(-|\+|$)", info.get("method", "")):
        return "CFP (it rescales the norms)"
    if (info.get("qat_config") or {}).get("train_norms"):
        return "QAT's trainable norms"
    return None


def _given_ppl(model_dir: Path, data, codes: dict) -> float:
    """Fake-quant perplexity of read_codes' codes put into the source model."""
    from tasks.qat import apply_quantized
    from tasks.sources import load_model

    from . import commands as C

    model = load_model(model_dir)
    apply_quantized(model, codes)
    return C.eval_ppl(model, data.windows)


def _ours(model_dir: Path, data, spec, method: str):
    """(codes by module, fake-quant perplexity, seconds) of `method` at `spec` on the protocol data."""
    from quantlib.engine import EngineConfig
    from tasks.sources import load_model

    from . import commands as C
    from .methods import parse_method

    model = load_model(model_dir)
    t0 = time.perf_counter()
    results, _, _ = C.quantize_loaded(model, data.calib, spec, parse_method(method).base, EngineConfig())
    seconds = time.perf_counter() - t0
    return results, C.eval_ppl(model, data.windows), seconds


def _k_rows(model_dir: Path, data, results: dict, scheme: str, kind: str, method: str, tmp: Path,
            llama: str | None, settings: dict) -> list[dict]:
    """Our codes fitted into K type `kind`, and llama.cpp's own quantization to it (with llama.cpp)."""
    from quantlib.gguf_k import gguf_export
    from tasks.gguf_release import relative_error, write_gguf_file

    t0 = time.perf_counter()
    blocks, errors = {}, []
    for name, qw in sorted(results.items()):
        got, rows, weight = gguf_export(qw, kind)
        blocks[name] = (got, rows)
        errors.append(relative_error(weight, qw))
    path = tmp / f"{scheme}-{method}-{kind}.gguf"
    write_gguf_file(path, model_dir, blocks, torch.float16, f"{scheme} {method} {kind}")
    share = sum(k == kind for k, _ in blocks.values()) / len(blocks)
    out = [_row(scheme, kind, f"{method}.{kind}", _score(path, model_dir, data.windows), path,
                time.perf_counter() - t0, settings, weight_error=sum(errors) / len(errors), k_share=share)]
    if llama:
        f16 = tmp / "f16.gguf"
        if not f16.exists():
            write_gguf_file(f16, model_dir, {}, torch.float16, "f16")
        path, t1 = tmp / f"{scheme}-llama.cpp-{kind}.gguf", time.perf_counter()
        _llama_cpp(llama, "quantize", str(f16), str(path), kind)
        out.append(_row(scheme, kind, f"llama.cpp.{kind}", _score(path, model_dir, data.windows), path,
                        time.perf_counter() - t1, settings))
    return out


def _one_scheme(model_dir: Path, data, scheme: str, method: str, tmp: Path, llama: str | None,
                given: tuple[dict, dict] | None = None) -> list[dict]:
    """The rows of one scheme; `given` = read_codes' (codes, info) instead of quantizing by `method`."""
    from quantlib.gguf import gguf_blocks, gguf_type
    from quantlib.spec import parse_scheme
    from tasks.gguf_release import write_gguf_file
    from tasks.sources import load_model

    name, _, k_type = scheme.partition(":")
    spec = parse_scheme(name)
    kind = gguf_type(spec)
    settings = {"n_samples": int(data.calib.shape[0]), "seqlen": int(data.calib.shape[1]), "windows": len(data.windows)}
    if given is None:
        results, ppl, seconds = _ours(model_dir, data, spec, method)
    else:  # data.calib has the codes' size (run_gguf); the row records how they were made
        (results, info), method = given, given[1]["method"]
        ppl, seconds = _given_ppl(model_dir, data, results), float(info["quant_seconds"])
        settings["codes"] = {k: info.get(k) for k in CODES_KEYS}
    names = sorted(results)
    rows = [_row(name, kind, method, ppl, None, seconds, settings)]
    path = tmp / f"{name}-{method}.gguf"
    write_gguf_file(path, model_dir, {n: gguf_blocks(results[n]) for n in names}, torch.float16, f"{name} {method}")
    rows.append(_row(name, kind, f"{method}.gguf", _score(path, model_dir, data.windows), path, seconds, settings))
    t1 = time.perf_counter()
    rtn = _rtn_blocks(load_model(model_dir), names, kind)
    path = tmp / f"{name}-rtn.gguf"
    write_gguf_file(path, model_dir, rtn, torch.float16, f"{name} llama.cpp rtn")
    rows.append(_row(name, kind, "rtn.gguf", _score(path, model_dir, data.windows), path,
                     time.perf_counter() - t1, settings))
    if k_type:
        rows += _k_rows(model_dir, data, results, name, k_type, method, tmp, llama, settings)
    return rows


def _with_llama_cpp(rows: list[dict], llama: str | None, windows, tmp: Path, texts: list[dict]) -> list[dict]:
    """Each row's file scored by llama.cpp itself: perplexity on the same windows, and whether its
    tokenizer cuts `texts` into our ids (no decode timing here)."""
    files = [Path(r["path"]) for r in rows if r["path"] and "_K" in r["gguf_type"]]  # ~4 min a file here
    if not llama or not files:
        return rows
    scores = _llama_cpp_scores(llama, files, windows, 1, tmp, texts)
    scores = {str(k): v for k, v in scores.items()}
    return [r | ({"llama_cpp_ppl": scores[r["path"]]["ppl"],
                  "llama_cpp_tokenization_identical": scores[r["path"]]["tokenization_identical"]}
                 if r["path"] in scores else {}) for r in rows]


def _tokenizer_probe(model_dir: Path) -> list[dict]:
    """Texts with our tokenizer's ids: 20,000 characters from the middle of WikiText-2 test and a line
    of digits, punctuation, accents, tabs and an emoji."""
    from tasks.sources import load_tokenizer
    from tasks.textdata import load_text, parse_text_source

    tokenizer, wiki = load_tokenizer(model_dir), load_text(parse_text_source("wikitext2"))
    texts = [wiki[len(wiki) // 2:len(wiki) // 2 + 20000],
             "It's 2026: 12,345.67 tokens (naïve café) \t x**2 -> y  # \U0001F600\n\n  end."]
    return [{"text": t, "ids": tokenizer(t)["input_ids"]} for t in texts]


def _append(out: Path, done: list[dict]) -> None:
    from tasks.io import atomic_write_bytes

    records = (json.loads(out.read_text()) if out.is_file() else []) + done
    atomic_write_bytes(out, (json.dumps(records, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), render_gguf_md(records, _records(_decode_path(out))).encode())


def _decode_path(out: Path) -> Path:
    return out.with_name(out.stem + "_decode.json")


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def _stamp(model: str, command: str) -> dict:
    return {"model": model, "command": command, "date": dt.date.today().isoformat(), "threads": torch.get_num_threads()}


def run_gguf(model: str, schemes: tuple[str, ...], method: str, n_samples: int, out: Path,
             llama: str | None = None, codes: Path | None = None) -> list[dict]:
    """Rows per scheme (module docstring), appended to `out`; `codes`: a `ptq quantize --out` folder
    whose codes replace `method` (its calibration size replaces `n_samples`)."""
    from tasks.sources import load_model, load_tokenizer

    from . import commands as C
    from .bench import CALIB

    given = None if codes is None else read_codes(Path(codes), model, schemes)  # refused before any work
    model_dir = C.cached_model(model)
    calib = dict(CALIB, n=n_samples) if given is None else dict(CALIB, n=given[1]["n_samples"],
                                                                  seqlen=given[1]["seqlen"])
    data = C.protocol_data(load_tokenizer(model_dir), "wikitext2", None, **calib)
    fp = C.eval_ppl(load_model(model_dir), data.windows)
    stamp = _stamp(model, "python -m flows.bench_gguf " + shlex.join(sys.argv[1:]))
    rows = []
    probe = _tokenizer_probe(model_dir) if llama else []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in schemes:  # each scheme's rows are written as soon as they exist
            done = _with_llama_cpp(_one_scheme(model_dir, data, scheme, method, Path(tmp), llama, given), llama,
                                   data.windows, Path(tmp), probe)
            done = [{k: v for k, v in r.items() if k != "path"} | stamp | {"fp32_ppl": fp} for r in done]
            for r in done:
                print(json.dumps({k: r.get(k) for k in ("scheme", "gguf_type", "method", "ppl", "llama_cpp_ppl",
                                                        "file_mb", "llama_cpp_tokenization_identical")}), flush=True)
            _append(out, done)
            rows += done
    return rows


def run_gguf_decode(model: str, scheme: str, kind: str, new_tokens: int, out: Path, llama: str) -> list[dict]:
    """Greedy batch-1 decode tokens/s on this CPU: the dense model in torch (fp32) against llama.cpp
    on F16, on our exact GGUF type, on our codes as `kind` and on llama.cpp's own `kind` (RTN codes:
    speed does not depend on the method)."""
    from quantlib.adapters import get_adapter
    from quantlib.gguf_k import gguf_export
    from quantlib.rtn import rtn_quantize
    from quantlib.spec import parse_scheme
    from tasks.gguf_release import write_gguf_file
    from tasks.sources import load_model

    from . import commands as C

    model_dir, spec = C.cached_model(model), parse_scheme(scheme)
    dense = load_model(model_dir)
    adapter = get_adapter(dense)
    codes = {f"{adapter.family.layers}.{i}.{n}": rtn_quantize(adapter.get_weight(m).detach(), spec)
             for i, block in enumerate(adapter.blocks) for n, m in adapter.linears(block).items()}
    stamp = _stamp(model, "python -m flows.bench_gguf " + shlex.join(sys.argv[1:])) | {"scheme": spec.name,
                                                                                         "new_tokens": new_tokens}
    rows = [stamp | {"runtime": "torch", "weights": "fp32 dense", "file_mb": None,
                     "decode_tokens_per_s": _decode_tokens_per_s(dense, "cpu", new_tokens, 1)}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {"F16": tmp / "f16.gguf", "ours exact": tmp / "exact.gguf", f"ours {kind}": tmp / "k.gguf",
                 f"llama.cpp {kind}": tmp / "llama.gguf"}
        write_gguf_file(files["F16"], model_dir, {}, torch.float16, "f16")
        for label, k in (("ours exact", "exact"), (f"ours {kind}", kind)):
            write_gguf_file(files[label], model_dir, {n: gguf_export(q, k)[:2] for n, q in codes.items()},
                            torch.float16, label)
        _llama_cpp(llama, "quantize", str(files["F16"]), str(files[f"llama.cpp {kind}"]), kind)
        scores = _llama_cpp_scores(llama, list(files.values()), torch.tensor([DECODE_PROMPT]), new_tokens, tmp)
        rows += [stamp | {"runtime": "llama.cpp", "weights": label, "file_mb": round(f.stat().st_size / 2**20, 2),
                          "decode_tokens_per_s": scores[str(f)]["decode_tokens_per_s"]} for label, f in files.items()]
    for r in rows:
        print(json.dumps({k: r[k] for k in ("runtime", "weights", "file_mb", "decode_tokens_per_s")}), flush=True)
    from tasks.io import atomic_write_bytes

    records = _records(_decode_path(out)) + rows
    atomic_write_bytes(_decode_path(out), (json.dumps(records, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), render_gguf_md(_records(out), records).encode())
    return rows


def _fmt(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _yes(x: bool | None) -> str:
    return "" if x is None else "yes" if x else "NO"


def render_gguf_md(records: list[dict], decode: list[dict] = ()) -> str:
    lines = ["# GGUF export", "",
             "Perplexity (WikiText-2 test, second half, 16 x 1024) of our codes written as GGUF and read back",
             "by transformers' GGUF loader, against the same GGUF type made by the gguf package's reference",
             "quantizer (`rtn.gguf`: llama.cpp's round-to-nearest for that type, no importance matrix; the type",
             "holds 4 bits, so for a 2- or 3-bit scheme this row is a 4-bit file, not a peer) and, for",
             "K-quant types, against llama.cpp's own quantizer (`llama.cpp.K`, pure, embeddings F16). `ours.K`",
             "is our codes fitted into the K type (`pack.gguf_type`): `weight err` is its mean relative error",
             "against our codes, `K share` the share of Linears in the K type (rows not whole 256-weight",
             "super-blocks keep the exact type; llama.cpp substitutes its own fallback types there, so file sizes",
             "differ). `llama.cpp ppl` is a K file scored by llama.cpp itself (llama-cpp-python); `same tokens`",
             "says whether llama.cpp's tokenizer, read from the file, cuts 20,000 characters of WikiText-2 and a",
             "line of digits, punctuation and accents into exactly our tokenizer's ids. Produced by",
             "`flows/bench_gguf.py`; the command of each row is in gguf.json. The default model is itself",
             "distributed as Q4_1, so its weights already lie on a Q4_1 grid: a round-to-nearest Q4_1 (or a",
             "finer type) of it loses almost nothing, which favours `rtn.gguf` in the Q4_1 and Q5_1 rows.", "",
             "| model | scheme | GGUF type | codes | ppl | llama.cpp ppl | same tokens | fp32 ppl | file MB | weight err | "
             "K share | quant s | calib | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["settings"]
        lines.append(f"| {r['model']} | {r['scheme']} | {r['gguf_type']} | {r['method']} | {r['ppl']:.2f} | "
                     f"{_fmt(r.get('llama_cpp_ppl'))} | {_yes(r.get('llama_cpp_tokenization_identical'))} | "
                     f"{r['fp32_ppl']:.2f} | {r['file_mb'] or ''} | "
                     f"{_fmt(r.get('weight_error'), 4)} | {_fmt(r.get('k_share'))} | {r['seconds']} | "
                     f"{s['n_samples']}x{s['seqlen']} | {r['date']} |")
    if decode:
        lines += ["", "## Decode speed", "",
                  "Greedy batch-1 decode tokens/s on this CPU (`python -m flows.bench_gguf --decode`, records in",
                  "gguf_decode.json): the dense model in torch against llama.cpp (llama-cpp-python) on each file.", "",
                  "| model | scheme | runtime | weights | file MB | tokens/s | threads | new tokens | date |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['scheme']} | {r['runtime']} | {r['weights']} | {r['file_mb'] or ''} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['threads']} | {r['new_tokens']} | {r['date']} |" for r in decode]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_gguf", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), help="SCHEME or SCHEME:K_TYPE, e.g. w4g32:Q4_K")
    p.add_argument("--method", default=None, help="block-wise method to quantize with (default gptq)")
    p.add_argument("--codes", type=Path, default=None, metavar="DIR",
                   help="the --out folder of a `ptq quantize` run: its codes (any method, +qat included) instead of "
                        "quantizing with --method")
    p.add_argument("--n-samples", type=int, default=None, help="calibration sequences (default 128)")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    p.add_argument("--llama-cpp", default=os.environ.get("PTQ_LLAMA_CPP_PYTHON"),
                   help="a Python with llama-cpp-python (make llama-cpp-env); default $PTQ_LLAMA_CPP_PYTHON")
    p.add_argument("--decode", action="store_true", help="decode tokens/s instead of perplexity rows")
    p.add_argument("--decode-scheme", default="w4g32:Q4_K")
    p.add_argument("--new-tokens", type=int, default=128)
    a = p.parse_args(argv)
    if a.decode:
        if not a.llama_cpp:
            p.error("--decode needs --llama-cpp PYTHON (or $PTQ_LLAMA_CPP_PYTHON)")
        scheme, _, kind = a.decode_scheme.partition(":")
        run_gguf_decode(a.model, scheme, kind or "Q4_K", a.new_tokens, a.out, a.llama_cpp)
    else:
        if a.codes is not None and (a.method or a.n_samples):
            p.error("--codes takes the method and calibration its `ptq quantize` run recorded: drop --method and "
                    "--n-samples")
        run_gguf(a.model, tuple(a.schemes), a.method or "gptq", a.n_samples or 128, a.out, a.llama_cpp, a.codes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
