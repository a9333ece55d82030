"""Parallel and distributed jobs (joblib's loky, Dask and Ray backends), the factored training
step, and the training benchmark, on a tiny digits recipe (2 backbones x 2 folds, 8x8, 1 epoch)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble import fit, jobs
from ensemble import recipe as recipe_mod
from ensemble.recipe import TrainConfig
from ensemble.progress import bar as progress_bar
from ensemble.progress import interval as progress_interval
from ensemble.train import TrainStep, infer, run_epoch

from conftest import TINY_RECIPE

# TINY_RECIPE made smaller still: 2 folds, 1 epoch, on the CPU whatever the machine has.
OVERRIDES = ["seed=3", "cv.folds=2", "train.epochs=1", "train.batch_size=64", "train.device='cpu'",
             "ensemble.combiners=['mean']"]
N_JOBS = 4  # 2 backbones x 2 folds


def _fit(tmp: Path, name: str, *extra: str) -> Path:
    recipe = tmp / "tiny_parallel.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp / name
    code = fit.main([str(recipe), "--out", str(out), "--cache", str(tmp / "cache"), "--quiet", "--no-report",
                     *(a for o in OVERRIDES for a in ("--set", o)), *extra])
    assert code == 0
    return out


def _job_files(run: Path, name: str) -> dict[str, Path]:
    files = {str(p.parent.relative_to(run)): p for p in sorted(run.glob(f"members/*/fold*/{name}"))}
    assert len(files) == N_JOBS, f"expected {N_JOBS} finished jobs in {run}, found {sorted(files)}"
    return files


def _threads(run: Path) -> dict[str, int]:
    return {k: json.loads(p.read_text())["threads"] for k, p in _job_files(run, "meta.json").items()}


def assert_same_oof(run: Path, reference: Path) -> None:
    """Bitwise-equal OOF logits when every job ran with the same torch thread count as its
    reference job (CPU results may round differently with another count: then close)."""
    got, want = _job_files(run, "oof_logits.npy"), _job_files(reference, "oof_logits.npy")
    assert got.keys() == want.keys()
    same_threads = _threads(run) == _threads(reference)
    for key in want:
        a, b = np.load(got[key]), np.load(want[key])
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        if same_threads:
            assert got[key].read_bytes() == want[key].read_bytes(), f"{key}: OOF logits differ"
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The reference: a local run with --jobs 2 (loky processes)."""
    return _fit(tmp_path_factory.mktemp("local"), "run", "--jobs", "2")


# --------------------------------------------------------------------------- local processes


def test_jobs2_twice_gives_bitwise_equal_oof_logits_and_splits_threads(local_run, tmp_path):
    before = torch.get_num_threads()
    again = _fit(tmp_path, "again", "--jobs", "2")
    assert _threads(again) == _threads(local_run)
    assert_same_oof(again, local_run)
    assert set(_threads(local_run).values()) == {max(1, jobs.usable_cores() // 2)}  # no oversubscription in the workers
    assert torch.get_num_threads() == before  # the parent's own setting is untouched by the jobs


def test_threads_per_job_count_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # an explicit cap (a shared machine) would change it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # as under `taskset -c 0`
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert jobs._threads_per_job(1) == 1 and jobs._threads_per_job(2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert jobs._threads_per_job(2) == 4


def test_a_job_rerun_in_this_process_gives_the_bits_a_worker_wrote(local_run, tmp_path):
    from ensemble.data import load_dataset

    recipe = recipe_mod.load(local_run / "recipe.toml")
    dataset = load_dataset(recipe.data, local_run.parent / "cache", recipe.seed, progress=False)
    folds = np.load(local_run / "folds.npy")
    job = jobs.plan(recipe, dataset.fingerprint, folds)[-1]  # test_efficientnet, fold 1
    data = jobs.SharedData.from_dataset(dataset, folds)
    worker = local_run / "members" / job.alias / f"fold{job.fold}"
    threads = json.loads((worker / "meta.json").read_text())["threads"]
    before = torch.get_num_threads()
    jobs.run_job(job, data, tmp_path, threads, progress=False)
    assert torch.get_num_threads() == before  # restored after the job
    mine = tmp_path / "members" / job.alias / f"fold{job.fold}"
    assert (mine / "oof_logits.npy").read_bytes() == (worker / "oof_logits.npy").read_bytes()
    assert json.loads((mine / "meta.json").read_text())["pid"] == os.getpid()


def test_claim_gpu_fills_the_gpus_level_by_level_and_never_waits(tmp_path):
    gpus = ["GPU-a", "GPU-b"]
    with jobs.claim_gpu(tmp_path, gpus) as g0, jobs.claim_gpu(tmp_path, gpus) as g1:
        with jobs.claim_gpu(tmp_path, gpus) as g2, jobs.claim_gpu(tmp_path, gpus) as g3:
            with jobs.claim_gpu(tmp_path, gpus) as g4:  # more jobs than two per GPU: a third level
                held = [g0, g1, g2, g3, g4]
        with jobs.claim_gpu(tmp_path, gpus) as again:  # the freed slots are taken again, lowest first
            held.append(again)
    assert held == [0, 1, 0, 1, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "GPU-a.0.lock", "GPU-a.1.lock", "GPU-a.2.lock", "GPU-b.0.lock", "GPU-b.1.lock"]


def test_jobs_of_two_runs_spread_over_the_gpus_as_one_runs_would(tmp_path, monkeypatch):
    """The slots are this user's on the machine, not a run folder's: a second fit on another
    --out starts on the GPU the first one leaves free."""
    monkeypatch.setattr(jobs, "gpu_lock_dir", lambda: tmp_path / "locks")
    monkeypatch.setattr(jobs, "gpu_ids", lambda n: [f"GPU-{i}" for i in range(n)])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = []
    monkeypatch.setattr(jobs, "_train_and_write", lambda job, data, run_dir, progress, device: devices.append(device))
    job = jobs.plan(recipe_mod.from_dict(tomllib.loads(TINY_RECIPE)), "fingerprint", np.array([0, 1] * 4))[0]
    with jobs.claim_gpu(tmp_path / "locks", ["GPU-0", "GPU-1"]):  # a job of another run holds GPU 0
        jobs.run_job(job, None, tmp_path / "run_b", threads=0, progress=False, spread_gpus=True)
    jobs.run_job(job, None, tmp_path / "run_b", threads=0, progress=False, spread_gpus=True)
    jobs.run_job(job, None, tmp_path / "run_b", threads=0, progress=False)  # one GPU, or a CPU job
    assert devices == ["cuda:1", "cuda:0", None]


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="spark"), "backend must be 'loky', 'dask' or 'ray', got 'spark'"),
    (dict(gpus_per_job=0.0), r"gpus_per_job must be in \(0, 1\] \(a job trains on one GPU\), got 0.0"),
    (dict(gpus_per_job=2.0), r"gpus_per_job must be in \(0, 1\]"),
])
def test_run_all_rejects_bad_arguments(kwargs, message, tmp_path):
    job = jobs.Job("a", 0, None, "key", 0)
    with pytest.raises(ValueError, match=message):
        next(jobs.run_all([job], None, tmp_path, **kwargs))


# --------------------------------------------------------------------------- clusters


def test_dask_local_cluster_gives_the_local_oof_logits(local_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    # Each worker declares one GPU, so every job asks for one ("cpu" in the recipe: it trains on the CPU)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR, resources={"GPU": 1}) as cluster:
        with distributed.Client(cluster) as client:
            assert jobs.dask_worker_gpus(client) == [1.0, 1.0]
        run = _fit(tmp_path, "dask", "--backend", "dask", "--scheduler", cluster.scheduler_address)
        cluster.scale(1)  # a one-slot cluster: joblib would run it in this process; the jobs must still go there
        with distributed.Client(cluster) as client:
            deadline = time.monotonic() + 30
            while len(client.ncores()) != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(client.ncores()) == 1
        one_slot = _fit(tmp_path, "dask1", "--backend", "dask", "--scheduler", cluster.scheduler_address)
    pids = {json.loads(p.read_text())["pid"] for p in _job_files(run, "meta.json").values()}
    assert os.getpid() not in pids  # trained in the cluster's workers
    assert_same_oof(run, local_run)
    pids = {json.loads(p.read_text())["pid"] for p in _job_files(one_slot, "meta.json").values()}
    assert len(pids) == 1 and os.getpid() not in pids
    assert_same_oof(one_slot, local_run)


def test_unreachable_dask_scheduler_is_one_line(tmp_path, capsys):
    pytest.importorskip("distributed")
    import dask

    recipe = tmp_path / "tiny_parallel.toml"
    recipe.write_text(TINY_RECIPE)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = fit.main([str(recipe), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--quiet",
                         "--backend", "dask", "--scheduler", "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot connect to the Dask scheduler tcp://127.0.0.1:1: ")
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # connected before the run folder is written


def test_a_local_dask_cluster_on_a_gpu_machine_has_one_worker_per_gpu(monkeypatch):
    """Not one per core, all of whose jobs would pile onto GPU 0: each worker declares one GPU."""
    pytest.importorskip("distributed")
    from dask.distributed import get_client

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    before = dict(os.environ)
    with jobs.cluster("dask"):
        assert jobs.dask_worker_gpus(get_client()) == [1.0, 1.0]
    assert dict(os.environ) == before  # Dask set OMP_NUM_THREADS=1 here for its workers: a later run had 1 thread


def test_a_dask_scheduler_without_workers_is_one_line(tmp_path, capsys, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setattr(jobs, "DASK_WORKER_WAIT_S", 1)
    recipe = tmp_path / "tiny_parallel.toml"
    recipe.write_text(TINY_RECIPE)
    with distributed.LocalCluster(n_workers=0, dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        code = fit.main([str(recipe), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--quiet",
                         "--backend", "dask", "--scheduler", cluster.scheduler_address])
    err = capsys.readouterr().err
    *_, last = err.splitlines()  # after the dashboard's address
    assert code == 2 and last.startswith("error: the Dask scheduler tcp://"), err
    assert "has no workers after 1 s; start some: dask worker tcp://" in last and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_worker_process_that_dies_is_one_line_not_the_engines_traceback(monkeypatch):
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    def killed(*_):
        yield from ()
        raise TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated. "
                                    "The exit codes of the workers are {SIGKILL(-9)}")

    monkeypatch.setattr(jobs, "_run_local", killed)
    with pytest.raises(jobs.JobError, match=r"a worker process died while training \(TerminatedWorkerError, exit "
                                            r"\{SIGKILL\(-9\)\}\): out of memory"):
        list(jobs.run_all(["a job"], None, Path("."), n_jobs=2))


def test_unreachable_ray_head_is_one_line_not_endless_retries(tmp_path, capsys):
    recipe = tmp_path / "tiny_parallel.toml"
    recipe.write_text(TINY_RECIPE)
    code = fit.main([str(recipe), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--quiet",
                     "--backend", "ray", "--address", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot connect to the Ray cluster 127.0.0.1:1: nothing answers at ")
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address", ["10.0.0.5", "head:port", ":6379"])
def test_a_ray_address_without_host_and_port_is_refused(address):
    with pytest.raises(jobs.ClusterError, match="give the Ray head as HOST:PORT"):
        jobs._check_ray_address(address)


def test_ray_local_cluster_gives_the_local_oof_logits(local_run, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run = _fit(tmp_path, "ray", "--backend", "ray")
    finally:
        ray.shutdown()
    pids = {json.loads(p.read_text())["pid"] for p in _job_files(run, "meta.json").values()}
    assert os.getpid() not in pids
    assert_same_oof(run, local_run)


@pytest.mark.parametrize("worker_gpus, gpus_per_job, resources", [
    ([0, 0], 1.0, {}),  # a CPU cluster: jobs ask for no GPU
    ([1, 1], 0.25, {"GPU": 0.25}),
    ([0, 0.5], 0.5, {"GPU": 0.5}),  # only the GPU worker can take them
])
def test_dask_jobs_ask_for_their_gpu_share_where_workers_have_gpus(worker_gpus, gpus_per_job, resources):
    assert jobs.dask_resources(worker_gpus, gpus_per_job) == resources


def test_a_gpu_share_no_dask_worker_has_is_an_error_not_a_hang():
    with pytest.raises(jobs.ClusterError, match=r"--gpus-per-job 1 is more than any Dask worker declares "
                                                r"\(at most GPU=0.5\)"):
        jobs.dask_resources([0.5, 0.5], 1.0)


@pytest.mark.parametrize("cpus, gpus, n_jobs, gpus_per_job, size", [
    (8, [0], None, 1.0, 8),  # CPU cluster: one actor per CPU
    (8, [0], 1, 1.0, 8),  # --jobs 1 (fit's default) still takes the whole cluster
    (8, [0], 3, 1.0, 3),  # --jobs caps it
    (8, [2], None, 1.0, 2),  # one job per GPU
    (8, [2], None, 0.25, 8),  # four small jobs per GPU, capped by the CPUs
    (16, [2], None, 0.25, 8),
    (4, [1], 16, 0.5, 2),
    (1.5, [0], None, 1.0, 1),
    (8, [1, 1], None, 0.4, 4),  # two 1-GPU nodes hold two 0.4 shares each, not 2 / 0.4 = 5
    (8, [0, 2], None, 1.0, 2),  # a CPU node and a 2-GPU node
])
def test_ray_pool_size_never_exceeds_what_the_cluster_can_place(cpus, gpus, n_jobs, gpus_per_job, size):
    assert jobs.ray_pool_size(cpus, gpus, n_jobs, gpus_per_job) == size


def test_a_worker_that_starts_after_fit_died_exits_instead_of_training(monkeypatch):
    """A loky worker still importing torch when fit is killed is handed to init: its parent is
    no longer fit, and the job it then picks up would be trained by no one's order."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    class Exited(Exception):
        pass

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", exit_)
    with pytest.raises(Exited):
        jobs._exit_with(gone.pid)
    jobs._exit_with(1)  # alive, and not this process's parent: nothing to watch, nothing to do


def test_jobs_started_at_once_in_threads_of_one_process_get_their_own_weights():
    """A Dask worker with --nthreads > 1 starts jobs in threads: each model is still drawn from its seed."""
    from ensemble.recipe import BackboneConfig

    backbone = BackboneConfig(name="timm:test_resnet", alias="r")
    made = [jobs.Job("r", k, backbone, "key", seed) for k, seed in enumerate((1, 2, 3, 4))]
    alone = [jobs.build_model(j, 10, 3).state_dict() for j in made]
    for _ in range(3):
        got: dict = {}
        threads = [threading.Thread(target=lambda j=j: got.__setitem__(j.fold, jobs.build_model(j, 10, 3)))
                   for j in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for j in made:
            assert all(torch.equal(v, alone[j.fold][k]) for k, v in got[j.fold].state_dict().items())


@pytest.mark.parametrize("capability, bf16", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_bf16_autocast_only_on_gpus_with_native_bf16(monkeypatch, capability, bf16):
    from ensemble import train

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.warns(UserWarning) if bf16 and not torch.cuda.is_available() else contextlib.nullcontext():
        context = train._autocast(torch.device("cuda:0"))  # CUDA absent here: torch warns and disables it
    assert isinstance(context, torch.autocast) == bf16
    assert not isinstance(train._autocast(torch.device("cpu")), torch.autocast)


# --------------------------------------------------------------------------- the training step


def test_weight_decay_spares_biases_norms_and_what_timm_names_no_weight_decay():
    from ensemble import backbones
    from ensemble.train import make_optimizer

    model = backbones.create("timm:test_vit", num_classes=10, in_chans=3)
    decayed, spared = make_optimizer(model, TrainConfig(weight_decay=0.05)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert {"pos_embed", "cls_token"} <= spared_names and spared["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["weight_decay"] == 0.05
    assert "patch_embed.proj.weight" in {names[id(p)] for p in decayed["params"]}


def _digits(n: int = 256):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images[:n] * 255 / 16).astype(np.uint8)[:, None])
    return x, torch.from_numpy(d.target[:n].astype(np.int64))


def test_run_epoch_trains_on_index_slices_and_infer_is_batched_without_autograd():
    from ensemble import backbones

    x, y = _digits()
    torch.manual_seed(0)
    model = backbones.create("timm:test_resnet", num_classes=10, in_chans=1)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, augment=("crop",))
    step = TrainStep(model, cfg, total_steps=7, mean=(0.3,), std=(0.4,), device=torch.device("cpu"))
    assert step.channels_last and next(step.model.parameters()).device.type == "cpu"
    before = [p.detach().clone() for p in step.model.parameters()]
    loss, correct, seen = run_epoch(step, x, y, 32, torch.Generator().manual_seed(0), steps=7)
    assert seen == 224 and 0 <= int(correct) <= seen and float(loss) / seen > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    assert step.scheduler.last_epoch == 7  # the LR schedule advanced once per step
    whole = infer(step.model, x, (0.3,), (0.4,), torch.device("cpu"), batch_size=1000, channels_last=True)
    batched = infer(step.model, x, (0.3,), (0.4,), torch.device("cpu"), batch_size=50, channels_last=True)
    assert whole.shape == (256, 10) and whole.dtype == torch.float32 and not batched.requires_grad
    torch.testing.assert_close(batched, whole)
    assert not step.model.training


@pytest.mark.parametrize("steps, message", [(9, "9 steps of 32 rows need 288 rows; got 256")])
def test_run_epoch_rejects_more_steps_than_rows(steps, message):
    from ensemble import backbones

    x, y = _digits()
    step = TrainStep(backbones.create("timm:test_resnet", num_classes=10, in_chans=1), TrainConfig(), 10,
                     (0.3,), (0.4,), torch.device("cpu"))
    with pytest.raises(ValueError, match=message):
        run_epoch(step, x, y, 32, torch.Generator(), steps=steps)


# --------------------------------------------------------------------------- the benchmark


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_bench_train_runs_all_three_loops_and_prints_the_ratios(tmp_path, capsys):
    from ensemble.bench import main

    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for c in range(10):
            for i in range(3):
                blob = _png(10 * c + i)
                info = tarfile.TarInfo(f"train/class{c}/{i}.png")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    code = main(["train", "--backbone", "timm:test_resnet", "--archive", str(archive), "--steps", "1",
                 "--warmup", "1", "--rounds", "2", "--batch-size", "8", "--threads", "1", "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    for line in ("(a) model", "(b) toolkit step", "(c) classic DataLoader loop", "b/a = ", "b/c = "):
        assert line in out
    assert "target >= 0.90" in out  # timm:test_resnet has targets


def test_bench_train_says_where_the_archive_should_be(tmp_path, capsys):
    from ensemble.bench import main

    assert main(["train", "--archive", str(tmp_path / "missing.tar.gz")]) == 2
    assert "no archive at" in capsys.readouterr().err


def test_progress_bars_update_live_on_a_terminal_and_rarely_into_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_interval(Terminal()) == 0.1
    assert progress_interval(io.StringIO()) == 30.0  # `fit ... > log 2>&1`: a line every 30 s, not 10 a second


def test_a_bar_in_a_log_file_ends_its_line_so_an_error_after_it_starts_a_new_one(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    with progress_bar(total=4, desc="job") as bar:
        bar.update(2)  # stopped half-way, as by an error
    assert log.getvalue().endswith("\n") and "job:  50%" in log.getvalue().splitlines()[-1]
    assert bar.mininterval == bar.maxinterval == 30.0  # tqdm's monitor would redraw every 10 s


def test_in_a_log_every_bar_state_is_a_whole_line(monkeypatch):
    """Two workers' bars and fit's result lines share one log: none may end up on another's line."""
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    with progress_bar(total=4, desc="a fold0") as a, progress_bar(total=4, desc="b fold1") as b:
        a.update(4)
        log.write("[1/2] a fold0: held-out acc 0.9\n")  # fit's message, between the bars' states
        b.update(2)
    assert "\r" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert "[1/2] a fold0: held-out acc 0.9" in lines
    assert all(line.startswith(("a fold0:", "b fold1:", "[1/2]")) for line in lines), lines


def test_a_job_writes_no_per_epoch_progress_lines_into_a_log(monkeypatch):
    """Into a log file the bar is drawn when it opens and when it closes, not once an epoch
    (a per-epoch postfix refresh used to bypass the 30 s interval)."""
    from ensemble import backbones
    from ensemble.train import train_member

    x, y = _digits()
    x, y = x[:64], y[:64]
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.05, augment=())
    torch.manual_seed(0)
    out = train_member(backbones.create("timm:test_resnet", num_classes=10, in_chans=1), cfg, (x, y), (x, y),
                       None, (0.3,), (0.4,), seed=0, device=torch.device("cpu"), progress=True, desc="job")
    assert len(out.history["epochs"]) == 6
    draws = log.getvalue().count("job:")
    assert 1 <= draws <= 2, log.getvalue()


def test_processes_started_for_a_local_dask_cluster_leave_ctrl_c_to_fit():
    """A local Dask cluster's workers start while SIGINT is ignored and keep ignoring it: Ctrl-C
    stops fit, which closes them, instead of each printing a page of tracebacks. fit's own
    handler is back afterwards."""
    import signal
    import subprocess
    import sys

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        pytest.skip("this test process was started with SIGINT ignored (a background job of a shell script)")
    with jobs._sigint_ignored():
        inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert inside == "True"
    assert signal.getsignal(signal.SIGINT) is before
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_an_explicit_omp_num_threads_caps_the_threads_per_job(monkeypatch):
    monkeypatch.setattr(jobs, "usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert jobs._threads_per_job(2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert jobs._threads_per_job(2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert jobs._threads_per_job(2) == 4
