"""``python -m ensemble.fit RECIPE``: train every (backbone, fold) job, then fit the combiners.

Finished jobs are read back from the run folder, so a rerun (after a crash, a
kill or a changed ``[ensemble]`` section) trains only what is missing; new test
images are predicted with the saved models, without retraining.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path


def _interrupted_while_importing(*_) -> None:
    print("interrupted", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":  # Ctrl-C while torch, timm and sklearn import (~1.5 s): one line, not a traceback
    signal.signal(signal.SIGINT, _interrupted_while_importing)

import numpy as np

from . import jobs as jobs_mod
from . import progress as progress_mod
from . import recipe as recipe_mod
from . import store
from .evaluate import build_combiners, check_fits, evaluate
from .recipe import Recipe, RecipeError
from .train import DivergedError, resolve_device


def default_cache_dir() -> Path:
    env = os.environ.get("ENSEMBLE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # unset, empty or relative: ~/.cache, as the XDG rules say (not a folder 'ensemble' where fit runs)
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "ensemble"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.fit", description=store.summary(__doc__))
    p.add_argument("recipe", help="a TOML recipe, e.g. recipes/digits_5fold.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: outputs/<recipe name>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="(backbone, fold) jobs run at once (default 1); ignored on Dask; on Ray it caps the "
                        "pool (1 = the whole cluster)")
    p.add_argument("--gpus-per-job", type=float, default=1.0,
                   help="GPU share a job asks a Dask/Ray cluster for, in (0, 1] (default 1; 0.25 = four jobs per card)")
    p.add_argument("--backend", choices=("loky", "dask", "ray"), default="loky",
                   help="joblib backend: local processes (loky), or a Dask / Ray cluster")
    p.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786 (with --backend dask)")
    p.add_argument("--address", help="Ray cluster address, e.g. HOST:6379 (with --backend ray)")
    p.add_argument("--cache", type=Path, default=None,
                   help="decoded-image cache (default: $ENSEMBLE_CACHE, else $XDG_CACHE_HOME/ensemble, "
                        "else ~/.cache/ensemble)")
    p.add_argument("--no-report", action="store_true", help="skip writing report/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if not 0 < args.gpus_per_job <= 1:
        p.error(f"--gpus-per-job must be in (0, 1] (a job trains on one GPU), got {args.gpus_per_job}")
    if args.scheduler and args.backend != "dask":
        p.error("--scheduler names a Dask scheduler: add --backend dask")
    if args.address and args.backend != "ray":
        p.error("--address names a Ray cluster: add --backend ray")
    for flag, folder in (("--out", args.out), ("--cache", args.cache)):
        if folder is not None and folder.exists() and not folder.is_dir():
            p.error(f"{flag} {folder} is a file; give a folder")
    return args


def make_folds(y: np.ndarray, k: int, seed: int, copies: np.ndarray | None = None) -> np.ndarray:
    """One stratified k-fold split: the fold index (0..k-1) of every row, shape (N,).

    ``copies`` (``Dataset.copies``: rows with equal values hold the same pixels) keeps
    every copy of an image in one fold, so no fold model is scored on an image it trained on.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    folds = np.empty(len(y), dtype=np.int64)
    if copies is None:
        split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    else:
        split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, copies)
    for fold, (_, held_out) in enumerate(split):
        folds[held_out] = fold
    return folds


def describe_test_set(dataset) -> str:
    """'N test', naming how many classes the test set holds when it lacks some."""
    if dataset.test is None:
        return "0 test"
    covered, total = len(dataset.test.y.unique()), len(dataset.train.classes)
    return f"{len(dataset.test.y)} test" + (f" ({covered} of {total} classes)" if covered < total else "")


def check_class_counts(recipe: Recipe, y: np.ndarray, classes, copies: np.ndarray | None = None) -> None:
    """Every class needs cv.folds distinct training images: copies of an image share a fold."""
    # with copies: each class counts the images (copy groups) it holds, one filed under two classes in both
    distinct = y if copies is None else np.unique(np.stack([copies, y], 1), axis=0)[:, 1]
    counts = np.bincount(distinct, minlength=len(classes))
    worst = int(counts.argmin())
    if counts[worst] < recipe.cv.folds:
        raise recipe.error(
            "cv.folds",
            f"= {recipe.cv.folds} needs at least that many training images per class, "
            f"but class {classes[worst]!r} has {counts[worst]}{'' if copies is None else ' distinct ones'}; "
            "lower cv.folds or add images",
        )


def note_copies(copies: np.ndarray | None) -> None:
    if copies is not None:
        n = len(copies) - len(np.unique(copies))
        print(f"note: {n} training image{' is a copy' if n == 1 else 's are copies'} of another one (the same "
              "pixels); every copy is kept in its original's fold, so no model is scored on an image it trained on",
              file=sys.stderr)


def write_run_files(run_dir: Path, recipe: Recipe, dataset, folds: np.ndarray, cache: Path | None = None) -> None:
    train, test = dataset.train, dataset.test
    store.write_text(run_dir / "recipe.toml", recipe_mod.dumps(recipe))
    store.write_json(run_dir / "data.json", {
        "source": recipe.data.source,
        "classes": list(train.classes),
        "n_train": len(train.y),
        "n_test": 0 if test is None else len(test.y),
        "channels": int(train.x.shape[1]),
        "image_size": int(train.x.shape[-1]),
        "fingerprint": dataset.fingerprint,
        "test_fingerprint": dataset.test_fingerprint,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "cache": None if cache is None else str(Path(cache).resolve()),  # given with --cache: hints repeat it
    })
    store.write_npy(run_dir / "labels.npy", train.y.numpy().astype(np.int64))
    if test is not None:
        store.write_npy(run_dir / "test_labels.npy", test.y.numpy().astype(np.int64))
    else:
        (run_dir / "test_labels.npy").unlink(missing_ok=True)
    store.write_npy(run_dir / "folds.npy", folds)


def check_devices(recipe: Recipe, aliases: set[str]) -> None:
    """Fail before training when a backbone about to train asks for a device this machine lacks."""
    for i, b in enumerate(recipe.backbones):
        if b.alias not in aliases:
            continue
        try:
            resolve_device(b.train.device)
        except ValueError as exc:
            key = "train.device" if b.train.device == recipe.train.device else f"backbones[{i}].device"
            raise recipe.error(key, f"cannot be used on this machine: {exc}") from None


def check_backbones(recipe: Recipe, aliases: set[str], num_classes: int, in_chans: int, image_size: int) -> None:
    """Build every backbone about to train once and take one training step's forward and
    backward pass on a zero batch, so that a bad name, ``model_args``, stem, weights file, image
    size the model cannot take (a ViT built for 224) or a batch size of 1 under batch norm fails
    now, naming its key, rather than as a traceback from inside a job."""
    from . import backbones

    recipe_mod.check_backbone_names(recipe, aliases)
    for i, b in enumerate(recipe.backbones):
        if b.alias not in aliases:
            continue
        try:
            net = backbones.create(b.name, num_classes=num_classes, in_chans=in_chans, stem=b.stem,
                                   pretrained=b.pretrained, model_args=b.model_args)
        except Exception as exc:  # noqa: BLE001 - whatever the library raises, the recipe's settings caused it
            why = backbones.failure_reason(exc)
            raise recipe.error(f"backbones[{i}]", f"({b.name}) cannot be built: {why}") from None
        n = min(2, b.train.batch_size)
        try:
            backbones.try_step(net, n, in_chans, image_size, num_classes)
        except Exception as exc:  # noqa: BLE001
            why = backbones.failure_reason(exc)
            raise recipe.error(f"backbones[{i}]", f"({b.name}) cannot train on {image_size}x{image_size} images "
                                                  f"in batches of {b.train.batch_size}: {why}") from None


def check_out(run_dir: Path, recipe: Recipe) -> str | None:
    """The text of the run's previous ``recipe.toml`` (None for a new run); refuses an output
    folder that holds another recipe's run, which fit would mix with this one, or other files,
    which it could delete, one it cannot write to and one inside the images it reads."""
    why = store.unwritable(run_dir)
    if why:
        raise RecipeError(f"--out {run_dir}: {why}; give a folder fit can write to")
    inside = inside_images(run_dir, recipe)
    if inside:
        raise RecipeError(f"--out {run_dir} is inside {inside}: its files would be read as images on the next "
                          "run; give a folder outside it")
    try:
        previous = (run_dir / "recipe.toml").read_text()
    except FileNotFoundError:
        others = [] if not run_dir.is_dir() else [p.name for p in run_dir.iterdir() if not p.name.startswith(".")]
        if others:  # fit would delete or overwrite what it finds there (metrics.json, report/, combiners/)
            raise RecipeError(f"--out {run_dir} is not empty ({', '.join(sorted(others)[:3])}"
                              f"{', ...' if len(others) > 3 else ''}) and holds no run; give a new or empty "
                              "folder") from None
        return None
    except (OSError, UnicodeDecodeError):
        previous = ""
    try:
        name = recipe_mod.tomllib.loads(previous).get("name")
    except ValueError:
        name = None
    if name != recipe.name:
        if name:
            raise RecipeError(f"--out {run_dir} holds the run {name!r}, not {recipe.name!r}; give another --out "
                              "or delete that folder")
        try:  # the recipe file restores the run only where it names it (no --set name=...)
            same = recipe_mod.tomllib.loads(Path(recipe.source_file).read_text()).get("name") == recipe.name
        except (OSError, ValueError):
            same = False
        if not same:
            raise RecipeError(f"--out {run_dir} holds a run whose recipe.toml cannot be read; give another --out "
                              "or delete that folder")
        restore = f"cp {shlex.quote(str(recipe.source_file))} {shlex.quote(str(run_dir / 'recipe.toml'))}"
        raise RecipeError(f"--out {run_dir} holds a run whose recipe.toml cannot be read; if it is this recipe's "
                          f"run, restore that file (`{restore}`: finished jobs are reused), else give another --out "
                          "or delete that folder")
    return previous


def inside_images(folder: Path, recipe: Recipe) -> str | None:
    """'data.path (...)' or 'data.test_path (...)' when ``folder`` lies in the images the recipe reads."""
    return store.inside_images(folder, {key: getattr(recipe.data, key) for key in ("path", "test_path")})


def invalidate(run_dir: Path, recipe: Recipe, previous: str | None, pending: list, new_test: list) -> None:
    """Before the new recipe is written: jobs about to retrain lose their done-marker, and the old
    metrics and combiners go when anything changes (a job, its test images, the recipe), so a refit
    stopped half-way never leaves old results that look current (``predict`` and ``report`` then ask
    for the run to be completed)."""
    for job in pending:
        (store.job_dir(run_dir, job.alias, job.fold) / "done.json").unlink(missing_ok=True)
    if pending or new_test or previous != recipe_mod.dumps(recipe):
        (run_dir / "metrics.json").unlink(missing_ok=True)
        (run_dir / "metrics.csv").unlink(missing_ok=True)
        (run_dir / "combiners" / "index.json").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "report", ignore_errors=True)  # fit (or `report`) writes a new one


def train_members(recipe: Recipe, dataset, folds: np.ndarray, run_dir: Path, pending: list,
                  args: argparse.Namespace) -> None:
    """Train the pending jobs (on the cluster of ``args``, connected by the caller)."""
    data = jobs_mod.SharedData.from_dataset(dataset, folds)
    results = jobs_mod.run_all(
        pending, data, run_dir, args.jobs, args.backend, not args.quiet, gpus_per_job=args.gpus_per_job
    )
    for i, s in enumerate(results, 1):
        print(f"[{i}/{len(pending)}] {s['alias']} fold{s['fold']}: held-out acc {s['val_acc']:.4f}, "
              f"{s['seconds']:.1f} s on {s['device']}", flush=True)


def say_why_retrained_by_version(run_dir: Path, recipe: Recipe, dataset, folds: np.ndarray, pending: list) -> None:
    """A note when jobs retrain because an earlier version of this package trained them
    (``jobs.CACHE_VERSION`` changed), not because the recipe or the images did."""
    older = {(j.alias, j.fold): j.key
             for j in jobs_mod.plan(recipe, dataset.fingerprint, folds, version=jobs_mod.CACHE_VERSION - 1)}
    stale = sum(store.is_done(store.job_dir(run_dir, j.alias, j.fold), older[j.alias, j.fold]) for j in pending)
    if stale:
        print(f"note: {stale} finished job(s) were trained by an earlier version of ensemble, whose training "
              "differs from this one's; they train again", file=sys.stderr)


def say_why_all_retrain(run_dir: Path, dataset) -> None:
    """A note when the run's training images changed since it last trained (every job retrains)."""
    try:
        info = store.read_json(run_dir / "data.json")
        old, channels = info["fingerprint"], int(info["channels"])
    except (store.RunError, ValueError, TypeError, KeyError):
        return
    if old in (dataset.fingerprint, dataset.legacy_fingerprint):
        return
    now = int(dataset.train.x.shape[1])
    why = "" if now == channels else (f" (they are {'RGB' if now == 3 else 'grayscale'} now: grayscale training "
                                      "images become RGB when a test image is in colour)")
    print(f"note: the training images changed since this run last trained{why}; every job trains again",
          file=sys.stderr)


def check_weights(run_dir: Path, jobs: list) -> None:
    """Fail before the run folder changes when a job about to predict new test images lacks a
    weights file (deleted after it finished)."""
    for job in jobs:
        folder = store.job_dir(run_dir, job.alias, job.fold)
        for name in store.weight_files(job.backbone.train.snapshots or 1):
            store.require_weights_file(folder / name, store.retrain_hint(run_dir, folder))


def note_damaged_weights(run_dir: Path, finished: list) -> None:
    """A note for finished jobs whose weights are missing or damaged: fit needs only their logits
    and goes on, but predict could not use them (fit said "done" and predict failed)."""
    damaged = [p for j in finished if (p := store.unreadable_weights(store.job_dir(run_dir, j.alias, j.fold),
                                                                     j.backbone.train.snapshots or 1))]
    if damaged:
        print(f"note: {len(damaged)} finished job(s) lack whole weights, e.g. {damaged[0]} (missing or damaged): "
              f"predict cannot use them; {store.retrain_hint(run_dir, damaged[0].parent)}", file=sys.stderr)


def test_outdated(run_dir: Path, job) -> bool:
    """True when a finished job's test logits are not of the run's current test images, or missing."""
    folder = store.job_dir(run_dir, job.alias, job.fold)
    if not (folder / "test_logits.npy").exists():
        return bool(job.test_key)  # missing (deleted after the job finished): predicted again
    return store.test_key_of(folder) != job.test_key


def predict_new_test(dataset, folds: np.ndarray, run_dir: Path, new_test: list) -> None:
    """Cached jobs whose test images changed predict the new ones with their saved models."""
    if not new_test:
        return
    data = jobs_mod.SharedData.from_dataset(dataset, folds)
    t0 = time.perf_counter()
    devices = sorted({jobs_mod.predict_test(job, data, run_dir) for job in new_test})
    jobs = f"{len(new_test)} cached job{'s' if len(new_test) > 1 else ''}"
    if dataset.test is None:
        print(f"test set removed: dropped the test logits of {jobs}", flush=True)
    else:
        print(f"test set: predicted with the saved models of {jobs} (their test logits were of other images, or "
              f"missing), without retraining ({time.perf_counter() - t0:.1f} s on {', '.join(devices)})", flush=True)


def run(args: argparse.Namespace) -> Path:
    """Everything ``fit`` does; user errors raise :class:`RecipeError`."""
    recipe = recipe_mod.load(args.recipe, args.set)
    try:
        recipe_mod.check_paths(recipe)  # before the paths are made absolute: its message names the folder
        missing = None
    except RecipeError as exc:
        missing = exc
    recipe = recipe_mod.with_absolute_paths(recipe)
    recipe_mod.check_names(recipe)
    build_combiners(recipe)  # a bad [ensemble] section fails now, not after training
    run_dir = args.out or Path("outputs") / recipe.name
    check_out(run_dir, recipe)  # refused before the folder is made
    with run_lock(run_dir):
        for stale in (run_dir / "members").rglob(".*.tmp"):  # a killed fit's half-written files (only fit
            stale.unlink(missing_ok=True)                     # writes members/, and it is locked to this one)
        return _run_locked(args, recipe, run_dir, check_out(run_dir, recipe), missing)  # read again, locked


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on the run folder while fit runs (released when fit ends or dies): a
    second fit on the same --out would train the same jobs again and mix two recipes' files.
    Where there is no ``fcntl`` (Windows), nothing is locked."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".fit.lock"
    handle = store.try_lock(lock)
    if handle is None:
        raise RecipeError(f"--out {run_dir}: another fit is running on this folder; wait for it to end, "
                          "or give another --out") from None
    try:
        yield
    finally:
        if made and [p.name for p in run_dir.iterdir()] == [lock.name]:  # refused before writing anything
            with contextlib.suppress(OSError):
                lock.unlink()
                run_dir.rmdir()
        handle.close()


def _run_locked(args: argparse.Namespace, recipe: Recipe, run_dir: Path, previous: str | None,
                missing: RecipeError | None) -> Path:
    from .data import DataError, NoImagesError, load_dataset, notes_printed

    t0 = time.perf_counter()
    if missing is not None:
        if refit_combiners_only(recipe, run_dir, previous, args, t0, str(missing).split(": ", 1)[-1]):
            return run_dir
        raise missing
    cache = args.cache or default_cache_dir()
    inside = inside_images(cache, recipe)
    if inside:
        raise RecipeError(f"the decoded-image cache {cache} is inside {inside}: its files would be read as "
                          "images; give --cache a folder outside it")
    try:
        with notes_printed():
            dataset = load_dataset(recipe.data, cache, recipe.seed,
                                   progress=not args.quiet)
    except DataError as exc:
        if isinstance(exc, NoImagesError) and refit_combiners_only(recipe, run_dir, previous, args, t0, str(exc)):
            return run_dir  # an empty folder: a disk not mounted at its mount point
        raise recipe.error("data", f"cannot be loaded: {exc}") from None
    check_class_counts(recipe, dataset.train.y.numpy(), dataset.train.classes, dataset.copies)
    note_copies(dataset.copies)
    folds = make_folds(dataset.train.y.numpy(), recipe.cv.folds, recipe.seed, dataset.copies)
    check_fits(recipe, len(dataset.train.classes), len(folds) - int(np.bincount(folds).max()))
    print(f"data: {len(dataset.train.y)} training images, {describe_test_set(dataset)}, "
          f"{len(dataset.train.classes)} classes: {store.class_list(dataset.train.classes)} "
          f"({time.perf_counter() - t0:.1f} s)")
    all_jobs = jobs_mod.plan(recipe, dataset.fingerprint, folds, dataset.test_fingerprint)
    pending = [j for j in all_jobs if not store.is_done(store.job_dir(run_dir, j.alias, j.fold), j.key)]
    new_test = [j for j in all_jobs if j not in pending and test_outdated(run_dir, j)]
    note_damaged_weights(run_dir, [j for j in all_jobs if j not in pending and j not in new_test])
    to_train = {j.alias for j in pending}
    if pending:
        say_why_all_retrain(run_dir, dataset)
        say_why_retrained_by_version(run_dir, recipe, dataset, folds, pending)
    check_backbones(recipe, to_train | {j.alias for j in new_test}, len(dataset.train.classes),
                    int(dataset.train.x.shape[1]), int(dataset.train.x.shape[-1]))
    if args.backend == "loky":  # on a Dask or Ray cluster the workers' devices count, not this machine's
        check_devices(recipe, to_train)
    check_weights(run_dir, new_test)
    # connected before the run folder changes: an unreachable cluster is an error that writes nothing
    with jobs_mod.cluster(args.backend, args.scheduler, args.address) if pending else contextlib.nullcontext():
        invalidate(run_dir, recipe, previous, pending, new_test)  # every check passed: the run folder changes now
        write_run_files(run_dir, recipe, dataset, folds, args.cache)
        print(f"{recipe.name}: {len(all_jobs)} jobs, {len(all_jobs) - len(pending)} cached, {len(pending)} to train")
        train_members(recipe, dataset, folds, run_dir, pending, args)
    predict_new_test(dataset, folds, run_dir, new_test)
    combine_and_report(recipe, run_dir, args)
    print(f"done in {time.perf_counter() - t0:.1f} s: {run_dir}")
    return run_dir


def _what_training_saw(recipe: Recipe) -> Recipe:
    """The recipe without what never shapes a trained job: [ensemble], the speed-only train keys
    and the file it was read from."""
    def steady(t):
        return dataclasses.replace(t, **{k: getattr(recipe_mod.TrainConfig(), k) for k in recipe_mod.PERFORMANCE_KEYS})

    return dataclasses.replace(recipe, ensemble=recipe_mod.EnsembleConfig(), source_file="", train=steady(recipe.train),
                               backbones=tuple(dataclasses.replace(b, train=steady(b.train)) for b in recipe.backbones))


def refit_combiners_only(recipe: Recipe, run_dir: Path, previous: str | None, args: argparse.Namespace,
                         t0: float, why: str) -> bool:
    """Refit the combiners of a finished run whose images are gone (a run folder copied to a laptop,
    a dataset on a disk no longer mounted) when nothing but ``[ensemble]`` (or a speed-only key)
    changed: the cached logits, labels and folds are all they need. False, with nothing written,
    in every other case."""
    if previous is None:
        return False
    try:
        old = recipe_mod.from_dict(recipe_mod.tomllib.loads(previous))
        info = store.read_json(run_dir / "data.json")
        folds = store.read_npy(run_dir / "folds.npy")
    except (ValueError, RecipeError, store.RunError):
        return False
    if _what_training_saw(recipe) != _what_training_saw(old):
        return False  # the images are needed
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list) or folds.ndim != 1 or not len(folds):
        return False
    planned = jobs_mod.plan(recipe, info.get("fingerprint", ""), folds, info.get("test_fingerprint", ""))
    if not all(store.is_done(store.job_dir(run_dir, j.alias, j.fold), j.key) and not test_outdated(run_dir, j)
               for j in planned):
        return False
    print(f"note: the images cannot be loaded ({why}), but the run's jobs are all finished and only [ensemble] "
          "may have changed: refitting the combiners on the cached logits", file=sys.stderr)
    check_fits(recipe, len(info["classes"]), len(folds) - int(np.bincount(folds).max()))
    invalidate(run_dir, recipe, previous, [], [])
    store.write_text(run_dir / "recipe.toml", recipe_mod.dumps(recipe))
    print(f"{recipe.name}: {len(planned)} jobs, {len(planned)} cached, 0 to train")
    combine_and_report(recipe, run_dir, args)
    print(f"done in {time.perf_counter() - t0:.1f} s: {run_dir}")
    return True


def combine_and_report(recipe: Recipe, run_dir: Path, args: argparse.Namespace) -> None:
    """Fit the combiners on the cached OOF logits and write metrics (and the report)."""
    evaluate(recipe, run_dir)
    if not args.no_report:
        from .report import ReportError, write_report

        try:
            print(f"report: {write_report(run_dir)}")
        except ReportError as exc:  # the metrics are written; a job folder lost a file the plots need
            raise store.RunError(f"the report was not written: {exc}") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a cluster scheduler, `timeout`, a closed terminal), stopping fit as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Within: SIGTERM and SIGHUP raise :class:`Terminated`, so the workers are stopped and the
    run left resumable as on Ctrl-C (only in the main thread, where signal handlers can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None))
              if s is not None and signal.getsignal(s) is signal.SIG_DFL]  # `nohup` ignores SIGHUP: so do we
    previous = {s: signal.signal(s, _raise_terminated) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:  # imported: KeyboardInterrupt from here on
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    try:
        with _terminate_as_interrupt():
            run(args)
    except (RecipeError, store.RunError) as exc:  # a bad recipe, a damaged run folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that takes no files, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; finished jobs are kept", file=sys.stderr)
        return 2
    except jobs_mod.ClusterError as exc:
        print(f"error: {' '.join(str(exc).split())}; finished jobs are kept", file=sys.stderr)
        return 2
    except (DivergedError, jobs_mod.JobError) as exc:
        print(f"error: {exc}; finished jobs are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        live_bar = not args.quiet and progress_mod.is_terminal()  # a bar stopped mid-line there; a log's end theirs
        why = f"stopped by {signal.Signals(exc.signum).name}" if isinstance(exc, Terminated) else "interrupted"
        print(f"{chr(10) if live_bar else ''}{why}: finished jobs are kept; run the same command again to resume",
              file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
