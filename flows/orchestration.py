"""Where a stage's tasks run: in the stage's process, on a thread pool, or on a Dask or Ray cluster,
through Prefect's own task runners (ThreadPoolTaskRunner, prefect-dask's DaskTaskRunner,
prefect-ray's RayTaskRunner), never a home-made pool.

The tasks are addressed by files (tasks/quantize.py), so a worker needs only the code and the
storage root. A local cluster (no `orchestration.address`) is started once per `ptq run` or
`ptq stage`, when the first stage that runs tasks starts, and shut down when the command ends; an
existing cluster is connected to and left running. Nothing here changes what a task computes: no
stage declares the orchestration section, so changing the runner changes no output.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Engine", "EngineHolder", "task_runner", "gpu_resources"]

log = logging.getLogger("ptq")


@dataclass(frozen=True)
class Engine:
    """A started runner: its kind, the address its tasks go to (None: in process / threads / the
    Ray instance this process initialized) and how many tasks may run at once."""

    runner: str
    address: str | None = None
    workers: int = 1

    @property
    def parallel(self) -> bool:
        """Whether tasks are submitted (futures) rather than called in the stage's thread."""
        return self.runner != "sequential"


SEQUENTIAL = Engine("sequential")


def task_runner(engine: Engine) -> Any:
    """The Prefect task runner for a flow of this engine (None: Prefect's default, unused when
    tasks are called directly)."""
    if engine.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=engine.workers)
    if engine.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=engine.address)
    if engine.runner == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=engine.address) if engine.address else RayTaskRunner()
    return None


@contextlib.contextmanager
def _local_dask(workers: int) -> Iterator[str]:
    import torch
    from distributed import LocalCluster

    gpus = torch.cuda.device_count()
    # one task per worker process, each on one torch thread (Dask sets OMP_NUM_THREADS=1): the codes
    # do not depend on the thread count (quantlib.gptq factors Hessians on one thread)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={"GPU": max(1, gpus // workers)} if gpus else None) as cluster:
        log.info("dask: local cluster with %d workers at %s", workers, cluster.scheduler_address)
        yield cluster.scheduler_address


@contextlib.contextmanager
def _local_ray(workers: int) -> Iterator[None]:
    import ray
    import torch

    if ray.is_initialized():
        yield
        return
    # Ray workers do not inherit the driver's sys.path: they import this checkout's code through it
    code = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=workers, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    log.info("ray: local instance with %d CPUs", workers)
    try:
        yield
    finally:
        ray.shutdown()


def start(runner: str, address: str | None, workers: int, stack: contextlib.ExitStack) -> Engine:
    """Start (or connect to) the engine; local clusters are closed by `stack`."""
    if runner == "dask" and address is None:
        address = stack.enter_context(_local_dask(workers))
    elif runner == "ray" and address is None:
        stack.enter_context(_local_ray(workers))
    return Engine(runner, address, workers)


class EngineHolder:
    """Starts the engine on first use (a no-op run or a stage without tasks never starts a cluster)
    and closes what it started on `close`."""

    def __init__(self, runner: str = "sequential", address: str | None = None, workers: int = 1) -> None:
        self._args, self._engine, self._stack = (runner, address, workers), None, contextlib.ExitStack()

    def __call__(self) -> Engine:
        if self._engine is None:
            self._engine = SEQUENTIAL if self._args[0] == "sequential" else start(*self._args, self._stack)
        return self._engine

    def close(self) -> None:
        self._stack.close()
        self._engine = None

    @classmethod
    def from_params(cls, orchestration: Any) -> "EngineHolder":
        o = orchestration
        return cls(o.runner, o.address, o.workers)


def gpu_resources(engine: Engine, device: str) -> contextlib.AbstractContextManager:
    """Submitting context for a task that computes on `device`: a cuda task asks its worker for a
    GPU (Dask resources, Ray num_gpus); CPU tasks ask for nothing."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    if engine.runner == "dask":
        import dask

        return dask.annotate(resources={"GPU": 1})
    if engine.runner == "ray":
        from prefect_ray.context import remote_options

        return remote_options(num_gpus=1)
    return contextlib.nullcontext()

