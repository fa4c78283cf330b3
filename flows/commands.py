"""Stand-alone commands (`ptq quantize`, `ptq eval`): thin glue over tasks/ and quantlib.

Every argument is validated and every input located before any model is loaded or quantized. Methods
arrive as typed configs (flows/methods.py parses the names).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quantlib.actquant import attach, calibrate_static, parse_activations, scales_from_json
from quantlib.adapters import get_adapter
from quantlib.data import eval_windows
from quantlib.engine import BlockStats, EngineConfig, quantize_model
from quantlib.moe import fused
from quantlib.perplexity import perplexity
from quantlib.qat import QATConfig, QATStats, teacher_targets, train_qat
from quantlib.qweight import QuantizedWeight
from quantlib.recon import ReconConfig
from quantlib.spec import QuantSpec
from quantlib.windows import reconstruct_model
from tasks.io import atomic_save_safetensors, atomic_write_json, read_manifest, write_manifest
from tasks.sources import materialize_model, parse_model_source
from tasks.inputs import calibration_ids, evaluation_ids
from tasks.textdata import calibration_parts, read_offdomain, tokenize_text

from .methods import BlockConfig

__all__ = [
    "ProtocolData",
    "cache_dir",
    "cached_model",
    "protocol_data",
    "quantize_loaded",
    "save_quantized",
    "eval_ppl",
    "spec_dict",
    "qat_teacher",
    "refine_qat",
]


def cache_dir() -> Path:
    """Where materialized models live between commands: $PTQ_CACHE or ~/.cache/ptq-pipeline."""
    return Path(os.environ.get("PTQ_CACHE", Path.home() / ".cache" / "ptq-pipeline"))


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:120]


def cached_model(spec: str, trust_remote_code: bool = False) -> Path:
    """A verified local HF folder for any model source; a local HF folder is used in place."""
    source = parse_model_source(spec)  # validates the spec and that local paths exist
    if source.kind == "local":
        return Path(source.path)
    folder = cache_dir() / "models" / _slug(spec)
    try:
        read_manifest(folder)
        return folder
    except (FileNotFoundError, ValueError):
        materialize_model(source, folder, trust_remote_code=trust_remote_code)
        return folder


def qat_teacher(model, calib: torch.Tensor, cfg: QATConfig | None) -> dict | None:
    """The FP model's top-k next-token log-probs on calib: call before quantizing (None if unused)."""
    if cfg is None or not cfg.needs_teacher:
        return None
    return teacher_targets(model, calib, cfg.topk)


def refine_qat(model, calib: torch.Tensor, results: dict[str, QuantizedWeight], cfg: QATConfig,
               teacher: dict | None) -> tuple[dict[str, QuantizedWeight], QATStats]:
    """Global QAT on a quantized model (in place); returns (results, QATStats)."""
    bar = tqdm(total=cfg.steps, desc="qat", unit="step", leave=False)

    def on_step(step: int, loss: float, held: float | None) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3g}", **({"heldout": f"{held:.3g}"} if held is not None else {}))

    try:
        return train_qat(model, results, calib, cfg, teacher, on_step=on_step)
    finally:
        bar.close()


@dataclass(frozen=True)
class ProtocolData:
    """Calibration (n, seqlen) and evaluation windows (W, window) from the docs/protocol.md protocol."""

    calib: torch.Tensor
    windows: torch.Tensor


def protocol_data(tokenizer, calib_spec: str, eval_spec: str | None, *, n: int = 128, seqlen: int = 512,
                  seed: int = 0, window: int = 1024, n_windows: int | None = 16,
                  mirror: str | None = None) -> ProtocolData:
    """Tokenize whole texts (no BOS); calibration from the first half of the calibration text (equal
    shares of each source of an "a+b" spec), evaluation windows from the second half of the eval text
    (the calibration text's when eval_spec is None)."""
    if eval_spec is None and len(calibration_parts(calib_spec)) > 1:
        raise ValueError(f"calibration {calib_spec!r} joins several texts: name the evaluation text")
    calib, _ = calibration_ids(calib_spec, tokenizer, mirror, n, seqlen, seed)
    rest = evaluation_ids(eval_spec or calib_spec, tokenizer, mirror)
    return ProtocolData(calib, eval_windows(rest, window, n_windows))


def offdomain_windows(tokenizer, mirror: str | None = None, window: int = 1024,
                      n_windows: int | None = 16) -> torch.Tensor | None:
    """docs/protocol.md's off-domain windows (the Python docs, from the start of the text; nothing is
    drawn from it), or None when the data mirror does not hold the file."""
    text = read_offdomain(mirror)
    return None if text is None else eval_windows(tokenize_text(text, tokenizer), window, n_windows)


def _block_bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="block", leave=False)

    def on_block(st: BlockStats) -> None:
        bar.update(1)
        if st.layer_errors:
            bar.set_postfix(err=f"{max(st.layer_errors.values()):.2e}")
        if bar.n == total:
            bar.close()

    return on_block


def quantize_loaded(model, calib: torch.Tensor, spec: QuantSpec, method_cfg: BlockConfig,
                    engine: EngineConfig) -> tuple[dict[str, QuantizedWeight], list, float]:
    """Quantize a loaded model in place with a typed method config; returns (results, stats, seconds)."""
    adapter = get_adapter(model)
    t0 = time.perf_counter()
    if isinstance(method_cfg, ReconConfig):
        windows = method_cfg.windows(len(adapter.blocks))
        bar = tqdm(total=len(windows), desc="reconstruct", unit="window", leave=False)
        results, stats = reconstruct_model(adapter, calib, spec, method_cfg, engine,
                                           on_window=lambda st: (bar.update(1), bar.set_postfix(
                                               loss=f"{st.loss_init:.3g}->{st.loss_final:.3g}")))
        bar.close()
    else:
        results, stats = quantize_model(adapter, calib, spec, method_cfg, engine,
                                        on_block=_block_bar(len(adapter.blocks), type(method_cfg).__name__))
    return results, stats, time.perf_counter() - t0


def quantize_activations(model, results: dict[str, QuantizedWeight], activations: str | None,
                         calib: torch.Tensor | None = None, scales: dict | None = None, batch_size: int = 8) -> None:
    """Quantize the inputs of every quantized module from now on (quantlib.actquant: `a8`, `a4`, the
    static `a8s`, `a4s`, or None for weight-only). Static scales come from `scales` ({name: float},
    as quantization.json records them) or are calibrated now on `calib` (N, T) ids, in batches."""
    spec = parse_activations(activations)
    if spec is None:
        return
    names = sorted(results)
    if spec.static and scales is not None:
        scales = scales_from_json(scales)
    elif spec.static:
        if calib is None:
            raise ValueError(f"static activations ({spec.name}) are calibrated on the calibration ids; none given")
        scales = calibrate_static(model, names, calib.split(batch_size), spec)
    attach(model, names, spec, scales)


def save_quantized(out_dir: Path, model, tokenizer, results: dict[str, QuantizedWeight], info: dict) -> None:
    """DIR: the dense (dequantized) model as an HF folder, quantized.safetensors with integers +
    scales + zeros + g_idx for every quantized Linear, quantization.json, MANIFEST.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with fused(model):  # a mixture-of-experts model is saved in transformers' own layout
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tensors = {k: v for name, qw in results.items() for k, v in qw.state_dict(name).items()}
    info = dict(info, quantized_sha256=atomic_save_safetensors(out_dir / "quantized.safetensors", tensors))
    atomic_write_json(out_dir / "quantization.json", info)
    write_manifest(out_dir)


def eval_ppl(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity", score_from: int = 0) -> float:
    """Perplexity with a progress bar; score_from > 0 scores only the tokens after that context."""
    with tqdm(total=windows.shape[0], desc=desc, unit="win", leave=False) as bar:
        return perplexity(model, windows, batch_size=batch_size, score_from=score_from, progress=bar.update)


def spec_dict(spec: QuantSpec) -> dict:
    return asdict(spec) | {"name": spec.name}


