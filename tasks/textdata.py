"""Text sources for calibration and evaluation: parse a spec, read the text, tokenize, store ids.

A spec is one of
  wikitext2                          WikiText-2 raw test split (offline mirror file if present, else Hub)
  python-docs                        the Python 3.11 docs sources of the offline mirror: evaluation reads
                                     their first 200,000 characters (docs/protocol.md's off-domain text),
                                     calibration the rest, so the two never overlap
  c4                                 allenai/c4, first `en` validation shard (Hub, online only)
  hf:NAME[:CONFIG][@SPLIT][#COLUMN]  any Hub dataset with a text column (split "train", column "text")
  PATH.txt | PATH.raw                a local UTF-8 text file
  PATH.jsonl | PATH.parquet[#COL]    a local table; column "text" unless #COL is given
A calibration spec may join several with "+" (wikitext2+python-docs): equal shares of the sequences.
The offline mirror folder is an explicit argument or the PTQ_DATA_MIRROR environment variable.
The protocol arithmetic on the token ids (split, sampling, windows) lives in quantlib.data.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    import torch

from .io import IntegrityError, atomic_save_safetensors, load_safetensors_verified, sha256_file

__all__ = [
    "MIRROR_ENV",
    "WIKITEXT2_MIRROR_FILE",
    "PYDOCS_MIRROR_FILE",
    "read_offdomain",
    "calibration_parts",
    "parse_calibration_source",
    "calibration_text",
    "evaluation_text",
    "halved_for_evaluation",
    "WIKITEXT2_SHA256",
    "TextSource",
    "parse_text_source",
    "resolve_mirror",
    "load_text",
    "tokenize_text",
    "write_token_ids",
    "read_token_ids",
]

MIRROR_ENV = "PTQ_DATA_MIRROR"
WIKITEXT2_MIRROR_FILE = "wikitext-2-raw/wiki.test.raw"
# From the mirror's README: the benchmark protocol is defined on exactly these bytes.
WIKITEXT2_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
# the off-domain text of docs/protocol.md: Python 3.11 documentation sources, its first 200,000 characters
PYDOCS_MIRROR_FILE = "python-docs/python-3.11-docs.txt"
PYDOCS_SHA256 = "c6711c9dc2c3a880103d5245ecf3542698aa48811d63e7b4cefb57715d34311b"
PYDOCS_CHARS = 200_000
_C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"

TextKind = Literal["wikitext2", "python-docs", "c4", "hf", "file"]
_PLAIN_SUFFIXES = (".txt", ".raw")
_TABLE_SUFFIXES = (".jsonl", ".parquet")
_ACCEPTED = (
    "accepted text sources: wikitext2; python-docs; c4; hf:NAME[:CONFIG][@SPLIT][#COLUMN]; a local .txt or .raw "
    "file; a local .jsonl or .parquet file, optionally with #COLUMN (default column 'text')"
)
_HF_SPEC = re.compile(r"^hf:(?P<name>[^:@#\s]+)(?::(?P<config>[^@#]+))?(?:@(?P<split>[^#]+))?(?:#(?P<column>.+))?$")


@dataclass(frozen=True)
class TextSource:
    """A parsed text spec. hf: `name`, `config`, `split`, `column`; file: `path` (+ `column` for tables)."""

    kind: TextKind
    spec: str
    name: str | None = None
    config: str | None = None
    split: str | None = None
    column: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("wikitext2", "python-docs", "c4", "hf", "file"):
            raise ValueError(f"TextSource.kind must be wikitext2, python-docs, c4, hf or file, got {self.kind!r}")
        if (self.kind == "hf" and not self.name) or (self.kind == "file" and self.path is None):
            raise ValueError(f"TextSource(kind={self.kind!r}) is missing its {'name' if self.kind == 'hf' else 'path'}")


def _parse_file(spec: str) -> TextSource:
    raw, _, column = spec.partition("#")
    path = Path(raw).expanduser().resolve()
    suffix = path.suffix.lower()
    if suffix not in _PLAIN_SUFFIXES + _TABLE_SUFFIXES:
        raise ValueError(f"unknown text source {spec!r}; {_ACCEPTED}")
    if column and suffix in _PLAIN_SUFFIXES:
        raise ValueError(f"text source {spec!r}: #COLUMN only applies to .jsonl and .parquet files")
    if not path.is_file():
        raise FileNotFoundError(f"text source {spec!r}: file not found ({path})")
    table_column = (column or "text") if suffix in _TABLE_SUFFIXES else None
    return TextSource(kind="file", spec=spec, path=path, column=table_column)


def parse_text_source(spec: str) -> TextSource:
    """Parse a text spec string (see module docstring) into a TextSource."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"text source must be a non-empty string, got {spec!r}; {_ACCEPTED}")
    spec = spec.strip()
    if spec in ("wikitext2", "python-docs", "c4"):
        return TextSource(kind=spec, spec=spec)
    if spec.startswith("hf:"):
        m = _HF_SPEC.match(spec)
        if not m:
            raise ValueError(f"bad Hub text source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT][#COLUMN]")
        return TextSource(
            kind="hf", spec=spec, name=m["name"], config=m["config"],
            split=m["split"] or "train", column=m["column"] or "text",
        )
    return _parse_file(spec)


def resolve_mirror(mirror: str | os.PathLike | None = None) -> Path | None:
    """The offline data mirror: the explicit argument, else $PTQ_DATA_MIRROR, else None."""
    if mirror is not None:
        return Path(mirror)
    env = os.environ.get(MIRROR_ENV)
    return Path(env) if env else None


# ------------------------------------------------------------------------------------ reading


def _join_rows(rows: list[Any], column: str, where: str) -> str:
    bad = next((r for r in rows if not isinstance(r, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: column {column!r} holds non-text values such as {bad!r}")
    return "\n\n".join(rows)


def _dataset_text(dataset: Any, column: str, where: str) -> str:
    if column not in dataset.column_names:
        raise ValueError(f"{where}: no column {column!r}; columns are {dataset.column_names} (pick one with #COLUMN)")
    return _join_rows(dataset[column], column, where)


def _read_plain(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e}); re-encode it as UTF-8") from e


def _read_file(source: TextSource) -> str:
    if source.path.suffix.lower() in _PLAIN_SUFFIXES:
        return _read_plain(source.path)
    import datasets  # heavy import, only for tables

    builder = "json" if source.path.suffix.lower() == ".jsonl" else "parquet"
    table = datasets.load_dataset(builder, data_files=str(source.path), split="train")
    return _dataset_text(table, source.column, str(source.path))


def _read_hub(name: str, config: str | None, split: str, column: str, where: str, **kw: Any) -> str:
    import datasets

    try:
        table = datasets.load_dataset(name, config, split=split, **kw)
    except Exception as e:  # offline, missing split, unknown dataset: all surface here
        raise RuntimeError(
            f"text source {where!r}: could not load Hub dataset {name} ({config}, split {split}): {e}; "
            f"this needs network access (or a populated HF cache), or use a local file instead"
        ) from e
    return _dataset_text(table, column, where)


def _read_wikitext2(mirror: Path | None) -> str:
    if mirror is not None and (mirror / WIKITEXT2_MIRROR_FILE).is_file():
        path = mirror / WIKITEXT2_MIRROR_FILE
        actual = sha256_file(path)
        if actual != WIKITEXT2_SHA256:
            raise IntegrityError(f"{path}: sha256 mismatch, expected {WIKITEXT2_SHA256}, actual {actual}")
        return _read_plain(path)
    looked = f"{mirror / WIKITEXT2_MIRROR_FILE}" if mirror is not None else f"no mirror (${MIRROR_ENV} unset)"
    return _read_hub("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", f"wikitext2 [{looked}]")


def _read_pydocs(mirror: Path | None) -> str:
    """The whole Python docs file of the mirror (sha256-checked)."""
    if mirror is None or not (mirror / PYDOCS_MIRROR_FILE).is_file():
        where = mirror / PYDOCS_MIRROR_FILE if mirror is not None else f"no mirror (${MIRROR_ENV} unset)"
        raise FileNotFoundError(f"text source 'python-docs' is read from the offline data mirror, not found: {where}; "
                                f"set {MIRROR_ENV} (or prepare_data.mirror) to the folder that holds {PYDOCS_MIRROR_FILE}")
    path = mirror / PYDOCS_MIRROR_FILE
    if (actual := sha256_file(path)) != PYDOCS_SHA256:
        raise IntegrityError(f"{path}: sha256 mismatch, expected {PYDOCS_SHA256}, actual {actual}")
    return _read_plain(path)


def read_offdomain(mirror: str | os.PathLike | None = None) -> str | None:
    """docs/protocol.md's off-domain text (the first PYDOCS_CHARS characters of the Python docs), or
    None when the mirror does not hold it; a file that differs from the protocol's is refused."""
    root = resolve_mirror(mirror)
    if root is None or not (root / PYDOCS_MIRROR_FILE).is_file():
        return None
    return evaluation_text(TextSource(kind="python-docs", spec="python-docs"), _read_pydocs(root))


def calibration_parts(spec: str) -> list[str]:
    """The sources a calibration spec joins with "+" (one for a plain spec; a file whose name holds a
    "+" stays one source)."""
    if "+" not in spec or Path(spec).expanduser().is_file():
        return [spec]
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"calibration source {spec!r}: join distinct, non-empty sources with '+', e.g. "
                         "wikitext2+python-docs")
    return parts


def parse_calibration_source(spec: str) -> list[TextSource]:
    """Every source of a calibration spec, parsed (raises like parse_text_source)."""
    return [parse_text_source(part) for part in calibration_parts(spec)]


def calibration_text(source: TextSource, text: str) -> str:
    """The part of a source's text calibration may draw from: all of it, but for python-docs the text
    after the first PYDOCS_CHARS characters (those are its evaluation text)."""
    return text[PYDOCS_CHARS:] if source.kind == "python-docs" else text


def evaluation_text(source: TextSource, text: str) -> str:
    """The part of a source's text evaluation reads: all of it, but for python-docs its first
    PYDOCS_CHARS characters (the file has no "\r")."""
    return text[:PYDOCS_CHARS] if source.kind == "python-docs" else text


def halved_for_evaluation(source: TextSource) -> bool:
    """Whether eval_split second_half applies: python-docs' evaluation text is already disjoint from
    anything calibration draws, and is read from its start, as docs/protocol.md says."""
    return source.kind != "python-docs"


def _read_c4() -> str:
    return _read_hub("allenai/c4", None, "validation", "text", "c4", data_files={"validation": _C4_SHARD})


_READERS: dict[str, Callable[[TextSource, Path | None], str]] = {
    "wikitext2": lambda source, mirror: _read_wikitext2(mirror),
    "python-docs": lambda source, mirror: _read_pydocs(mirror),
    "c4": lambda source, mirror: _read_c4(),
    "hf": lambda s, mirror: _read_hub(s.name, s.config, s.split, s.column, s.spec),
    "file": lambda source, mirror: _read_file(source),
}


def load_text(source: TextSource, mirror: str | os.PathLike | None = None) -> str:
    """The source's text as one string: UTF-8, "\\r\\n" -> "\\n", multi-row sources joined by "\\n\\n"."""
    text = _READERS[source.kind](source, resolve_mirror(mirror)).replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"text source {source.spec!r} is empty (no non-whitespace text)")
    return text


# ---------------------------------------------------------------------------------- token ids


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenize the whole text at once, no special tokens (no BOS): (N,) int64 ids."""
    import torch

    # verbose=False: the text is far longer than model_max_length on purpose (it is windowed later).
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if not ids:
        raise ValueError("tokenize_text: the tokenizer produced no tokens; is the text empty?")
    return torch.tensor(ids, dtype=torch.long)


def write_token_ids(
    path: str | os.PathLike, ids_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Store named integer id tensors as int64 safetensors (atomic, with sidecar); return sha256."""
    import torch

    bad = [k for k, v in ids_dict.items() if not isinstance(v, torch.Tensor) or v.is_floating_point()]
    if bad:
        raise TypeError(f"write_token_ids({path}): entries {bad} are not integer tensors")
    return atomic_save_safetensors(path, {k: v.to(torch.int64) for k, v in ids_dict.items()}, metadata)


def read_token_ids(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load ids written by write_token_ids, verified against `expected_sha256` or the sidecar."""
    import torch

    tensors = load_safetensors_verified(path, expected_sha256)
    bad = [k for k, v in tensors.items() if v.dtype != torch.int64]
    if bad:
        raise ValueError(f"{path}: entries {bad} are not int64 token ids; write them with write_token_ids")
    return tensors
