"""Offline lm-eval: tasks built from local text, their YAML configs, and a runner for in-memory models.

Two task kinds need no network:
  multiple_choice  a cloze task: a context passage, its true next sentence and `choices - 1`
                   distractor sentences drawn from other articles (make_cloze_jsonl)
  rolling          loglikelihood_rolling over whole documents: word/byte perplexity, bits per byte
                   (make_text_jsonl)
Both are jsonl files read by lm-eval's `json` dataset builder through a YAML written by
write_task_yaml into a folder that run_lm_eval passes to TaskManager(include_path=...).
Built-in lm-eval task names pass through unchanged (they download their data: online only).
"""
from __future__ import annotations

import bisect
import copy
import json
import logging
import os
import random
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from .io import atomic_write_bytes, sha256_bytes

__all__ = ["TaskKind", "make_cloze_jsonl", "make_text_jsonl", "write_task_yaml", "run_lm_eval"]

TaskKind = Literal["multiple_choice", "rolling"]

_MIN_SENTENCE_WORDS = 6  # shorter "sentences" are mostly fragments (split abbreviations, captions)
_MAX_SENTENCE_WORDS = 60
_MIN_CONTEXT_WORDS = 12
_LENGTH_TOLERANCES = (0.2, 0.4, 0.8, float("inf"))  # relative char-length window for distractors

_HEADING = re.compile(r"^\s*(=\s)+.*(\s=)+\s*$")  # WikiText headings: " = Title = ", " = = Section = = "
_TOP_HEADING = re.compile(r"^\s*=\s[^=].*\s=\s*$")  # only " = Title = ": one article each
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"(]?[A-Z0-9])")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# WikiText's tokenized spacing -> plain prose; a no-op on text that is already plain.
_DETOKENIZE = (
    (re.compile(r" @([-,.])@ "), r"\1"),  # 1 @,@ 000 -> 1,000; guest @-@ starring -> guest-starring
    (re.compile(r" ([.,;:!?)\]])(?=\s|$)"), r"\1"),  # "word ." -> "word."
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r" (n't|'t|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),
)


# ----------------------------------------------------------------------------------- cloze task


def _detokenize(line: str) -> str:
    for pattern, repl in _DETOKENIZE:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _paragraphs(text: str) -> tuple[list[list[str]], list[int]]:
    """Text -> (paragraphs (non-heading lines) as lists of sentences, article index of each).

    Articles start at top-level WikiText headings; without any, each paragraph is its own article.
    """
    paragraphs, articles, article = [], [], 0
    for line in text.replace("\r\n", "\n").split("\n"):
        if _TOP_HEADING.match(line):
            article += 1
        elif line.strip() and not _HEADING.match(line):
            paragraphs.append(_SENTENCE_END.split(_detokenize(line)))
            articles.append(article)
    if article == 0:  # no headings at all
        articles = list(range(len(paragraphs)))
    return paragraphs, articles


def _usable(sentence: str) -> bool:
    return _MIN_SENTENCE_WORDS <= len(sentence.split()) <= _MAX_SENTENCE_WORDS


def _split_points(sentences: list[str]) -> list[int]:
    """Indices i where sentences[i] can be the answer and sentences[:i] is a long enough context."""
    points, words = [], 0
    for i, sentence in enumerate(sentences):
        if i > 0 and words >= _MIN_CONTEXT_WORDS and _usable(sentence):
            points.append(i)
        words += len(sentence.split())
    return points


class _DistractorPool:
    """Usable sentences with their article, sorted by character length for length-matched draws.

    Matching lengths keeps `acc` (summed log-likelihood, which favours short answers) meaningful;
    drawing from other articles keeps distractors off the gold's topic, so one answer is right.
    """

    def __init__(self, paragraphs: list[list[str]], articles: list[int]) -> None:
        rows = sorted((len(s), a, s) for sents, a in zip(paragraphs, articles) for s in sents if _usable(s))
        self._rows = rows  # (chars, article, sentence)
        self._lengths = [n for n, _, _ in rows]

    def draw(self, gold: str, article: int, k: int, rng: random.Random) -> list[str]:
        for tol in _LENGTH_TOLERANCES:
            lo = bisect.bisect_left(self._lengths, len(gold) * (1 - tol))
            hi = bisect.bisect_right(self._lengths, len(gold) * (1 + tol))
            near = list(dict.fromkeys(s for _, a, s in self._rows[lo:hi] if a != article and s != gold))
            if len(near) >= k:
                return rng.sample(near, k)
        raise ValueError(f"make_cloze_jsonl: fewer than {k} distinct distractor sentences in the text")


def _cloze_doc(
    sentences: list[str], i: int, distractors: list[str], context_words: int, rng: random.Random
) -> dict[str, Any]:
    context = " ".join(" ".join(sentences[:i]).split()[-context_words:])
    gold = rng.randrange(len(distractors) + 1)
    choices = distractors[:gold] + [sentences[i]] + distractors[gold:]
    return {"query": context, "choices": choices, "gold": gold}


def _write_jsonl(out_path: str | os.PathLike, rows: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    atomic_write_bytes(out_path, data)
    return sha256_bytes(data)


def make_cloze_jsonl(
    text: str,
    out_path: str | os.PathLike,
    n_docs: int,
    seed: int,
    context_words: int = 64,
    choices: int = 4,
) -> str:
    """Write a next-sentence multiple-choice task built from `text`; return the file's sha256.

    Each line is {"query": context, "choices": [...], "gold": index}: the context is the last
    `context_words` words of a paragraph before a sentence; the true sentence sits at a seeded
    random index among `choices - 1` length-matched sentences from other articles (other
    paragraphs when the text has no WikiText headings). At most one doc per paragraph; WikiText
    headings are skipped and its tokenized spacing undone. The same (text, n_docs, seed,
    context_words, choices) always gives the same bytes.
    """
    if n_docs < 1 or choices < 2 or context_words < 1:
        raise ValueError(
            f"make_cloze_jsonl needs n_docs >= 1, choices >= 2, context_words >= 1; "
            f"got {n_docs}, {choices}, {context_words}"
        )
    paragraphs, articles = _paragraphs(text)
    rng = random.Random(seed)
    candidates = [(p, rng.choice(pts)) for p, sents in enumerate(paragraphs) if (pts := _split_points(sents))]
    if len(candidates) < n_docs:
        raise ValueError(
            f"make_cloze_jsonl: the text has {len(candidates)} paragraphs with a usable context and "
            f"next sentence, fewer than n_docs={n_docs}; use more text or fewer docs"
        )
    pool = _DistractorPool(paragraphs, articles)
    docs = []
    for p, i in sorted(rng.sample(candidates, n_docs)):
        distractors = pool.draw(paragraphs[p][i], articles[p], choices - 1, rng)
        docs.append(_cloze_doc(paragraphs[p], i, distractors, context_words, rng))
    return _write_jsonl(out_path, docs)


# ---------------------------------------------------------------------------- rolling-ppl task


def _documents(text: str) -> list[str]:
    """Articles split at top-level WikiText headings; text without them splits at blank lines."""
    lines = text.replace("\r\n", "\n").split("\n")
    if not any(_TOP_HEADING.match(ln) for ln in lines):
        return [d.strip() for d in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if d.strip()]
    docs, current = [], []
    for ln in lines:
        if _TOP_HEADING.match(ln) and current:
            docs.append("\n".join(current))
            current = []
        current.append(ln)
    docs.append("\n".join(current))
    return [d.strip() for d in docs if d.strip()]


def make_text_jsonl(text: str, out_path: str | os.PathLike, n_docs: int | None = None) -> str:
    """Write the first `n_docs` documents of `text` (all if None) as {"text": ...} lines for the
    rolling-perplexity task; return the file's sha256. Text is kept as is (no detokenizing)."""
    docs = _documents(text)
    if not docs:
        raise ValueError("make_text_jsonl: the text holds no non-empty document")
    if n_docs is not None and not 1 <= n_docs <= len(docs):
        raise ValueError(f"make_text_jsonl: n_docs={n_docs}, but the text has {len(docs)} documents")
    return _write_jsonl(out_path, [{"text": d} for d in docs[:n_docs]])


# ------------------------------------------------------------------------------------ task YAML

_KIND_CONFIG: dict[str, dict[str, Any]] = {
    "multiple_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "choices",  # a column name: the list is read as is
        "doc_to_target": "gold",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "rolling": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    },
}


def write_task_yaml(
    task_dir: str | os.PathLike, name: str, jsonl_path: str | os.PathLike, kind: TaskKind = "multiple_choice"
) -> Path:
    """Write `task_dir/<name>.yaml`, an lm-eval task over the local jsonl; return its path.

    The jsonl path is stored absolute (lm-eval resolves data files against the working directory),
    so the YAML belongs next to the run that uses it, not in a cached artifact.
    """
    if kind not in _KIND_CONFIG:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(_KIND_CONFIG)}")
    if not _NAME.match(name):
        raise ValueError(f"task name {name!r} must be letters, digits, '_', '.', '-' (a file name)")
    jsonl = Path(jsonl_path).resolve()
    if not jsonl.is_file():
        raise FileNotFoundError(f"task {name!r}: data file {jsonl} does not exist")
    config = {
        "task": name,
        "dataset_path": "json",
        # datasets keys its cache of a local file on path + mtime only: a file rewritten within one
        # mtime tick (or restored by a checkout) would be served stale. Rebuilding costs milliseconds.
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}, "download_mode": "force_redownload"},
        "test_split": "test",
        **_KIND_CONFIG[kind],
        "metadata": {"version": 1.0},
    }
    path = Path(task_dir) / f"{name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------ running


@contextmanager
def _quiet(logger_name: str = "lm_eval", level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """A TaskManager that knows every requested task. Indexing only include_path takes ~0.1 s,
    lm-eval's ~15k built-in YAMLs ~5 s: the latter only when a task is not found locally."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.is_dir():
            raise FileNotFoundError(f"lm-eval include_path {include_path} is not a directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = (
            f"and no YAML under include_path {include_path} defines them" if include_path is not None
            else "and no include_path was given for local tasks"
        )
        raise ValueError(
            f"unknown lm-eval task(s) {missing}: not lm-eval built-ins, {where}; "
            f"write local tasks with write_task_yaml into the include_path folder"
        )
    return manager


def _flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"task": {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}} -> {"task/acc": 0.5, ...}.
    A filter other than "none" is kept as a suffix ("exact_match.strict-match"); "N/A" is dropped."""
    flat = {}
    for task, entry in results.items():
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}.{filt}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """Evaluate an in-memory HF causal LM on lm-eval tasks; return {"<task>/<metric>": value}.

    Local tasks come from YAMLs under include_path; other names are lm-eval built-ins (which
    download their data). `limit` takes the first `limit` docs of each task. The model is used
    where it lies (its device, its dtype); lm-eval calls model.eval() and tie_weights() on it and
    reseeds the global random/numpy/torch generators (fixed seeds: results are reproducible). The
    tokenizer is copied, since lm-eval sets a pad token on the one it gets. Metrics are
    "<task>/<metric>" (plus "<task>/<metric>_stderr" and "<task>/sample_len", the docs scored).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_lm_eval: no tasks given")
    include = Path(include_path) if include_path is not None else None
    with _quiet():
        manager = _task_manager(tasks, include)
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    return _flatten(out["results"])
