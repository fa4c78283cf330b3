"""Peak host memory of `ptq eval` on a large vocabulary, before and after a code change.

The model is a random Gemma3 text config of tiny width (hidden 64, 2 layers) with Gemma3's full
262,144-token vocabulary and tied embeddings, so the logits dominate memory as they do on a real
Gemma3-270M. Its tokenizer is the default model's (SmolLM2, 49,152 ids, all inside the vocabulary):
the text is scored the same way and the head still produces 262,144 logits per position. Each code
version is exported with `git archive` into its own folder and runs the same
`ptq eval` (16 windows x 1024 tokens, batch 4) as a subprocess; peak RSS from wait4.

    python -m flows.bench_vocab --before fd67e81      # appends to docs/benchmarks/vocab.json, writes vocab.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["build_model", "run_vocab", "render_vocab_md"]

DEFAULT_OUT = "docs/benchmarks/vocab.json"
VOCAB = 262_144
EVAL = ("--windows", "16", "--window", "1024", "--batch-size", "4")


def build_model(folder: Path) -> Path:
    """The tiny-width, full-vocabulary Gemma3 text model (seed 0) with the default model's tokenizer."""
    import torch
    import transformers as T

    from .commands import cached_model

    config = T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=512,
                                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(cached_model("smollm2-135m")).save_pretrained(folder)
    return folder


def _measure(code: Path, model: Path) -> dict:
    """`ptq eval` of `model` with the code in `code`: {seconds, peak_rss_mib, ppl}."""
    argv = [sys.executable, "-m", "flows.cli", "eval", "--model", str(model), *EVAL]
    env = {**os.environ, "PYTHONPATH": str(code)}
    log = code / "eval.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=code, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss (KiB) of the eval process
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"ptq eval failed with the code in {code}:\n{text[-4000:]}")
    ppl = float(text.strip().splitlines()[-1].split()[-1])  # print_table's last row, last column
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), "ppl": ppl}


def _export(ref: str, folder: Path) -> Path:
    """The tracked files of commit `ref` in `folder` (git archive: no worktree bookkeeping)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_vocab(before: str, after: str = "HEAD", out: str = DEFAULT_OUT) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptq-bench-vocab-") as tmp:
        model = build_model(Path(tmp) / "gemma3-tiny-262k")
        for label, ref in (("before", before), ("after", after)):
            commit = subprocess.run(["git", "rev-parse", "--short", ref], check=True, capture_output=True,
                                    text=True).stdout.strip()
            code = _export(commit, Path(tmp) / label)
            rows.append({"code": label, "commit": commit, **_measure(code, model)})
    record = {"command": f"python -m flows.bench_vocab --before {before}", "eval": list(EVAL),
              "date": dt.date.today().isoformat(), "rows": rows}
    path = Path(out)
    records = (json.loads(path.read_text()) if path.is_file() else []) + [record]
    path.write_text(json.dumps(records, indent=1) + "\n")
    path.with_suffix(".md").write_text(render_vocab_md(records))
    return rows


def render_vocab_md(records: list[dict]) -> str:
    lines = ["# Large vocabularies: peak memory of `ptq eval`", "",
             f"A random Gemma3 text model of tiny width (hidden 64, 2 layers) with the full {VOCAB:,}-token",
             "vocabulary, scored by `ptq eval` on 16 windows of 1024 tokens in batches of 4 on this 2-core CPU,",
             "with the code of two commits. Before: the LM head ran on whole windows, (4, 1023, 262144) fp32",
             "logits = 4.3 GB per batch. After: it runs on chunks of positions (quantlib/logits.py, 64 MB of",
             "logits at a time). Wall times are indicative only (taken while other jobs shared the CPU); the",
             "random model's perplexity is printed to 3 significant digits. Made by `python -m flows.bench_vocab`",
             "(docs/benchmarks/vocab.json).", ""]
    for rec in records:
        lines += [f"{rec['date']}:", "", "| code | commit | peak RSS MiB | wall s | ppl |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['code']} | {r['commit']} | {r['peak_rss_mib']} | {r['seconds']:.0f} | {r['ppl']:.2f} |"
                  for r in rec["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="commit with the code to compare against")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    for row in run_vocab(args.before, args.after, args.out):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
