"""(backbone, fold) jobs: what each one is keyed by, and running them with joblib.

A job is reused only when everything that shaped its weights is unchanged: the
training images' fingerprint, the backbone and its training settings
(performance-only keys excluded), the fold split and the seed. The test images
are not part of that key: a job whose test set changed keeps its weights and
only predicts the new test images (:func:`predict_test`). Jobs are independent, so the fan-out is
joblib: local processes, or its Dask/Ray backends on a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import platform
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import backbones, store
from . import progress as progress_mod
from .recipe import PERFORMANCE_KEYS, BackboneConfig, Recipe, backbone_dict

CACHE_VERSION = 3  # bump when the training loop changes what a cached job contains (2: crop and cutout
#                   scale with the image size, weight decay spares timm's no_weight_decay(), the cifar
#                   stem removes a nested stem max-pool, warm-up steps are rounded; 3: no_weight_decay()
#                   entries are patterns ('pos_embed.*'), the cifar stem keeps a standardised conv's class)


@dataclass(frozen=True)
class Job:
    alias: str
    fold: int
    backbone: BackboneConfig
    key: str
    seed: int
    test_key: str = ""  # fingerprint of the test images its test logits are of ("" without a test set)


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

    @classmethod
    def from_dataset(cls, dataset, folds: np.ndarray) -> "SharedData":
        """The arrays of a :class:`ensemble.data.Dataset` and its fold split."""
        return cls(
            x=dataset.train.x.numpy(),
            y=dataset.train.y.numpy(),
            folds=folds,
            x_test=None if dataset.test is None else dataset.test.x.numpy(),
            mean=tuple(dataset.mean),
            std=tuple(dataset.std),
            n_classes=len(dataset.train.classes),
        )


def _shaping(b: BackboneConfig) -> dict:
    """What decides a backbone's trained weights. A pretrained file counts by its content, not
    its path: a file replaced in place retrains, one moved elsewhere does not."""
    d = backbone_dict(b)
    d["train"] = {k: v for k, v in d["train"].items() if k not in PERFORMANCE_KEYS}
    if b.pretrained:
        d["pretrained"] = _file_digest(Path(b.pretrained))
    return d


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes; "missing" when it cannot be read (building the backbone says why)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return "missing"
    return h.hexdigest()


def plan(recipe: Recipe, data_fingerprint: str, folds: np.ndarray, test_fingerprint: str = "",
         version: int = CACHE_VERSION) -> list[Job]:
    """Every (backbone, fold) job of the recipe, backbone-major; ``data_fingerprint`` is the
    training images', ``test_fingerprint`` the test images' ("" without a test set); ``version``
    an earlier ``CACHE_VERSION`` gives the keys that jobs had then."""
    folds_fp = store.fingerprint(folds)
    jobs = []
    for b in recipe.backbones:
        shaping = _shaping(b)
        for k in range(recipe.cv.folds):
            key = store.fingerprint(version, data_fingerprint, shaping, folds_fp, recipe.seed, k)
            seed = int(store.fingerprint(recipe.seed, b.alias, k), 16) % 2**31
            jobs.append(Job(b.alias, k, b, key, seed, test_fingerprint))
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


def run_job(
    job: Job,
    data: SharedData,
    run_dir: Path,
    threads: int,
    progress: bool,
    spread_gpus: bool = False,
) -> dict:
    """Train one (backbone, fold) job and write its files; returns a one-line summary dict.

    ``threads`` > 0 sets torch's CPU threads for this job (restored after); 0 keeps the
    process's own setting (a Dask or Ray worker's OMP_NUM_THREADS). ``spread_gpus``
    (local runs with several GPUs) makes the job hold a slot on the least busy GPU while it
    runs (:func:`claim_gpu`): concurrent jobs, of this run and of this user's other runs on
    the machine, spread over the GPUs instead of piling onto one.
    """
    from .train import DivergedError

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if spread_gpus and job.backbone.train.device in ("auto", "cuda"):
            with claim_gpu(gpu_lock_dir(), gpu_ids(torch.cuda.device_count())) as gpu:
                return _train_and_write(job, data, run_dir, progress, f"cuda:{gpu}")
        return _train_and_write(job, data, run_dir, progress, None)
    except (DivergedError, OSError):  # fit says these in its own words
        raise
    except Exception as exc:  # noqa: BLE001 - a library's error inside the job: one line naming the job
        raise JobError(_failure(job, exc, Path(run_dir))) from None
    finally:
        torch.set_num_threads(previous)


class JobError(RuntimeError):
    """A job failed inside its training; the message names the job, the error and its traceback file."""


def _failure(job: Job, exc: Exception, run_dir: Path) -> str:
    """One line for a job's failure; the whole traceback goes to the job folder's error.txt."""
    where = store.job_dir(run_dir, job.alias, job.fold) / "error.txt"
    try:
        store.write_text(where, "".join(traceback.format_exception(exc)))
        saved = f" (traceback: {where})"
    except OSError:
        saved = ""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    hint = ("; it came from torch.compile (a C++ compiler is needed on the CPU): set train.compile = false"
            if job.backbone.train.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))
            else "")
    return f"{job.alias} fold{job.fold} failed: {type(exc).__name__}: {first}{hint}{saved}"


def _run_job_ray(job: Job, data_ref, run_dir: Path, threads: int, progress: bool) -> dict:
    """:func:`run_job` on the SharedData behind a Ray ObjectRef (joblib's Ray backend passes it as is)."""
    import ray

    return run_job(job, ray.get(data_ref), run_dir, threads, progress)


_INIT_LOCK = threading.Lock()


def build_model(job: Job, n_classes: int, channels: int) -> torch.nn.Module:
    """The job's model, its weights drawn from torch's random state seeded with ``job.seed`` (which
    then goes on into training: dropout). Under a lock, so that jobs started at once in threads of
    one process (a Dask worker with --nthreads > 1) cannot reseed it in the middle of each other's
    draws; their training draws still share it, hence one job per process for equal logits."""
    with _INIT_LOCK:
        torch.manual_seed(job.seed)
        return backbones.create(job.backbone.name, num_classes=n_classes, in_chans=channels,
                                stem=job.backbone.stem, pretrained=job.backbone.pretrained,
                                model_args=job.backbone.model_args)


def _train_and_write(job: Job, data: SharedData, run_dir: Path, progress: bool, device: str | None) -> dict:
    from .train import resolve_device, train_member

    t0 = time.perf_counter()
    dev = resolve_device(device or job.backbone.train.device)
    held_out = data.folds == job.fold
    x, y = np.asarray(data.x), np.asarray(data.y)  # read-only memory maps in worker processes
    train_rows, val_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    model = build_model(job, data.n_classes, x.shape[1])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the batch shape is fixed: let cuDNN pick its fastest kernels
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():  # not GPU 0's context
        output = train_member(
            model,
            job.backbone.train,
            train=(torch.from_numpy(x[train_rows]), torch.from_numpy(y[train_rows])),  # fancy indexing copies
            val=(torch.from_numpy(x[val_rows]), torch.from_numpy(y[val_rows])),
            test_x=None if data.x_test is None else torch.from_numpy(np.array(data.x_test)),  # a writable copy
            mean=data.mean,
            std=data.std,
            seed=job.seed,
            device=dev,
            progress=progress,
            desc=f"{job.alias} fold{job.fold}",
        )
    del model  # moved to the GPU in place: its weights and last gradients would outlive empty_cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # a worker process trains many jobs, maybe on other GPUs
    seconds = time.perf_counter() - t0
    meta = {
        "key": job.key,
        "alias": job.alias,
        "fold": job.fold,
        "seed": job.seed,
        "backbone": backbone_dict(job.backbone),
        "seconds": seconds,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "pid": os.getpid(),
        "versions": versions(),
    }
    store.write_job(store.job_dir(run_dir, job.alias, job.fold), output, meta, job.test_key)
    last = output.history["epochs"][-1]
    return {"alias": job.alias, "fold": job.fold, "val_acc": last["val_acc"], "seconds": seconds, "device": str(dev)}


def predict_test(job: Job, data: SharedData, run_dir: Path) -> str:
    """Give a finished job the test logits of the run's current test images, predicted by its saved
    models (snapshots first, final weights last, as training kept them): the test set changed, the
    weights did not. Inference runs in this process, on the device the job trained on, or on the CPU
    where this machine lacks it (a Dask or Ray head node); returns that device."""
    from .predict import load_model
    from .train import infer, resolve_device, use_channels_last

    directory = store.job_dir(run_dir, job.alias, job.fold)
    if data.x_test is None:
        store.write_test_logits(directory, None, job.test_key)
        return "-"
    hint = store.retrain_hint(run_dir, directory)
    try:
        device = resolve_device(job.backbone.train.device)
    except ValueError:
        device = torch.device("cpu")
    channels_last = use_channels_last(job.backbone.train, device)
    x_test = torch.from_numpy(data.x_test)  # fit's own array, not a worker's read-only memory map
    logits = []
    for name in store.weight_files(job.backbone.train.snapshots or 1):
        model = load_model(job.backbone, data.n_classes, x_test.shape[1], directory / name, device, channels_last,
                           hint)
        logits.append(infer(model, x_test, data.mean, data.std, device, channels_last=channels_last).numpy())
    store.write_test_logits(directory, np.stack(logits), job.test_key)
    return str(device)


def gpu_lock_dir() -> Path:
    """Where every run of this user on this machine keeps its GPU slot locks."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"ensemble-gpu-slots-{user}"


def gpu_ids(n_gpus: int) -> list[str]:
    """A name for each visible GPU that every process agrees on whatever its CUDA_VISIBLE_DEVICES:
    the card's UUID (its index where torch does not say)."""
    return [str(getattr(torch.cuda.get_device_properties(i), "uuid", i)) for i in range(n_gpus)]


@contextlib.contextmanager
def claim_gpu(lock_dir: Path, gpus: list[str]) -> Iterator[int]:
    """Hold a slot on the least busy of ``gpus`` while the block runs; yields that GPU's index.

    Slot k of GPU g is the lock file ``<g>.<k>.lock``. A job takes the lowest free k over
    all GPUs, so jobs fill the GPUs level by level: every GPU's first slot, then every
    GPU's second. A lock (``flock``) is released when the block ends or the process dies,
    and there are as many levels as jobs, so a job never waits for a slot.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for level in itertools.count():
        for index, gpu in enumerate(gpus):
            handle = store.try_lock(lock_dir / f"{gpu}.{level}.lock")
            if handle is None:
                continue
            try:
                yield index
            finally:
                handle.close()  # releases the lock
            return


def usable_cores() -> int:
    """The cores this process may run on (taskset, a cgroup cpuset, SLURM), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _threads_per_job(n_jobs: int) -> int:
    """The usable cores split between the jobs; an explicit OMP_NUM_THREADS (a shared machine) caps it."""
    threads = max(1, usable_cores() // max(1, n_jobs))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) >= 1 else threads


def run_all(
    jobs: list[Job],
    data: SharedData,
    run_dir: Path,
    n_jobs: int | None = 1,
    backend: str = "loky",
    progress: bool = True,
    gpus_per_job: float = 1.0,
) -> Iterator[dict]:
    """Run ``jobs`` and yield each summary as it finishes.

    ``backend`` "loky" (local): ``n_jobs`` processes (None = 1) split the CPU cores
    between them, ``cores // n_jobs`` torch threads each (no oversubscription); with
    several GPUs each running job holds its own slot, slot s on GPU s mod n_gpus.

    ``backend`` "dask" or "ray" runs them with joblib's backend for that engine on the
    cluster that :func:`cluster` connected. When the cluster has GPUs each job asks
    for ``gpus_per_job`` of one (a fraction lets small jobs share a card); a job keeps
    its worker's CPU threads (both engines set OMP_NUM_THREADS to the CPUs a task
    holds: 1 by default). Dask's scheduler decides how many jobs run at once
    (``n_jobs`` is not used); on Ray, ``n_jobs`` > 1 caps the pool, None or 1 takes
    every slot. A cluster with a single slot gets its jobs one by one through the
    engine's own API (joblib would run a one-slot pool in this process).
    """
    if not jobs:
        return
    if backend not in ("loky", "dask", "ray"):
        raise ValueError(f"backend must be 'loky', 'dask' or 'ray', got {backend!r}")
    if not 0 < gpus_per_job <= 1:
        raise ValueError(f"gpus_per_job must be in (0, 1] (a job trains on one GPU), got {gpus_per_job}")
    try:
        if backend == "loky":
            yield from _run_local(jobs, data, run_dir, n_jobs or 1, progress)
        elif backend == "dask":
            yield from _run_dask(jobs, data, run_dir, gpus_per_job)
        else:
            yield from _run_ray(jobs, data, run_dir, n_jobs, gpus_per_job)
    except Exception as exc:
        if type(exc).__name__ not in _LOST_WORKER:  # a job's own error (Ray's wraps keep the job's type)
            raise
        codes = re.search(r"exit codes of the workers are (\{.*?\})", str(exc))  # loky names the signal
        raise JobError(f"a worker process died while training ({type(exc).__name__}"
                       f"{', exit ' + codes.group(1) if codes else ''}): out of memory (lower --jobs or the batch "
                       "size), killed, or its machine was lost") from None


# what joblib's loky, Dask and Ray backends raise when the process running a job dies (OOM killer, preemption)
_LOST_WORKER = ("TerminatedWorkerError", "KilledWorker", "FutureCancelledError", "ActorDiedError",
                "RayActorError", "WorkerCrashedError", "NodeDiedError", "ActorUnavailableError")


def _run_local(jobs: list[Job], data: SharedData, run_dir: Path, n_jobs: int, progress: bool) -> Iterator[dict]:
    from joblib import Parallel, delayed

    threads = _threads_per_job(n_jobs)
    n_gpus = torch.cuda.device_count()
    # n_jobs = 1: joblib runs the calls one by one in this process
    calls = (delayed(_run_local_job)(os.getpid(), job, data, run_dir, threads, progress, n_gpus > 1)
             for job in jobs)
    try:
        yield from Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")(calls)
    except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C (here, or in fit while it prints a result)
        if n_jobs > 1:  # stop the workers and free their locks before fit exits
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True, kill_workers=True)
        raise


def _run_local_job(fit_pid: int, job: Job, data: SharedData, run_dir: Path, threads: int, progress: bool,
                   spread_gpus: bool) -> dict:
    """:func:`run_job` in a local worker process that exits as soon as the fit process is gone."""
    if fit_pid != os.getpid():  # a worker (with --jobs 1 joblib runs the job in fit's own process)
        _exit_with(fit_pid)
        progress_mod.use_thread_lock()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is fit's to handle: it stops the workers
    return run_job(job, data, run_dir, threads, progress, spread_gpus=spread_gpus)


_WATCHED: set[int] = set()


def _exit_with(fit_pid: int, poll_s: float = 0.5) -> None:
    """In a worker process (not in fit's own): exit when fit is gone, e.g. killed with SIGKILL.

    Loky's idle workers would otherwise live on for minutes, one still training its job while a
    restarted fit trains the same job again, and all holding fit's stdout (`fit | tee log` hangs).
    """
    if fit_pid == os.getpid() or fit_pid in _WATCHED:
        return  # fit's own process, or watched already
    if os.getppid() != fit_pid:
        if not _alive(fit_pid):  # fit died while this worker was starting: its job is orphaned
            os._exit(1)
        return  # not fit's child (nothing to tell by)
    _WATCHED.add(fit_pid)

    def watch() -> None:
        while os.getppid() == fit_pid:  # a dead parent's children are handed to another process
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-fit", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        pass
    return True


def _run_dask(jobs: list[Job], data: SharedData, run_dir: Path, gpus_per_job: float) -> Iterator[dict]:
    """joblib's Dask backend; the data is scattered to every worker once.

    GPUs are a Dask worker resource: a task asking for ``resources={"GPU": g}`` runs
    only on workers started with ``--resources GPU=1``, at most 1/g at once on each.
    """
    from dask.distributed import get_client
    from joblib import Parallel, delayed, parallel_config

    client = get_client()
    resources = dask_resources(dask_worker_gpus(client), gpus_per_job)
    # a local cluster (fit started it): its workers share this machine's GPUs, so each job holds a
    # GPU slot as with loky; on a remote cluster CUDA_VISIBLE_DEVICES per worker does it
    spread = getattr(client, "cluster", None) is not None and torch.cuda.device_count() > 1
    if sum(client.ncores().values()) == 1:
        shared = client.scatter(data, broadcast=True)
        for job in jobs:
            future = client.submit(run_job, job, shared, run_dir, 0, False, spread, resources=resources or None,
                                   pure=False)
            yield future.result()
        return
    calls = (delayed(run_job)(job, data, run_dir, 0, False, spread) for job in jobs)
    settings = {"resources": resources} if resources else {}
    with parallel_config(backend="dask", scatter=[data], **settings):
        results = Parallel(n_jobs=-1, batch_size=1, return_as="generator_unordered")(calls)
    yield from results


def dask_resources(worker_gpus: list[float], gpus_per_job: float) -> dict:
    """The resources each job asks Dask for: ``gpus_per_job`` GPUs where some worker declares GPUs.
    ClusterError when no worker declares that much: the jobs would wait for ever."""
    if not any(worker_gpus):
        return {}
    if gpus_per_job > max(worker_gpus):
        raise ClusterError(f"--gpus-per-job {gpus_per_job:g} is more than any Dask worker declares (at most "
                           f"GPU={max(worker_gpus):g}); lower it, or start workers with --resources GPU=1")
    return {"GPU": gpus_per_job}


def dask_worker_gpus(client) -> list[float]:
    """The "GPU" resource each worker of the Dask cluster declares (0 for none)."""
    try:
        info = client.scheduler_info(n_workers=-1)  # every worker, not the first few
    except TypeError:  # distributed before 2025 lists all workers and takes no n_workers
        info = client.scheduler_info()
    return [float(w.get("resources", {}).get("GPU", 0)) for w in info["workers"].values()]


def _run_ray(jobs: list[Job], data: SharedData, run_dir: Path, n_jobs: int | None, gpus_per_job: float):
    """joblib's Ray backend: a pool of actors, each holding ``gpus_per_job`` GPUs when there are GPUs.

    The data goes to Ray's object store once; each job fetches it from there. Results
    come back all at the end (joblib's Ray backend cannot stream them).
    """
    import ray
    from joblib import Parallel, delayed, parallel_config

    resources = ray.cluster_resources()
    gpus = gpus_per_job if resources.get("GPU", 0) > 0 else 0.0
    node_gpus = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    n = ray_pool_size(resources.get("CPU", 1), node_gpus, n_jobs, gpus_per_job)
    shared = ray.put(data)
    if n == 1:
        remote = ray.remote(run_job).options(num_cpus=1, num_gpus=gpus)
        for job in jobs:
            yield ray.get(remote.remote(job, shared, run_dir, 0, False))
        return
    calls = (delayed(_run_job_ray)(job, shared, run_dir, 0, False) for job in jobs)
    with parallel_config(backend="ray", ray_remote_args={"num_gpus": gpus} if gpus else {}):
        results = Parallel(n_jobs=n, batch_size=1, return_as="list")(calls)
    yield from results


def ray_pool_size(cpus: float, node_gpus: list[float], n_jobs: int | None, gpus_per_job: float) -> int:
    """Actors in the Ray pool: no more than the cluster can place at once.

    One CPU each, and ``gpus_per_job`` of a GPU each when the cluster has GPUs, counted node by
    node (``node_gpus``: an actor's share cannot straddle two nodes; Ray waits for every actor of a
    pool to start, so an unplaceable one would hang). ``n_jobs`` > 1 caps it; None, 1 or -1 takes
    every slot.
    """
    capacity = max(1, int(cpus))
    if any(g > 0 for g in node_gpus):
        slots = sum(int(g / gpus_per_job + 1e-9) for g in node_gpus)
        capacity = min(capacity, max(1, slots))
    return capacity if n_jobs in (None, 1, -1) else max(1, min(n_jobs, capacity))


DASK_WORKER_WAIT_S = 60  # how long fit waits for a first Dask worker to join the scheduler


class ClusterError(RuntimeError):
    """The Dask scheduler or Ray cluster named on the command line cannot be reached."""


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the block starts processes, which keep ignoring it: a local Dask
    worker would otherwise print a page of tracebacks on Ctrl-C, while fit closes it anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_ray_address(address: str | None) -> None:
    """ClusterError when nothing answers at a Ray head's HOST:PORT: ``ray.init`` would retry it
    for ever, logging every 30 s."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: give the Ray head as HOST:PORT (e.g. 10.0.0.5:6379) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ClusterError(f"cannot connect to the Ray cluster {address}: nothing answers at {host}:{port} "
                           f"({exc.strerror or exc})") from None


@contextlib.contextmanager
def cluster(backend: str = "loky", scheduler: str | None = None, address: str | None = None):
    """Connect joblib to a Dask or Ray cluster for the duration of the block.

    Dask: ``scheduler`` is the scheduler's address (tcp://HOST:8786); None starts a
    local cluster. Ray: ``address`` is the head node (HOST:6379, or "auto"); None
    starts a local Ray. A Ray session that was already running is left running. This
    process's environment is put back afterwards: a local Dask cluster sets
    OMP_NUM_THREADS=1 (and more) in it for its workers, which would cap a later local run.
    """
    with _environ_kept():
        yield from _connected(backend, scheduler, address)


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _connected(backend: str, scheduler: str | None, address: str | None) -> Iterator[None]:
    if backend == "dask":
        from dask.distributed import Client

        try:
            if scheduler:
                client = Client(scheduler)
            else:
                n_gpus = torch.cuda.device_count()  # with GPUs: one worker (one job) per GPU, not one per core
                gpus = {"n_workers": n_gpus, "resources": {"GPU": 1}} if n_gpus else {}
                with _sigint_ignored():  # the local workers inherit it: Ctrl-C stops fit, and fit stops them
                    client = Client(processes=True, threads_per_worker=1, **gpus)  # one job per process
        except OSError as exc:  # unreachable address, timeout
            raise ClusterError(f"cannot connect to the Dask scheduler {scheduler}: {exc}") from None
        with client:
            print(f"dask: {client.dashboard_link}", file=sys.stderr)
            try:  # the data is scattered to the workers: with none yet, that fails as "No valid workers found"
                client.wait_for_workers(1, timeout=DASK_WORKER_WAIT_S)
            except (TimeoutError, OSError):
                raise ClusterError(f"the Dask scheduler {scheduler or '(local)'} has no workers after "
                                   f"{DASK_WORKER_WAIT_S} s; start some: dask worker {scheduler or 'ADDRESS'} "
                                   "--nthreads 1") from None
            yield
    elif backend == "ray":
        _check_ray_address(address)
        import ray
        from ray.util.joblib import register_ray

        register_ray()
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=address)
            except OSError as exc:  # ConnectionError: no cluster at that address
                raise ClusterError(f"cannot connect to the Ray cluster {address}: {exc}") from None
        try:
            yield
        finally:
            if started:
                ray.shutdown()
    else:
        yield
