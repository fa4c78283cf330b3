"""The `ptq` command line. Parses arguments into frozen configs and hands them to flows/commands."""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import sysconfig
import traceback
from pathlib import Path

from .lock import ProjectLocked

__all__ = ["main"]


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _add_scheme(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, help="2..8")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--group-size", type=int, default=None, help="input columns per (scale, zero) group")
    g.add_argument("--per-channel", action="store_true", help="one (scale, zero) per output channel (default)")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (zero fixed at mid-range)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wikitext2", help="text source: wikitext2, python-docs, c4, hf:NAME, or a "
                   ".txt/.jsonl/.parquet file; join several with + for equal shares (wikitext2+python-docs)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mirror", default=None, help="offline data mirror folder (default $PTQ_DATA_MIRROR)")


def _add_solver(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--clip-search", action="store_true", help="grid-search the clipping ratio per group")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--spill-dir", default=None, help="keep calibration activations on disk here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--activations", default=None, choices=("a8", "a4", "a8s", "a4s"),
                   help="also quantize the quantized Linears' inputs: symmetric int8/int4, one dynamic scale per token "
                        "(a8, a4) or one static scale per Linear calibrated on the calibration set (a8s, a4s)")
    p.add_argument("--quantized-inputs", action="store_true",
                   help="with --activations: solve each block with its Linears' inputs quantized (Hessians from "
                        "quantized inputs, later blocks calibrated on the quantized model's activations)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant before each block is solved (alpha in [0, 1], e.g. 0.5): activation outlier "
                        "channels move into the weights through the norms")
    p.add_argument("--rotate", default=None, choices=("residual", "full"),
                   help="QuaRot rotation of the FP model before quantizing (FP outputs unchanged): residual = "
                        "folded into the weights only (any release format); full = also an online Hadamard on "
                        "down_proj's input (ptq's own loaders)")
    m = p.add_argument_group("mixed precision (quantlib.mixed): a scheme per Linear from measured sensitivity")
    m.add_argument("--mixed-from", default=None, metavar="SCHEMES",
                   help="comma-separated schemes a Linear may take, e.g. w2g128,w2g64,w3g64; the scheme given "
                        "for the run is then the size target and the LM head's scheme")
    m.add_argument("--mixed-bits", type=float, default=None,
                   help="average bits per weight, scales and zeros counted (default: the run's uniform scheme's)")
    m.add_argument("--mixed-samples", type=int, default=32, help="calibration sequences for the Fisher pass")
    r = p.add_argument_group("reconstruction (--method recon or recon-k2o1L0-lora-i100)")
    r.add_argument("--window", type=int, help="blocks per window k")
    r.add_argument("--overlap", type=int, help="blocks shared by consecutive windows o < k")
    r.add_argument("--lookahead", type=int, help="frozen FP blocks after the window the loss is measured at")
    r.add_argument("--rounding", choices=("nearest", "adaround", "lora", "signed"), help="signed: SignRound's round(W / s + z + v), v in [-1/2, 1/2]")
    r.add_argument("--rank", type=int, help="LoRA-Rounding rank")
    r.add_argument("--iters", type=int)
    r.add_argument("--loss", choices=("mse", "kl", "mse+kl"))
    r.add_argument("--lr", type=float, help="rounding learning rate")
    r.add_argument("--optimizer", choices=("adam", "sign"), help="adam, or sign (SignRound: p -= lr sign(grad); "
                   "with --schedule linear and --lr about 1 / iters)")
    r.add_argument("--schedule", choices=("cosine", "linear", "constant"), help="the windows' learning-rate shape (default cosine)")
    r.add_argument("--clip-lr", type=float, help="clipping (learned grid) or dequantization-scale (frozen grid) rate")
    r.add_argument("--recon-init", dest="init", choices=("rtn", "gptq", "boa"))
    r.add_argument("--grid", choices=("auto", "init", "learned"),
                   help="init: codes stay on the initializer's grid (auto for gptq/boa); learned: LWC clipping")
    r.add_argument("--cfp", action="store_true", default=None, help="CBQ outlier pre-processing before each block")
    r.add_argument("--heldout", type=float, help="share of calibration batches a window never trains on; its guard "
                   "judges on them (default 0: on the training batches)")
    r.add_argument("--eval-every", type=int, help="early stopping: held-out loss every N iterations, best state kept")
    r.add_argument("--patience", type=int, help="stop a window after this many evaluations without improvement")
    r.add_argument("--amp", choices=("auto", "bf16", "fp32"), help="the windows' training arithmetic: auto "
                   "(bf16 autocast on CUDA and on a CPU with AMX or AVX512-BF16), bf16 or fp32")
    t = p.add_argument_group("global QAT refinement (method names ending in +qat, e.g. gptq+qat)")
    t.add_argument("--qat-trainable", choices=("scales", "scales+zeros", "weights"))
    t.add_argument("--qat-loss", choices=("ce", "kl", "ce+kl"))
    t.add_argument("--qat-steps", type=int)
    t.add_argument("--qat-lr", type=float)
    t.add_argument("--qat-batch-size", type=int)
    t.add_argument("--qat-heldout", type=float, help="fraction of calibration sequences held out for early stopping")
    t.add_argument("--qat-patience", type=int, help="stop QAT after this many held-out evaluations without "
                   "improvement (0: run every step; the best state is kept either way)")
    t.add_argument("--qat-topk", type=int, help="teacher logits cached as top-k (0 = full)")
    t.add_argument("--qat-amp", choices=("auto", "bf16", "fp32"), help="QAT's training arithmetic, as --amp")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptq", description="Post-training weight quantization of causal LMs")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model with one method and write it to --out")
    q.add_argument("--model", default="smollm2-135m", help="smollm2-135m, hf:ORG/NAME[@REV], a local HF folder or a .gguf file")
    q.add_argument("--method", default="gptq", help="rtn, gptq, boa, recon (or recon-k2o1L0-lora-i100 style names; "
                   "grammar in flows/methods.py); +qat or +qat128 appends global QAT (128 steps)")
    _add_scheme(q)
    _add_calib(q)
    _add_solver(q)
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--eval", action="store_true", help="print fp32 and quantized perplexity afterwards")
    q.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser("eval", help="perplexity of a model or a release folder on a text source")
    e.add_argument("--model", required=True, help="as for quantize, or a release folder (ptq run's data/release: "
                   "loaded as its format says, activation quantization included)")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; a W4 release in bfloat16 on CPU runs torch's int4 kernel")
    e.add_argument("--data", default="wikitext2")
    e.add_argument("--split", choices=("second_half", "all"), default="second_half")
    e.add_argument("--window", type=int, default=1024)
    e.add_argument("--windows", type=int, default=16, help="number of windows (0 = all)")
    e.add_argument("--stride", type=int, default=None, help="window stride; < window scores only the last stride tokens")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--mirror", default=None)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bq = bsub.add_parser("quality", help="docs/protocol.md quality protocol; appends to docs/benchmarks/quality.json")
    bq.add_argument("--model", default="smollm2-135m")
    bq.add_argument("--methods", default="rtn,gptq", help="comma-separated method names, as for quantize --method")
    bq.add_argument("--schemes", default="w4pc,w3g64,w2g64", help="comma-separated schemes (protocol: w4pc, w3g64, w2g64)")
    bq.add_argument("--out", default="docs/benchmarks/quality.json")
    bq.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip the fp32 reference row")
    bq.add_argument("--n-samples", type=int, default=128, help="calibration sequences (protocol: 128)")
    bq.add_argument("--seqlen", type=int, default=512, help="calibration sequence length (protocol: 512)")
    bq.add_argument("--calib", default="wikitext2", help="calibration text (protocol: wikitext2); join several "
                    "with + for equal shares, e.g. wikitext2+python-docs (rows are evaluated on both texts anyway)")
    bq.add_argument("--seed", type=int, default=0, help="calibration draw (protocol: 0); rows at several seeds "
                    "are also shown as mean ± std")
    _add_solver(bq)
    bq.add_argument("--mirror", default=None)

    r = sub.add_parser("run", help="run every stage DVC reports changed (inputs ... register), in process; "
                       "-S values are written into params.yaml")
    r.add_argument("-p", "--params", default="params.yaml")
    r.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    r.add_argument("--to", default=None, metavar="STAGE", help="stop after this stage (e.g. --to pack)")
    r.add_argument("--no-wait", action="store_true",
                   help="fail at once if another ptq run/stage holds the project lock (default: wait for it)")

    st = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    st.add_argument("name")
    st.add_argument("-p", "--params", default="params.yaml")
    st.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    st.add_argument("--no-wait", action="store_true", help="fail at once if the project lock is held")

    sw = sub.add_parser("sweep", help="run a grid of configs (methods x schemes x seeds x ...) as parallel pipeline "
                        "tasks on the orchestration runner; results in sweeps/NAME/ and one MLflow sweep run")
    sw.add_argument("-p", "--params", default="params.yaml", help="the base params every config starts from")
    sw.add_argument("--grid", default=None, metavar="FILE", help="YAML {section.key | scheme: [values]}")
    sw.add_argument("-S", "--set", dest="axes", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid axis, e.g. -S quantize.method=rtn,gptq -S scheme=w4pc,w3g64")
    sw.add_argument("--name", default="sweep", help="results go to sweeps/NAME/ (default: sweep)")
    sw.add_argument("--no-wait", action="store_true", help="fail at once if the project lock is held")
    sw.set_defaults(overrides=[])

    li = sub.add_parser("lineage", help="print and verify the lineage of a release against its own record")
    li.add_argument("ref", help="a release folder, models:/NAME/VERSION or models:/NAME@ALIAS")
    li.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    li.add_argument("--project", default=".", help="project root (its mlflow.db; with --workspace, its data/)")
    li.add_argument("--workspace", action="store_true",
                    help="also check the project's data/ and the running code against the release's record")
    li.add_argument("--rebuild", action="store_true",
                    help="re-run the recorded pipeline in a temporary project and compare the release byte for byte")

    bk = bsub.add_parser("kernels", help="packed matmul vs fp16 matmul per layer shape; appends to docs/benchmarks/kernels.json")
    bk.add_argument("--out", default="docs/benchmarks/kernels.json")
    bk.add_argument("--w8a8", action="store_true", help="the W8A8 int8 Linear (int8 Triton kernel on CUDA) instead of W4 g128")
    bd = bsub.add_parser("decode", help="release size and decode tokens/s, packed vs dense")
    bd.add_argument("--out", default="docs/benchmarks/kernels.json")
    bd.add_argument("--model", default="smollm2-135m")
    bd.add_argument("--scheme", default="w4g64")
    bd.add_argument("--new-tokens", type=int, default=None)

    bo = bsub.add_parser("orchestration", help="full, no-op `ptq run` and no-op `dvc repro` of the default pipeline in a "
                                                "fresh clone; appends to docs/benchmarks/orchestration.json")
    bo.add_argument("--out", default="docs/benchmarks/orchestration.json")
    bo.add_argument("--keep", default=None, metavar="DIR", help="build the clone here and keep it (default: a temp dir)")

    sub.add_parser("demo", help="quantize the default model (GPTQ W4 g64) and compare fp32 / RTN / GPTQ")
    return ap


EXIT_LOCKED = 75  # EX_TEMPFAIL: another ptq process holds the project; retrying later succeeds
EXIT_STORAGE = 74  # EX_IOERR: a full or read-only filesystem; rerunning once it is fixed resumes
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    args = _parser().parse_args(argv)
    try:
        if args.command in ("run", "stage", "lineage", "sweep"):
            from . import cli_pipeline  # imports what a stage needs, when it needs it

            return cli_pipeline.dispatch(args)
        from . import cli_impl  # heavy imports (torch, transformers) only after argument parsing

        return cli_impl.dispatch(args)
    except ProjectLocked as e:
        print(f"ptq {args.command}: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, RuntimeError) as e:
        if not _raised_here(e):  # e.g. torch's RuntimeError: its traceback is the diagnosis
            traceback.print_exception(e, file=sys.stderr)
        print(f"ptq {args.command}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _FULL + _READ_ONLY:
            raise
        print(f"ptq {args.command}: error: {storage_advice(e)}", file=sys.stderr)
        return EXIT_STORAGE


def storage_advice(e: OSError) -> str:
    """What a full or read-only filesystem means for the user: the file, the fix, what is kept."""
    where = Path(e.filename).parent if e.filename else Path.cwd()
    fix = (f"free space there (df -h {where}), or move the storage root (orchestration.storage) or the project "
           "to a larger filesystem" if e.errno in _FULL else f"make {where} writable, or run in a writable copy "
           "of the project")
    return (f"{e.strerror} writing {e.filename or 'a file'}: {fix}; then rerun the same command: finished stages "
            "and blocks are kept and are not recomputed")


_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / p) + os.sep for p in ("quantlib", "tasks", "flows"))


def _raised_here(e: BaseException) -> bool:
    """True if the project's own code raised `e` (its message names the problem and the fix); False
    if a library did (torch, transformers, ...), deep in a stack the one-line message would hide.
    Standard-library frames (pathlib's open under our read_text) do not count."""
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep
    files = [str(Path(f.f_code.co_filename).resolve()) for f, _ in traceback.walk_tb(e.__traceback__)
             if not f.f_code.co_filename.startswith("<")]
    files = [f for f in files if not f.startswith(stdlib)]
    return bool(files) and files[-1].startswith(_PACKAGES)


if __name__ == "__main__":
    sys.exit(main())
