"""The release's model card (README.md in the Hugging Face model-card format), generated at pack.

Everything in it comes from what made the release: the source record (source.json), the params of
every stage, the quantize/QAT record (quantize.json), the release's quantization config and the hash
chain; nothing is written by hand, and nothing varies between two builds of the same release (no
date, host or timing), so a rebuilt release is byte-identical, card included.

Perplexity is measured by the evaluate stage on the packed release, after the card is written (a
file cannot hold a score of the folder it is part of without changing it): the card holds the
quantization-time error against the FP model, and `card_with_metrics` adds the evaluate stage's
numbers for the model registry's entry.
"""
from __future__ import annotations

import statistics
from typing import Any, Mapping

import yaml

from quantlib.actquant import parse_activations

__all__ = ["render_card", "card_with_metrics"]


def render_card(*, name: str, source: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]],
                info: Mapping[str, Any], fmt: str, chain: Mapping[str, Any], code: Mapping[str, Any]) -> str:
    """README.md text. name: the release's display name; source: the model folder's source.json;
    params: {section: {key: value}} of the stages that made it; info: the QAT stage's quantize.json;
    fmt: the packed format written; chain and code: as in the release MANIFEST."""
    parts = [_front_matter(source, info, fmt), f"# {name}\n", _summary(source, info, fmt),
             _source(source, chain), _scheme(params, info, fmt), _calibration(params, chain),
             _quality(info), _reproduce(params, code), _lineage(chain, code)]
    return "\n".join(p for p in parts if p)


def card_with_metrics(card: str, metrics: Mapping[str, Any]) -> str:
    """The card plus the evaluate stage's perplexities (release vs FP model, per evaluation text)."""
    rows = [f"| {t} | {metrics['fp32_ppl'][t]:.4f} | {metrics['ppl'][t]:.4f} | {metrics['ppl'][t] / metrics['fp32_ppl'][t]:.4f} |"
            for t in sorted(metrics.get("ppl", {}))]
    if not rows:
        return card
    table = ["## Perplexity (evaluate stage, on the packed release)\n", "| text | FP model | release | ratio |",
             "|---|---:|---:|---:|", *rows, ""]
    return card + "\n" + "\n".join(table)


def _front_matter(source: Mapping[str, Any], info: Mapping[str, Any], fmt: str) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    spec = str(source.get("source", ""))
    if spec.startswith("hf:"):
        meta["base_model"] = spec.removeprefix("hf:").split("@", 1)[0]
    meta["tags"] = ["ptq-pipeline", fmt.replace("_", "-"), str(info["scheme"]), _method(info)]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _method(info: Mapping[str, Any]) -> str:
    base = str(info["method"]).removesuffix("Config").lower()
    return base + ("+qat" if info.get("qat") else "")


def _summary(source: Mapping[str, Any], info: Mapping[str, Any], fmt: str) -> str:
    rot = source.get("rotation")
    kept = ("kept from the source after an FP-exact `" + rot["mode"] + "` rotation (norm scales folded into the "
            "Linears, LM head untied from the embeddings)") if rot else "kept from the source"
    return (f"`{source.get('source')}` quantized to `{info['scheme']}` with `{_method(info)}` by ptq-pipeline, "
            f"packed as `{fmt}`; {len(info['modules'])} Linear modules are quantized, every other tensor is "
            f"{kept}.\n")


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]) + "\n"


def _source(source: Mapping[str, Any], chain: Mapping[str, Any]) -> str:
    rows = [("source", f"`{source.get('source')}`"), ("architecture", source.get("architecture")),
            ("kind", source.get("kind"))]
    rows += [(k, f"`{source[k]}`") for k in ("revision", "package", "fingerprint") if source.get(k)]
    if rot := source.get("rotation"):
        rows += [("rotation", f"`{rot['mode']}`, seed {rot['seed']} (quantlib.rotation; FP-exact, before quantization)"),
                 ("fetched model folder MANIFEST sha256", f"`{rot['base_model']}`")]
    rows += [("model folder MANIFEST sha256", f"`{chain['model']}`")]
    return "## Base model\n\n" + _table(rows)


def _scheme(params: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any], fmt: str) -> str:
    q = params.get("quantize", {})
    rows = [("method", f"`{_method(info)}` ({info['method']})"), ("scheme", f"`{info['scheme']}`"),
            ("bits", q.get("bits")), ("group size", q.get("group_size") or "per output channel"),
            ("symmetric", q.get("sym")), ("targets", ", ".join(q.get("targets", ["blocks"]))),
            ("format", f"`{fmt}`"), ("compute dtype", params.get("fetch_model", {}).get("dtype"))]
    if q.get("activations"):
        static = parse_activations(q["activations"]).static
        rows.insert(4, ("activations", f"`{q['activations']}`: symmetric int, " +
                        ("one static scale per Linear, calibrated" if static else "one dynamic scale per token")))
    if mixed := info.get("mixed"):
        split = ", ".join(f"{n} `{s}`" for s, n in sorted(mixed["linears"].items()))
        rows.insert(2, ("mixed precision", f"{split} Linears at {mixed['target_bpw']:.3f} bits per weight, chosen "
                                           f"by Fisher-estimated loss (quantlib.mixed; plan sha256 `{mixed['plan_sha256']}`)"))
    if fmt == "gguf":
        rows.insert(-1, ("GGUF type", f"`{params.get('pack', {}).get('gguf_type', 'exact')}`"))
    qat = info.get("qat")
    if qat:
        cfg = qat.get("config", {})
        rows += [("QAT", f"{qat.get('steps')} steps, loss `{cfg.get('loss')}`, "
                         f"trainable `{cfg.get('trainable')}`")]
    return "## Quantization\n\n" + _table(rows)


def _calibration(params: Mapping[str, Mapping[str, Any]], chain: Mapping[str, Any]) -> str:
    d = params.get("prepare_data", {})
    rows = [("text", f"`{d.get('calib_source')}` ({d.get('calib_split')})"),
            ("sequences", f"{d.get('n_samples')} x {d.get('seqlen')} tokens, seed {d.get('seed')}"),
            ("token ids sha256", f"`{chain['calib']}`")]
    return "## Calibration data\n\n" + _table(rows)


def _quality(info: Mapping[str, Any]) -> str:
    errs = [b["block_error"] for b in info.get("blocks", []) if b.get("block_error") is not None]
    lines = ["## Error against the FP model (calibration data)\n"]
    if errs:
        worst = max(info["blocks"], key=lambda b: b.get("block_error") or -1)
        lines.append(f"Relative output error of each decoder block, ||F_q(X) - F(X)||^2 / ||F(X)||^2 on its "
                     f"quantized-prefix inputs: mean {statistics.fmean(errs):.4g}, largest {worst['block_error']:.4g} "
                     f"(block {worst['block']}), over {len(errs)} blocks.")
    head = info.get("head")
    if head and head.get("error") is not None:
        lines.append(f"LM head: Hessian-weighted error {head['error']:.4g}.")
    qat = info.get("qat")
    if qat and qat.get("init_heldout") is not None:
        lines.append(f"QAT held-out loss: {qat['init_heldout']:.4g} before, {qat['best_heldout']:.4g} kept "
                     f"(step {qat.get('best_step')}).")
    lines.append("\nPerplexity of this release against the FP model is measured after packing: "
                 "`metrics/metrics.json` of the run that built it, and its model registry entry.")
    return "\n".join(lines) + "\n"


def _reproduce(params: Mapping[str, Mapping[str, Any]], code: Mapping[str, Any]) -> str:
    dirty = " (the checkout had uncommitted changes: the fingerprint below identifies the code)" \
        if code.get("git_dirty") else ""
    return ("## Rebuild\n\nWith ptq-pipeline at commit `" + str(code.get("git_commit")) + "`" + dirty +
            ", write these params over the checkout's params.yaml (they are also in MANIFEST.json) and run "
            "`ptq run`; `ptq lineage <release>` then compares the rebuilt release with this one.\n\n"
            "```yaml\n" + yaml.safe_dump({k: dict(v) for k, v in params.items()}, sort_keys=True) + "```\n")


def _lineage(chain: Mapping[str, Any], code: Mapping[str, Any]) -> str:
    rows = [("model", chain["model"]), ("calibration tokens", chain["calib"]),
            *((f"evaluation tokens ({k})", v) for k, v in sorted(chain.get("eval", {}).items())),
            ("block-wise codes", chain["quantized"]), ("released codes (after QAT)", chain["qat"]),
            ("code fingerprint", code.get("fingerprint"))]
    versions = ", ".join(f"{k} {v}" for k, v in sorted((code.get("versions") or {}).items()))
    return ("## Lineage\n\nsha256 of each link (MANIFEST.json holds them and every file's hash; "
            "`ptq lineage` verifies them):\n\n" + _table([(k, f"`{v}`") for k, v in rows]) +
            (f"\nLibraries: {versions}.\n" if versions else ""))
