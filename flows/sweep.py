"""`ptq sweep`: a grid of pipeline configs (methods x schemes x seeds x calibration sizes, ...) run
as parallel Prefect tasks on the runner params.orchestration names, one workspace per config.

Every config is the project's params.yaml with the grid's values set, validated before anything
runs. Its workspace (sweeps/NAME/runs/LABEL) holds its params.yaml and its data/ and metrics/; its
tasks use the project's storage root, so the model fetch, the token ids and the FP activation
captures are computed once and are cache hits for every other config. A config task runs the stages
inputs ... evaluate in its worker without MLflow (workers need no tracking server, and an SQLite
store is never written by two processes); the driver then logs each config as a child run of one
sweep run and runs its register stage there, in order. Results: sweeps/NAME/results.json, a table
(results.md) and a plot (results.png).
"""
from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .params import ParamsError, PipelineParams, dump_params, params_from_dict, params_to_dict

__all__ = ["Config", "parse_grid", "split_orchestration", "expand_grid", "run_sweep", "sweep_config_task"]

log = logging.getLogger("ptq")

SCHEME_KEY = "scheme"  # a grid key that sets quantize.bits, group_size and sym from a name like w3g64


@dataclass(frozen=True)
class Config:
    label: str  # filesystem-safe, unique in the sweep: the grid values joined
    values: dict[str, Any]  # grid key -> value
    params: PipelineParams


def parse_grid(grid_file: str | None, sets: Sequence[str]) -> dict[str, list[Any]]:
    """{key: values} from a YAML file ({section.key | scheme: [values]}) and `-S key=v1,v2` lists
    (each value parsed as YAML); a key given twice is an error."""
    grid: dict[str, list[Any]] = {}
    if grid_file is not None:
        raw = yaml.safe_load(Path(grid_file).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or not raw:
            raise ParamsError(f"{grid_file}: expected a mapping of section.key (or scheme) to a list of values")
        for k, v in raw.items():
            grid[str(k)] = list(v) if isinstance(v, list) else [v]
    for text in sets:
        key, sep, values = text.partition("=")
        if not sep or not values:
            raise ParamsError(f"{text}: malformed sweep axis (expected section.key=v1,v2 or scheme=w4pc,w3g64)")
        if key in grid:
            raise ParamsError(f"{key}: given twice in the sweep grid")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    if not grid:
        raise ParamsError("empty sweep grid: pass --grid FILE or -S section.key=v1,v2")
    return grid


def split_orchestration(base: PipelineParams, grid: Mapping[str, list[Any]]) -> tuple[PipelineParams, dict]:
    """orchestration.* axes say where the sweep runs, not what it computes: each takes one value and
    is set on the base params; the rest is the grid."""
    raw, rest = params_to_dict(base), {}
    for key, values in grid.items():
        if key.startswith("orchestration."):
            if len(values) != 1:
                raise ParamsError(f"{key}: where a sweep runs takes one value, got {values}")
            raw["orchestration"][key.split(".", 1)[1]] = values[0]
        else:
            rest[key] = values
    if not rest:
        raise ParamsError("the sweep grid has no axis besides orchestration.*: pass -S section.key=v1,v2")
    return params_from_dict(raw), rest


def _set(raw: dict[str, dict], key: str, value: Any) -> None:
    if key == SCHEME_KEY:
        from quantlib.spec import parse_scheme

        try:
            spec = parse_scheme(str(value))
        except ValueError as e:
            raise ParamsError(f"scheme: {e}") from None
        raw.setdefault("quantize", {}).update(bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
        return
    section, dot, name = key.partition(".")
    if not dot:
        raise ParamsError(f"{key}: a sweep axis is section.key or scheme")
    raw.setdefault(section, {})[name] = value


def _label(values: Mapping[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", ",".join(parts))


def expand_grid(base: PipelineParams, grid: Mapping[str, list[Any]], storage: Path) -> list[Config]:
    """Every combination, validated (a bad one fails naming its values before any runs); each config
    runs its stages sequentially in its task and reads/writes the shared storage root."""
    configs = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        raw = params_to_dict(base)
        for k, v in values.items():
            _set(raw, k, v)
        raw["orchestration"] = {"runner": "sequential", "address": None, "workers": 1, "storage": str(storage)}
        try:
            params = params_from_dict(raw)
        except ParamsError as e:
            raise ParamsError(f"sweep config {values}: {e}") from None
        varied = {k: v for k, v in values.items() if len(grid[k]) > 1} or values
        configs.append(Config(_label(varied), values, params))
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ParamsError(f"sweep grid gives repeated configs: {labels}")
    return configs


def sweep_config_task():
    """The Prefect task that runs one config (built on call: importing this module needs no Prefect)."""
    from prefect import task

    @task(name="sweep_config")
    def sweep_config(workspace: str) -> dict:
        """Run inputs ... evaluate in `workspace` (its params.yaml), without MLflow; return its metrics."""
        from . import stages as S
        from .orchestration import EngineHolder
        from .params import load_params
        from .runner import run_one_stage

        root = Path(workspace)
        params = load_params(root / "params.yaml")
        engine = EngineHolder()  # sequential inside the config: the parallelism is across configs
        seconds = {}
        for stage in S.STAGES[:-1]:
            seconds[stage.name] = run_one_stage(root, params, stage.name, None, engine).seconds
        metrics = json.loads((root / S.METRICS).read_text(encoding="utf-8"))
        return {"metrics": metrics, "seconds": seconds}

    return sweep_config



def run_sweep(root: Path, base: PipelineParams, grid: Mapping[str, list[Any]], name: str) -> dict:
    """Run the grid; returns the results record also written to sweeps/NAME/results.json."""
    from prefect import flow

    from tasks.io import atomic_write_bytes, atomic_write_json

    from .orchestration import EngineHolder, task_runner

    storage = base.orchestration.storage_root(root).resolve()
    configs = expand_grid(base, grid, storage)
    out = root / "sweeps" / name
    for c in configs:
        ws = out / "runs" / c.label
        ws.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ws / "params.yaml", dump_params(c.params).encode("utf-8"))
    holder = EngineHolder.from_params(base.orchestration)
    try:
        engine = holder()
        runner = task_runner(engine)
        task = sweep_config_task()

        def body() -> list[dict]:
            if not engine.parallel:
                return [task(workspace=str(out / "runs" / c.label)) for c in configs]
            futures = [task.submit(workspace=str(out / "runs" / c.label)) for c in configs]
            return [f.result() for f in futures]

        done = flow(name=f"sweep-{name}", validate_parameters=False,
                    **({} if runner is None else {"task_runner": runner}))(body)()
    finally:
        holder.close()
    rows = _register(root, base, configs, done, out, name)
    record = {"name": name, "grid": {k: list(v) for k, v in grid.items()}, "runner": base.orchestration.runner,
              "workers": base.orchestration.workers, "rows": rows}
    atomic_write_json(out / "results.json", record)
    atomic_write_bytes(out / "results.md", render_table(record).encode("utf-8"))
    _plot(record, out / "results.png")
    return record


def _register(root: Path, base: PipelineParams, configs: list[Config], done: list[dict], out: Path,
              name: str) -> list[dict]:
    """One MLflow sweep run, a child run per config (its params and metrics), each config's register
    stage run here, one after the other."""
    from tasks.mlflow_runs import Tracker, close_run

    from . import stages as S
    from .params import flatten
    from .pipeline import GateError
    from .runner import Tracking, run_one_stage

    r = base.register
    tracker = Tracker(r.resolved_tracking_uri(root), r.experiment)
    sweep_run = tracker.start_run(f"sweep {name}", tags={"ptq.sweep": name})
    rows = []
    for c, res in zip(configs, done):
        child = tracker.start_run(c.label, sweep_run, tags={"ptq.sweep": name, "ptq.sweep_config": c.label})
        tracker.log_params(child, flatten(params_to_dict(c.params)))
        m = res["metrics"]
        first = S.primary_source(m)
        tracker.log_metrics(child, {"ppl": m["ppl"][first], "fp32_ppl": m["fp32_ppl"][first],
                                    **{f"seconds_{k}": v for k, v in res["seconds"].items()}})
        ws = out / "runs" / c.label
        try:
            run_one_stage(ws, c.params, "register", Tracking(tracker, child))
        except GateError as e:  # registered, alias not moved: a row of the table, not the end of the sweep
            log.warning("%s: %s", c.label, e)
        reg = json.loads((ws / "metrics" / "registry.json").read_text(encoding="utf-8"))
        close_run(tracker, child)
        rows.append({"config": c.label, **{k: v for k, v in c.values.items()}, "method": m["method"],
                     "scheme": m["scheme"], "ppl": m["ppl"][first], "fp32_ppl": m["fp32_ppl"][first],
                     "eval": first, "model_uri": reg["model_uri"], "gate": reg["gate"],
                     "seconds": round(sum(res["seconds"].values()), 1)})
    close_run(tracker, sweep_run)
    return rows


def render_table(record: dict) -> str:
    lines = [f"# sweep {record['name']} ({record['runner']}, {record['workers']} workers)", "",
             "| config | method | scheme | ppl | fp32 ppl | ratio | seconds | registered |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['config']} | {r['method']} | {r['scheme']} | {r['ppl']:.2f} | {r['fp32_ppl']:.2f} | "
                     f"{r['ppl'] / r['fp32_ppl']:.3f} | {r['seconds']} | {r['model_uri']} |")
    return "\n".join(lines) + "\n"


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.io import atomic_path

    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3))
    ax.bar([r["config"] for r in rows], [r["ppl"] for r in rows])
    ax.axhline(rows[0]["fp32_ppl"], color="k", linestyle="--", label="fp32")
    ax.set_ylabel(f"perplexity ({rows[0]['eval']})")
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
