"""``python -m ensemble.fit RECIPE``: train every (backbone, fold) job, then fit the combiners.

Finished jobs are read back from the run folder, so a rerun (after a crash, a
kill or a changed ``[ensemble]`` section) trains only what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import jobs as jobs_mod
from . import recipe as recipe_mod
from . import store
from .evaluate import build_combiners, evaluate
from .recipe import Recipe, RecipeError
from .train import DivergedError, resolve_device


def default_cache_dir() -> Path:
    env = os.environ.get("ENSEMBLE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ensemble"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.fit", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="a TOML recipe, e.g. recipes/digits_5fold.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: outputs/<recipe name>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="(backbone, fold) jobs run at once (default 1); ignored on Dask; on Ray it caps the "
                        "pool (1 = the whole cluster)")
    p.add_argument("--gpus-per-job", type=float, default=1.0,
                   help="GPU share a job asks a Dask/Ray cluster for (default 1; 0.25 = four jobs per card)")
    p.add_argument("--backend", choices=("loky", "dask", "ray"), default="loky",
                   help="joblib backend: local processes (loky), or a Dask / Ray cluster")
    p.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786 (with --backend dask)")
    p.add_argument("--address", help="Ray cluster address, e.g. HOST:6379 (with --backend ray)")
    p.add_argument("--cache", type=Path, default=None, help="decoded-image cache (default: ~/.cache/ensemble)")
    p.add_argument("--no-report", action="store_true", help="skip writing report/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if not args.gpus_per_job > 0:
        p.error(f"--gpus-per-job must be > 0, got {args.gpus_per_job}")
    return args


def make_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """One stratified k-fold split: the fold index (0..k-1) of every row, shape (N,)."""
    from sklearn.model_selection import StratifiedKFold

    folds = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y)):
        folds[held_out] = fold
    return folds


def check_class_counts(recipe: Recipe, y: np.ndarray, classes) -> None:
    counts = np.bincount(y, minlength=len(classes))
    worst = int(counts.argmin())
    if counts[worst] < recipe.cv.folds:
        raise recipe.error(
            "cv.folds",
            f"= {recipe.cv.folds} needs at least that many training images per class, "
            f"but class {classes[worst]!r} has {counts[worst]}; lower cv.folds or add images",
        )


def write_run_files(run_dir: Path, recipe: Recipe, dataset, folds: np.ndarray) -> None:
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
        "mean": list(dataset.mean),
        "std": list(dataset.std),
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


def train_members(recipe: Recipe, dataset, folds: np.ndarray, run_dir: Path, args: argparse.Namespace) -> None:
    all_jobs = jobs_mod.plan(recipe, dataset.fingerprint, folds)
    pending = [j for j in all_jobs if not store.is_done(store.job_dir(run_dir, j.alias, j.fold), j.key)]
    recipe_mod.check_backbone_names(recipe, {j.alias for j in pending})
    if args.backend == "loky":  # on a Dask or Ray cluster the workers' devices count, not this machine's
        check_devices(recipe, {j.alias for j in pending})
    print(f"{recipe.name}: {len(all_jobs)} jobs, {len(all_jobs) - len(pending)} cached, {len(pending)} to train")
    data = jobs_mod.SharedData.from_dataset(dataset, folds)
    with jobs_mod.cluster(args.backend, args.scheduler, args.address):
        results = jobs_mod.run_all(
            pending, data, run_dir, args.jobs, args.backend, not args.quiet, gpus_per_job=args.gpus_per_job
        )
        for i, s in enumerate(results, 1):
            print(f"[{i}/{len(pending)}] {s['alias']} fold{s['fold']}: held-out acc {s['val_acc']:.4f}, "
                  f"{s['seconds']:.1f} s on {s['device']}", flush=True)


def run(args: argparse.Namespace) -> Path:
    """Everything ``fit`` does; user errors raise :class:`RecipeError`."""
    from .data import DataError, load_dataset

    recipe = recipe_mod.load(args.recipe, args.set)
    recipe_mod.check_names(recipe)
    build_combiners(recipe)  # a bad [ensemble] section fails now, not after training
    run_dir = args.out or Path("outputs") / recipe.name
    t0 = time.perf_counter()
    try:
        dataset = load_dataset(recipe.data, args.cache or default_cache_dir(), recipe.seed, progress=not args.quiet)
    except DataError as exc:
        raise recipe.error("data", f"cannot be loaded: {exc}") from None
    check_class_counts(recipe, dataset.train.y.numpy(), dataset.train.classes)
    folds = make_folds(dataset.train.y.numpy(), recipe.cv.folds, recipe.seed)
    write_run_files(run_dir, recipe, dataset, folds)
    print(f"data: {len(dataset.train.y)} training images, "
          f"{0 if dataset.test is None else len(dataset.test.y)} test, {len(dataset.train.classes)} classes "
          f"({time.perf_counter() - t0:.1f} s)")
    train_members(recipe, dataset, folds, run_dir, args)
    combine_and_report(recipe, run_dir, args)
    print(f"done in {time.perf_counter() - t0:.1f} s: {run_dir}")
    return run_dir


def combine_and_report(recipe: Recipe, run_dir: Path, args: argparse.Namespace) -> None:
    """Fit the combiners on the cached OOF logits and write metrics (and the report)."""
    evaluate(recipe, run_dir)
    if not args.no_report:
        from .report import write_report

        print(f"report: {write_report(run_dir)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DivergedError as exc:
        print(f"error: {exc}; finished jobs are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished jobs are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
