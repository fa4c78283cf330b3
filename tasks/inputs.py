"""Prefect tasks of the fetch_model and prepare_data stages. Both build into the project cache
(content-addressed) and the flow publishes the result into the stage's DVC out."""
from __future__ import annotations

import re
from pathlib import Path

from prefect import task

from quantlib.data import calibration_starts, eval_windows, sample_calibration, split_halves

from .cache import key_fn, stable_hash
from .io import atomic_write_json, read_manifest, sha256_bytes, sha256_file
from .sources import load_tokenizer, materialize_model
from .fingerprints import source_fingerprint, text_fingerprint
from .specs import parse_model_source
from .textdata import load_text, parse_text_source, resolve_mirror, tokenize_text, write_token_ids

__all__ = ["source_fingerprint", "text_fingerprint", "fetch_model_task", "prepare_data_task", "manifest_sha", "source_name"]


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
    ids = tokenize_text(load_text(parse_text_source(settings["calib_source"]), mirror), tok)
    pool = split_halves(ids)[0] if settings["calib_split"] == "first_half" else ids
    n, seqlen, seed = settings["n_samples"], settings["seqlen"], settings["seed"]
    calib = sample_calibration(pool, n, seqlen, seed)
    record = {"calib": {"file": "calib.safetensors", "source": settings["calib_source"], "n": n, "seqlen": seqlen,
                        "seed": seed, "starts": calibration_starts(len(pool), n, seqlen, seed).tolist(),
                        "sha256": write_token_ids(out / "calib.safetensors", {"calib": calib})},
              "eval": {}}
    for spec in settings["eval_sources"]:
        ids = tokenize_text(load_text(parse_text_source(spec), mirror), tok)
        ids = split_halves(ids)[1] if settings["eval_split"] == "second_half" else ids
        windows = eval_windows(ids, settings["eval_window"], settings["eval_windows"])
        name = source_name(spec)
        record["eval"][spec] = {"file": f"eval_{name}.safetensors", "windows": list(windows.shape),
                                "sha256": write_token_ids(out / f"eval_{name}.safetensors", {"windows": windows})}
    atomic_write_json(out / "tokens.json", record)
    return {"path": str(out), "tokens": record}
