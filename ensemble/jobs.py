"""(backbone, fold) jobs: what each one is keyed by, and running them with joblib.

A job is reused only when everything that shaped it is unchanged: the data
fingerprint, the backbone and its training settings (performance-only keys
excluded), the fold split and the seed. Jobs are independent, so the fan-out is
joblib: local processes, or its Dask/Ray backends on a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import backbones, store
from .recipe import PERFORMANCE_KEYS, BackboneConfig, Recipe

CACHE_VERSION = 1  # bump when the training loop changes what a cached job contains


@dataclass(frozen=True)
class Job:
    alias: str
    fold: int
    backbone: BackboneConfig
    key: str
    seed: int


@dataclass(frozen=True)
class SharedData:
    """Arrays every job reads (joblib memory-maps them into worker processes)."""

    x: np.ndarray  # uint8 (N, C, H, W)
    y: np.ndarray  # int64 (N,)
    folds: np.ndarray  # int64 (N,)
    x_test: np.ndarray | None  # uint8 (n_test, C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_classes: int


def _shaping(b: BackboneConfig) -> dict:
    d = dataclasses.asdict(b)
    d["train"] = {k: v for k, v in d["train"].items() if k not in PERFORMANCE_KEYS}
    return d


def plan(recipe: Recipe, data_fingerprint: str, folds: np.ndarray) -> list[Job]:
    """Every (backbone, fold) job of the recipe, backbone-major."""
    folds_fp = store.fingerprint(folds)
    jobs = []
    for b in recipe.backbones:
        for k in range(recipe.cv.folds):
            key = store.fingerprint(CACHE_VERSION, data_fingerprint, _shaping(b), folds_fp, recipe.seed, k)
            seed = int(store.fingerprint(recipe.seed, b.alias, k), 16) % 2**31
            jobs.append(Job(b.alias, k, b, key, seed))
    return jobs


def versions() -> dict:
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def run_job(job: Job, data: SharedData, run_dir: Path, threads: int, progress: bool, device: str | None = None) -> dict:
    """Train one (backbone, fold) job and write its files; returns a one-line summary dict."""
    from .train import resolve_device, train_member

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    dev = resolve_device(device or job.backbone.train.device)
    held_out = data.folds == job.fold
    x, y = torch.from_numpy(np.asarray(data.x)), torch.from_numpy(np.asarray(data.y))
    train_rows, val_rows = torch.from_numpy(np.flatnonzero(~held_out)), torch.from_numpy(np.flatnonzero(held_out))
    torch.manual_seed(job.seed)
    model = backbones.create(
        job.backbone.name,
        num_classes=data.n_classes,
        in_chans=x.shape[1],
        stem=job.backbone.stem,
        pretrained=job.backbone.pretrained,
        model_args=job.backbone.model_args,
    )
    output = train_member(
        model,
        job.backbone.train,
        train=(x[train_rows], y[train_rows]),
        val=(x[val_rows], y[val_rows]),
        test_x=None if data.x_test is None else torch.from_numpy(np.asarray(data.x_test)),
        mean=data.mean,
        std=data.std,
        seed=job.seed,
        device=dev,
        progress=progress,
        desc=f"{job.alias} fold{job.fold}",
    )
    seconds = time.perf_counter() - t0
    meta = {
        "key": job.key,
        "alias": job.alias,
        "fold": job.fold,
        "seed": job.seed,
        "backbone": dataclasses.asdict(job.backbone),
        "seconds": seconds,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "pid": os.getpid(),
        "versions": versions(),
    }
    store.write_job(store.job_dir(run_dir, job.alias, job.fold), output, meta)
    last = output.history["epochs"][-1]
    return {"alias": job.alias, "fold": job.fold, "val_acc": last["val_acc"], "seconds": seconds, "device": str(dev)}


def _threads_per_job(n_jobs: int) -> int:
    cores = os.cpu_count() or 1
    return max(1, cores // max(1, n_jobs))


def run_all(
    jobs: list[Job],
    data: SharedData,
    run_dir: Path,
    n_jobs: int = 1,
    backend: str = "loky",
    progress: bool = True,
) -> Iterator[dict]:
    """Run ``jobs`` and yield each summary as it finishes.

    Locally, ``n_jobs`` processes split the CPU threads between them (no
    oversubscription) and, with several GPUs, job i goes to GPU i mod n_gpus.
    With ``backend`` "dask" or "ray" the active joblib cluster backend runs them.
    """
    from joblib import Parallel, delayed

    if not jobs:
        return
    gpus = torch.cuda.device_count()
    local = backend == "loky"

    def device_for(i: int, job: Job) -> str | None:
        if local and gpus > 1 and job.backbone.train.device in ("auto", "cuda"):
            return f"cuda:{i % gpus}"
        return None

    if n_jobs == 1 and local:
        for i, job in enumerate(jobs):
            yield run_job(job, data, run_dir, 0, progress, device_for(i, job))
        return
    threads = _threads_per_job(n_jobs) if local else 0
    calls = (
        delayed(run_job)(job, data, run_dir, threads, progress and local, device_for(i, job))
        for i, job in enumerate(jobs)
    )
    yield from Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")(calls)


@contextlib.contextmanager
def cluster(backend: str = "loky", scheduler: str | None = None, address: str | None = None):
    """Connect joblib to a Dask or Ray cluster for the duration of the block."""
    if backend == "dask":
        from dask.distributed import Client

        with Client(scheduler) if scheduler else Client(processes=True) as client:
            print(f"dask: {client.dashboard_link}", file=sys.stderr)
            yield
    elif backend == "ray":
        import ray
        from ray.util.joblib import register_ray

        register_ray()
        ray.init(address=address, ignore_reinit_error=True)
        try:
            yield
        finally:
            ray.shutdown()
    else:
        yield
