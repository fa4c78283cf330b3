"""llm-compressor as a measured peer of the weight-and-activation rows (docs/benchmarks/activations.md).

    python -m flows.bench_peer --python .venv-llmcompressor/bin/python [--scheme W8A8|w4g64-a8] [--smooth 0.8]

The protocol's tensors (docs/protocol.md: calibration 128 x 512 at seed 0, the 16 wiki windows, the
16 python-docs windows) are made here, by the same code as `ptq bench quality`'s rows, and handed to
flows/llmcompressor_tool.py, which runs in llm-compressor's own environment (`make
llmcompressor-env`). The tool reports the digest of the token ids llm-compressor's calibration really
embedded; a row whose digest differs from the protocol's is refused. The row (with the calibration
and evaluation digests in its settings) is appended to --out in `ptq bench quality`'s record format
and the table regenerated.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from quantlib.data import ids_digest, ids_set_digest
from tasks.io import atomic_write_bytes, atomic_write_json
from tasks.sources import load_tokenizer

from . import commands as C
from .bench import CALIB, render_quality_md

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "flows" / "llmcompressor_tool.py"
# llm-compressor preset schemes -> our scheme names (weights, then inputs). Its W4A8 preset has
# 4-bit groups of 128, a grid none of our rows uses: other schemes are given in our names instead
# (w4g64-a8, w4g64-a4, ...) and handed to llm-compressor as the config group our releases declare.
PRESETS = {"W8A8": "w8pcs-a8"}
SCHEME_FORMS = "W8A8 (llm-compressor's preset) or one of our weight-activation schemes, e.g. w4g64-a8, w4pc-a4"


def peer_quantization(scheme: str) -> tuple[str, dict]:
    """(our name for the scheme, what the tool hands GPTQModifier): {"scheme": preset} for a preset,
    else {"config_groups": ...} holding compressed-tensors' weights and input_activations entries
    exactly as our compressed-tensors releases declare them (tasks.release_formats). Dynamic
    per-token inputs only: llm-compressor calibrates static scales its own way."""
    from quantlib.actquant import parse_activations
    from quantlib.spec import parse_scheme
    from tasks.release_formats import ct_inputs, ct_weights

    if scheme in PRESETS:
        return PRESETS[scheme], {"scheme": scheme}
    weights, _, inputs = scheme.partition("-")
    try:
        spec, act = parse_scheme(weights), parse_activations(inputs or None)
    except ValueError as e:
        raise ValueError(f"--scheme must be {SCHEME_FORMS}, got {scheme!r} ({e})") from None
    if act is None or act.static:
        raise ValueError(f"--scheme must be {SCHEME_FORMS} with dynamic inputs (a8, a4), got {scheme!r}")
    group = {"targets": ["Linear"], "weights": ct_weights(spec), "input_activations": ct_inputs(act.name)}
    return f"{spec.name}-{act.name}", {"config_groups": {"group_0": group}}


def run_peer(python: str, model: str, scheme: str, smooth: float | None, n: int, threads: int, out: Path,
             mirror: str | None = None) -> dict:
    """One peer row: prepare the protocol's tensors, run the tool in the peer's interpreter, append."""
    name, quantization = peer_quantization(scheme)
    if not Path(python).exists():
        raise FileNotFoundError(f"{python}: no such interpreter; build llm-compressor's environment with "
                                "`make llmcompressor-env`")
    model_dir = C.cached_model(model)
    tok = load_tokenizer(model_dir)
    data = C.protocol_data(tok, "wikitext2", "wikitext2", mirror=mirror, **dict(CALIB, n=n))
    offdomain = C.offdomain_windows(tok, mirror, CALIB["window"], CALIB["n_windows"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"calib": data.calib, "windows": data.windows, "offdomain": offdomain}, f"{tmp}/data.pt")
        job = {"model_dir": str(model_dir), "data": f"{tmp}/data.pt", "quantization": quantization, "smooth": smooth,
               "threads": threads}
        Path(tmp, "job.json").write_text(json.dumps(job))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([python, str(TOOL), f"{tmp}/job.json", f"{tmp}/out.json"], env=env)
        if done.returncode != 0:
            raise RuntimeError(f"llm-compressor run failed (exit {done.returncode}); its output is above")
        result = json.loads(Path(tmp, "out.json").read_text())
    if result["calib_seen"] != (expected := ids_set_digest(data.calib)):
        raise RuntimeError(f"llm-compressor calibrated on other tokens than the protocol's (digest {result['calib_seen']} "
                           f"against {expected}): its row would not be comparable; nothing was written")
    label = "llm-compressor " + ("" if smooth is None else f"sq{smooth:g}+") + "gptq"
    row = {"method": label, "scheme": name, "ppl": result["ppl"], "ppl_pydocs": result.get("ppl_pydocs"),
           "quant_seconds": result["quant_seconds"], "peak_rss_mb": result["peak_rss_mb"],
           "settings": {"n": n, "seqlen": CALIB["seqlen"], "seed": CALIB["seed"], "calib_digest": ids_digest(data.calib),
                        "eval_digest": ids_digest(data.windows),
                        "peer": {"recipe": scheme, "quantization": quantization, "smoothing_strength": smooth}},
           "model": model, "versions": result["versions"],
           "command": "python -m flows.bench_peer " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    records = (json.loads(out.read_text()) if out.exists() else []) + [row]
    atomic_write_json(out, records)
    atomic_write_bytes(out.with_suffix(".md"), render_quality_md(records).encode())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_peer", description=__doc__.splitlines()[0])
    p.add_argument("--python", default=os.environ.get("PTQ_LLMCOMPRESSOR_PYTHON", ".venv-llmcompressor/bin/python"),
                   help="a Python with llmcompressor (make llmcompressor-env); default $PTQ_LLMCOMPRESSOR_PYTHON")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="W8A8", help=SCHEME_FORMS)
    p.add_argument("--smooth", type=float, default=0.8, help="SmoothQuant strength (llm-compressor's W8A8 example: "
                   "0.8); a negative value runs GPTQ alone")
    p.add_argument("--n-samples", type=int, default=CALIB["n"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/activations.json"))
    a = p.parse_args(argv)
    row = run_peer(a.python, a.model, a.scheme, None if a.smooth < 0 else a.smooth, a.n_samples, a.threads, a.out,
                   os.environ.get("PTQ_DATA_MIRROR"))
    print(f"{row['method']} {row['scheme']}: wiki {row['ppl']:.2f}, python-docs {row.get('ppl_pydocs')}, "
          f"{row['quant_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
