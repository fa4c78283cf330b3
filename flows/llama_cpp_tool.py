"""llama.cpp itself, for the GGUF benchmark: run by an interpreter that has `llama-cpp-python`
(built from source: `make llama-cpp-env`), never imported by the project. Standard library, numpy
and llama_cpp only.

    PYTHON flows/llama_cpp_tool.py quantize IN.gguf OUT.gguf TYPE     # llama.cpp's own quantizer
    PYTHON flows/llama_cpp_tool.py score JOB.json                      # perplexity + decode tokens/s

quantize: llama.cpp's `llama_model_quantize` (what `llama-quantize` runs) with `pure` (every matrix
gets TYPE; llama.cpp substitutes its fallback type where a row is not whole blocks of the type) and
the token embedding and output kept in F16, as our releases keep them; no importance matrix.

score: JOB.json = {"files": [...], "windows": [[ids]], "prompt": [ids], "new_tokens": N, "threads": T,
"texts": [{"text": str, "ids": [ids]}]}; prints one JSON line per file: perplexity over the windows
(every position after the first, as quantlib.perplexity scores them, float64 sums), greedy batch-1
decode tokens/s after the prompt, and whether llama.cpp's tokenizer gives each text exactly `ids`.
"""
from __future__ import annotations

import json
import math
import sys
import time

import llama_cpp
import numpy as np

# ggml type names -> llama_ftype values of the `pure` quantizations used here (llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16,
          "Q6_K": 18}
GGML_TYPE_F16 = 1


def quantize(src: str, dst: str, kind: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure = FTYPES[kind], True
    params.token_embedding_type = params.output_tensor_type = GGML_TYPE_F16
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {kind}")


def _nll(llm: llama_cpp.Llama, ids: list[int]) -> tuple[float, int]:
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, vocab): position t predicts t+1
    top = logits.max(-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum()), len(ids) - 1


def _decode_tokens_per_s(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens):  # greedy, one token at a time, never stopping at EOS
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new_tokens / (time.perf_counter() - start)


def score(job_path: str) -> None:
    job = json.loads(open(job_path, encoding="utf-8").read())
    n_ctx = max(max(len(w) for w in job["windows"]), len(job["prompt"]) + job["new_tokens"]) + 8
    for path in job["files"]:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                              n_threads=job["threads"], verbose=False)
        total, count = 0.0, 0
        for ids in job["windows"]:
            nll, n = _nll(llm, ids)
            total, count = total + nll, count + n
        tps = _decode_tokens_per_s(llm, job["prompt"], job["new_tokens"])
        same = all(llm.tokenize(t["text"].encode(), add_bos=False, special=False) == t["ids"] for t in job.get("texts", []))
        print(json.dumps({"file": path, "ppl": math.exp(total / count), "decode_tokens_per_s": tps,
                          "tokenization_identical": same}), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["quantize"] and len(argv) == 4:
        quantize(*argv[1:])
    elif argv[:1] == ["score"] and len(argv) == 2:
        score(argv[1])
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
