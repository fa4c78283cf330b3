"""Peers measured side by side with our rows, on the protocol's own tensors.

    python -m flows.bench_peer [--peer llm-compressor] [--scheme W8A8|w4g64-a8] [--smooth 0.8]
    python -m flows.bench_peer --peer autoround --scheme w3g64 [--iters 200]

llm-compressor (SmoothQuant + GPTQ) is the peer of the weight-and-activation rows
(docs/benchmarks/activations.md); AutoRound the peer of the weight-only 2- and 3-bit rows
(docs/benchmarks/quality.md). The protocol's tensors (docs/protocol.md: calibration 128 x 512 at
seed 0, the 16 wiki windows, the 16 python-docs windows) are made here, by the same code as `ptq
bench quality`'s rows, and handed to the peer's tool (flows/llmcompressor_tool.py,
flows/autoround_tool.py), which runs in the peer's own environment (`make llmcompressor-env`, `make
autoround-env`). The tool reports the digest of the token ids the peer's calibration really
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
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlib.data import ids_digest, ids_set_digest
from tasks.io import atomic_write_bytes, atomic_write_json
from tasks.sources import load_tokenizer

from . import commands as C
from .bench import CALIB, render_quality_md

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Peer:
    tool: Path  # the script the peer's interpreter runs
    venv: str  # its environment, built by `make <make>`
    env: str  # the variable that may name another interpreter
    make: str
    out: str  # where its rows go by default
    scheme: str  # --scheme's default
    smooth: float | None  # --smooth's default (SmoothQuant strength; None: the peer has none)


PEERS = {
    "llm-compressor": Peer(REPO / "flows" / "llmcompressor_tool.py", ".venv-llmcompressor", "PTQ_LLMCOMPRESSOR_PYTHON",
                           "llmcompressor-env", "docs/benchmarks/activations.json", "W8A8", 0.8),
    "autoround": Peer(REPO / "flows" / "autoround_tool.py", ".venv-autoround", "PTQ_AUTOROUND_PYTHON",
                      "autoround-env", "docs/benchmarks/quality.json", "w3g64", None),
}
AUTOROUND = dict(iters=200, batch_size=8, seed=42)  # AutoRound's own defaults
# llm-compressor preset schemes -> our scheme names (weights, then inputs). Its W4A8 preset has
# 4-bit groups of 128, a grid none of our rows uses: other schemes are given in our names instead
# (w4g64-a8, w4g64-a4, ...) and handed to llm-compressor as the config group our releases declare.
PRESETS = {"W8A8": "w8pcs-a8"}
SCHEME_FORMS = "W8A8 (llm-compressor's preset) or one of our weight-activation schemes, e.g. w4g64-a8, w4pc-a4"


def peer_quantization(scheme: str, peer: str = "llm-compressor", iters: int = AUTOROUND["iters"]) -> tuple[str, dict]:
    """(our name for the scheme, what the peer's tool is handed). AutoRound: our weight-only scheme
    (w3g64, asymmetric unless named ...s) as its bits, group_size and sym, with `iters` steps per block.
    llm-compressor, what GPTQModifier is handed: {"scheme": preset} for a preset,
    else {"config_groups": ...} holding compressed-tensors' weights and input_activations entries
    exactly as our compressed-tensors releases declare them (tasks.release_formats). Dynamic
    per-token inputs only: llm-compressor calibrates static scales its own way."""
    from quantlib.actquant import parse_activations
    from quantlib.spec import parse_scheme
    from tasks.release_formats import ct_inputs, ct_weights

    if peer == "autoround":
        return _autoround_quantization(scheme, iters)
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


def _autoround_quantization(scheme: str, iters: int) -> tuple[str, dict]:
    from quantlib.spec import parse_scheme

    try:
        spec = parse_scheme(scheme)
    except ValueError as e:
        raise ValueError(f"--scheme for autoround must be a weight-only scheme such as w3g64 or w2g64, got {scheme!r} "
                         f"({e})") from None
    if iters < 1:
        raise ValueError(f"--iters must be at least 1 (AutoRound's default: {AUTOROUND['iters']}), got {iters}")
    return spec.name, {"bits": spec.bits, "group_size": spec.group_size or -1, "sym": spec.sym,
                       **AUTOROUND, "iters": iters}


def run_peer(python: str, model: str, scheme: str, smooth: float | None, n: int, threads: int, out: Path,
             mirror: str | None = None, peer: str = "llm-compressor", iters: int = AUTOROUND["iters"]) -> dict:
    """One peer row: prepare the protocol's tensors, run the tool in the peer's interpreter, append."""
    if peer not in PEERS:
        raise ValueError(f"--peer must be one of {', '.join(PEERS)}, got {peer!r}")
    if peer == "autoround" and smooth is not None:
        raise ValueError("--smooth is llm-compressor's SmoothQuant; AutoRound is weight-only: pass --smooth -1")
    name, quantization = peer_quantization(scheme, peer, iters)
    if not Path(python).exists():
        raise FileNotFoundError(f"{python}: no such interpreter; build {peer}'s environment with "
                                f"`make {PEERS[peer].make}`")
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
        done = subprocess.run([python, str(PEERS[peer].tool), f"{tmp}/job.json", f"{tmp}/out.json"], env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{peer} run failed (exit {done.returncode}); its output is above")
        result = json.loads(Path(tmp, "out.json").read_text())
    if result["calib_seen"] != (expected := ids_set_digest(data.calib)):
        raise RuntimeError(f"{peer} calibrated on other tokens than the protocol's (digest {result['calib_seen']} "
                           f"against {expected}): its row would not be comparable; nothing was written")
    if peer == "autoround" and result["levels"] > 2 ** quantization["bits"]:
        raise RuntimeError(f"AutoRound left {result['levels']} distinct values in a weight group, more than a "
                           f"{quantization['bits']}-bit grid holds: the model it scored was not quantized; nothing was written")
    label = f"autoround-i{iters}" if peer == "autoround" else \
        "llm-compressor " + ("" if smooth is None else f"sq{smooth:g}+") + "gptq"
    recipe = {"recipe": scheme, "quantization": quantization} | (
        {"tuned_dtype": result.get("tuned_dtype")} if peer == "autoround" else {"smoothing_strength": smooth})
    row = {"method": label, "scheme": name, "ppl": result["ppl"], "ppl_pydocs": result.get("ppl_pydocs"),
           "quant_seconds": result["quant_seconds"], "peak_rss_mb": result["peak_rss_mb"],
           "settings": {"n": n, "seqlen": CALIB["seqlen"], "seed": CALIB["seed"], "calib_digest": ids_digest(data.calib),
                        "eval_digest": ids_digest(data.windows), "peer": recipe},
           "model": model, "versions": result["versions"],
           "command": "python -m flows.bench_peer " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    records = (json.loads(out.read_text()) if out.exists() else []) + [row]
    atomic_write_json(out, records)
    atomic_write_bytes(out.with_suffix(".md"), render_quality_md(records).encode())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_peer", description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=sorted(PEERS), default="llm-compressor")
    p.add_argument("--python", help="the peer's Python (default: $PTQ_LLMCOMPRESSOR_PYTHON or .venv-llmcompressor for "
                   "llm-compressor, $PTQ_AUTOROUND_PYTHON or .venv-autoround for autoround; make <peer>-env builds them)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default=None, help=f"llm-compressor: {SCHEME_FORMS} (default W8A8); autoround: a "
                   "weight-only scheme, e.g. w3g64 (default)")
    p.add_argument("--smooth", type=float, default=None, help="llm-compressor's SmoothQuant strength (default 0.8, "
                   "its W8A8 example); a negative value runs GPTQ alone")
    p.add_argument("--iters", type=int, default=AUTOROUND["iters"], help="AutoRound's steps per block (its default: 200)")
    p.add_argument("--n-samples", type=int, default=CALIB["n"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, help="default: docs/benchmarks/activations.json (llm-compressor), "
                   "docs/benchmarks/quality.json (autoround)")
    a = p.parse_args(argv)
    peer = PEERS[a.peer]
    smooth = peer.smooth if a.smooth is None else a.smooth
    python = a.python or os.environ.get(peer.env, f"{peer.venv}/bin/python")
    row = run_peer(python, a.model, a.scheme or peer.scheme, None if smooth is None or smooth < 0 else smooth,
                   a.n_samples, a.threads, a.out or Path(peer.out), os.environ.get("PTQ_DATA_MIRROR"), a.peer, a.iters)
    print(f"{row['method']} {row['scheme']}: wiki {row['ppl']:.2f}, python-docs {row.get('ppl_pydocs')}, "
          f"{row['quant_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
