"""Prefect tasks of the fetch_model and prepare_data stages. Both build into the project cache
(content-addressed) and the flow publishes the result into the stage's DVC out."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from quantlib.data import calibration_starts, eval_windows, sample_calibration, split_halves

if TYPE_CHECKING:
    import torch

from .cache import key_fn, stable_hash
from .io import atomic_write_json, read_manifest, sha256_bytes, sha256_file
from .sources import load_tokenizer, materialize_model, rotate_folder
from .fingerprints import source_fingerprint, text_fingerprint
from .specs import parse_model_source
from .textdata import (calibration_parts, calibration_text, evaluation_text, halved_for_evaluation, load_text,
                       parse_text_source, resolve_mirror, tokenize_text, write_token_ids)

__all__ = ["source_fingerprint", "text_fingerprint", "fetch_model_task", "rotate_model_task", "prepare_data_task", "manifest_sha", "source_name",
           "calibration_ids", "evaluation_ids"]


def manifest_sha(folder: str | Path) -> str:
    """Identity of a model folder: the sha256 of its MANIFEST.json (which hashes every file)."""
    read_manifest(folder)  # validates it exists and is well-formed
    return sha256_file(Path(folder) / "MANIFEST.json")


@task(name="fetch_model", cache_key_fn=key_fn("trust_remote_code", "fingerprint"), persist_result=True)
def fetch_model_task(spec: str, trust_remote_code: bool, fingerprint: str, cache_dir: str) -> dict:
    """Materialize the source (`fingerprint` = its content identity, see source_fingerprint) as a
    safetensors folder under the cache; keyed by content, not by where the source lives."""
    out = Path(cache_dir) / "models" / stable_hash([trust_remote_code, fingerprint])
    record = materialize_model(parse_model_source(spec), out, trust_remote_code=trust_remote_code)
    return record | {"path": str(out), "manifest_sha": manifest_sha(out), "fingerprint": fingerprint}


@task(name="rotate_model", cache_key_fn=key_fn("model_sha", "mode", "seed", "trust_remote_code"), persist_result=True)
def rotate_model_task(model_dir: str, model_sha: str, mode: str, seed: int, cache_dir: str,
                      trust_remote_code: bool = False) -> dict:
    """The fetched model (identified by `model_sha`) rotated (tasks.sources.rotate_folder) into the
    cache; keyed by the model's content and the rotation."""
    out = Path(cache_dir) / "models" / stable_hash(["rotated", model_sha, mode, seed, trust_remote_code])
    record = rotate_folder(model_dir, out, mode, seed, trust_remote_code=trust_remote_code)
    return {"path": str(out), "manifest_sha": manifest_sha(out), "rotation": record | {"base_model": model_sha}}


def source_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")


@task(name="prepare_data", cache_key_fn=key_fn("model_sha", "settings", "text_shas"), persist_result=True)
def prepare_data_task(model_dir: str, model_sha: str, settings: dict, text_shas: dict, mirror: str | None,
                      cache_dir: str, trust_remote_code: bool = False) -> dict:
    """Token ids per docs/protocol.md: calibration (n, seqlen) from the calibration text's first
    half (or all of it), evaluation windows from each eval text's second half (or all). `settings`
    are the prepare_data params but the mirror folder, whose texts `text_shas` identify by content."""
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    mirror = resolve_mirror(mirror)
    out = Path(cache_dir) / "tokens" / stable_hash([model_sha, settings, text_shas])
    n, seqlen, seed = settings["n_samples"], settings["seqlen"], settings["seed"]
    calib, parts = calibration_ids(settings["calib_source"], tok, mirror, n, seqlen, seed,
                                   first_half=settings["calib_split"] == "first_half")
    drawn = {"starts": parts[0]["starts"]} if len(parts) == 1 else {"parts": parts}
    record = {"calib": {"file": "calib.safetensors", "source": settings["calib_source"], "n": n, "seqlen": seqlen,
                        "seed": seed, **drawn, "sha256": write_token_ids(out / "calib.safetensors", {"calib": calib})},
              "eval": {}}
    for spec in settings["eval_sources"]:
        ids = evaluation_ids(spec, tok, mirror, second_half=settings["eval_split"] == "second_half")
        windows = eval_windows(ids, settings["eval_window"], settings["eval_windows"])
        name = source_name(spec)
        record["eval"][spec] = {"file": f"eval_{name}.safetensors", "windows": list(windows.shape),
                                "sha256": write_token_ids(out / f"eval_{name}.safetensors", {"windows": windows})}
    atomic_write_json(out / "tokens.json", record)
    return {"path": str(out), "tokens": record}


def calibration_ids(spec: str, tokenizer, mirror, n: int, seqlen: int, seed: int,
                    first_half: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """(n, seqlen) calibration ids per docs/protocol.md, and a record per source: a spec joining k
    sources with "+" draws n // k sequences (the first n % k sources one more) from each source's
    pool (the first half of its calibration text, or all of it), in the order given, with `seed`."""
    import torch

    parts = calibration_parts(spec)
    if n < len(parts):
        raise ValueError(f"n_samples {n} is fewer than the {len(parts)} calibration sources of {spec!r}")
    seqs, records = [], []
    for i, part in enumerate(parts):
        k = n // len(parts) + (i < n % len(parts))
        source = parse_text_source(part)
        ids = tokenize_text(calibration_text(source, load_text(source, mirror)), tokenizer)
        pool = split_halves(ids)[0] if first_half else ids
        if len(pool) < seqlen:
            raise ValueError(f"calibration text {part!r} has {len(pool)} tokens in its pool, fewer than "
                             f"seqlen={seqlen}; use a longer text or a smaller seqlen")
        seqs.append(sample_calibration(pool, k, seqlen, seed))
        records.append({"source": part, "n": k, "starts": calibration_starts(len(pool), k, seqlen, seed).tolist()})
    return torch.cat(seqs), records


def evaluation_ids(spec: str, tokenizer, mirror, second_half: bool = True) -> torch.Tensor:
    """(N,) token ids of an evaluation text: its second half (or all of it); python-docs' evaluation
    text is never halved (textdata.halved_for_evaluation)."""
    source = parse_text_source(spec)
    ids = tokenize_text(evaluation_text(source, load_text(source, mirror)), tokenizer)
    return split_halves(ids)[1] if second_half and halved_for_evaluation(source) else ids
