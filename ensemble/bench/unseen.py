"""A second held-out check of a finished run: its source's images that the run never used.

    python -m ensemble.bench unseen RUN [--images-per-class 500] [--path ARCHIVE] [--device auto]

A run with ``data.source = "folder"`` and ``data.per_class = P`` trains, cross-validates and
tests on the first P images of every class only. The images after those (P+1 .. P+n of each
class, in the same source order, passing over copies of the run's images) were seen by no model
and no combiner, so they are a fresh held-out set, drawn from the same source: this benchmark
scores every member (the mean of its fold models, as predict does) and every fitted combiner on
them, beside their accuracy on the run's own test part. With a few thousand images per set,
accuracies move by about a point between two such sets by chance alone (binomial standard error
near 0.8 points at 3,000 images and 72%); comparing the two sets shows how much of a gap is that
noise.

Before scoring, the run's subset is rebuilt from the source and its fingerprint checked
against ``data.json``: a changed or different archive is refused, not silently scored. An
unfinished run (no metrics.json, no fitted combiner, a fold not done) is refused before any image
is decoded. A note names the classes with fewer unseen images than asked (or none).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ensemble import data, metrics, predict, store
from ensemble.bench._args import check_at_least
from ensemble.evaluate import rank
from ensemble.fit import default_cache_dir
from ensemble.recipe import RecipeError, check_paths, load
from ensemble.store import RunError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.bench unseen", description=store.summary(__doc__))
    p.add_argument("run", type=Path, help="a finished run folder of a folder-source recipe with data.per_class > 0")
    p.add_argument("--images-per-class", type=int, default=500,
                   help="unseen images scored per class (default 500; fewer where a class has fewer left)")
    p.add_argument("--path", help="the run's image folder or archive, where it has moved (default: the recipe's data.path)")
    p.add_argument("--cache", type=Path, help="decoded-image cache (default: fit's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    args = p.parse_args(argv)
    check_at_least(p, args, {"images_per_class": 1})
    return args


def unseen_indices(y: np.ndarray, per_class: int, n: int, skip: np.ndarray | None = None) -> np.ndarray:
    """Indices of the first ``n`` images of every class after its first ``per_class``, in source
    order (sorted), passing over the rows where ``skip`` is True.

    ``data.keep_per_class`` keeps images ``0 .. per_class - 1`` of each class, so none is shared.
    """
    chosen = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)[per_class:]
        chosen.append((rows if skip is None else rows[~skip[rows]])[:n])
    return np.sort(np.concatenate(chosen))


def copies_of_used(source: data.Images, source_test: data.Images | None, per_class: int) -> np.ndarray:
    """True for each source image with the same pixels as an image the run used (its first
    ``per_class`` of a class, or its test folder): a copy is not unseen."""
    digests = data.row_digests(source.x)
    used = {digests[i] for i in unseen_indices(source.y.numpy(), 0, per_class)}
    if source_test is not None:
        used |= set(data.row_digests(source_test.x))
    return np.array([d in used for d in digests], dtype=bool)


def data_config(run: predict.Run, path: str | None):
    """The run's [data] section (predict ignores it) and seed; the data must be a per_class subset of a folder."""
    try:  # --path replaces data.path before the recipe is checked: the old path may be gone
        recipe = load(run.dir / "recipe.toml", [f"data.path={json.dumps(path)}"] if path else [])
        check_paths(recipe)
    except (OSError, RecipeError) as exc:
        hint = "" if path else "; give the run's images with --path"
        raise RunError(f"{run.dir}: {exc}{hint}") from None
    cfg = recipe.data
    if cfg.source != "folder" or cfg.per_class <= 0:
        raise RunError(
            f"{run.dir}: data.source = {cfg.source!r}, data.per_class = {cfg.per_class}: only a folder-source "
            "run that kept the first data.per_class images of every class leaves unseen images to score"
        )
    return cfg, recipe.seed


def check_finished(run: predict.Run) -> tuple[dict, dict, dict[str, predict.Member]]:
    """Cheap checks before any image is decoded: metrics.json, the fitted combiners and every fold of
    every member they need are there. Returns (metrics.json, {name: load_method(...)}, {name: Member})."""
    if not (run.dir / "metrics.json").is_file():
        raise RunError(f"{run.dir}: no metrics.json: the run is unfinished; complete it with "
                       f"`{predict.fit_command(run.dir)}`")
    recorded = store.read_json(run.dir / "metrics.json")
    if not run.combiners:
        raise RunError(f"{run.dir}: no fitted combiner; complete it with `{predict.fit_command(run.dir)}`")
    fitted = {name: predict.load_method(run, name) for name in run.combiners}
    # the members fit scored, under metrics.json's names (`alias@s<i>` with ensemble.members = "snapshots")
    members = {name: predict.resolve_member(run, name) for name in recorded.get("members", {})}
    members |= {m.name: m for _, _, ms in fitted.values() for m in ms}
    for m in members.values():
        for k in range(run.recipe.cv.folds):
            predict.require_finished(run, m.backbone.alias, k)
    return recorded, fitted, members


def load_unseen(run: predict.Run, cfg, seed: int, cache: Path, per_class_n: int, progress: bool = True) -> data.Images:
    """Rebuild the run's subset from the source (fingerprint checked), then take the images after it,
    with the run's channels (a grayscale source becomes RGB where the run's test images made it so)."""
    try:
        with data.notes_printed():
            source, source_test = data.read_source(cfg, cache, progress)
        used = data.select(source, source_test, cfg, seed)
    except data.DataError as exc:
        raise RunError(str(exc)) from None
    recorded = store.read_json(run.dir / "data.json").get("fingerprint")
    if recorded not in (used.fingerprint, used.legacy_fingerprint or None):  # legacy: a run from before 2026-11
        raise RunError(
            f"{cfg.path}: the images it gives for this recipe (fingerprint {used.fingerprint}) are not the "
            f"ones the run used ({recorded}, data.json); give the run's own folder or archive with --path"
        )
    copies = copies_of_used(source, source_test, cfg.per_class)
    after = unseen_indices(source.y.numpy(), cfg.per_class, len(source.y))
    if copies[after].any():
        n = int(copies[after].sum())
        print(f"note: {n} image{' is a copy' if n == 1 else 's are copies'} of images the run used (the same pixels); "
              "passed over", file=sys.stderr)
    idx = unseen_indices(source.y.numpy(), cfg.per_class, per_class_n, skip=copies)
    if not len(idx):
        raise RunError(f"{cfg.path}: no class has more than data.per_class = {cfg.per_class} images; nothing is unseen")
    unseen = data._subset(source, idx)
    return data.Images(data._to_channels(unseen.x, run.data.channels), unseen.y, unseen.classes)


def short_classes_note(images: data.Images, classes: tuple[str, ...], per_class_n: int) -> str | None:
    """A note naming the classes with fewer than ``per_class_n`` unseen images (or none), else None."""
    counts = np.bincount(images.y.numpy(), minlength=len(classes))
    none = [classes[c] for c in np.flatnonzero(counts == 0)]
    fewer = [f"{classes[c]} ({counts[c]})" for c in np.flatnonzero((counts > 0) & (counts < per_class_n))]

    def listed(names):
        return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    parts = ([f"{len(none)} of {len(classes)} classes have no unseen images: {listed(none)}"] if none else []) + \
            ([f"{len(fewer)} have fewer than {per_class_n}: {listed(fewer)}"] if fewer else [])
    if not parts:
        return None
    return "; ".join(parts) + ": the unseen accuracies weigh the classes unlike the run's test part"


def evaluate(run: predict.Run, images: data.Images, device: torch.device, checked=None,
             progress: bool = False) -> dict[str, dict]:
    """Metrics on ``images`` of every member (final model) and every fitted combiner.

    ``checked``: :func:`check_finished`'s result, when already taken."""
    recorded, fitted, members = checked or check_finished(run)
    by_weights = {}  # `alias` and `alias@sS` (the final snapshot) are the same models: predicted once
    todo = list(dict.fromkeys((m.backbone.alias, m.weights) for m in members.values()))
    for m in members.values():
        key = (m.backbone.alias, m.weights)
        if key not in by_weights:  # one member's fold models in memory at a time
            if progress:
                print(f"predicting {m.name} ({len(by_weights) + 1}/{len(todo)}): {run.recipe.cv.folds} fold models",
                      file=sys.stderr, flush=True)
            models = predict.load_members(run, [m], device)
            by_weights[key] = predict.member_logits(models, images.x, run.data.mean, run.data.std, device,
                                                    progress=progress)[0]
    logits = {name: by_weights[(m.backbone.alias, m.weights)] for name, m in members.items()}
    y, n_classes = images.y.numpy(), len(run.data.classes)
    out = {"members": {}, "combiners": {}, "right": {"members": {}, "combiners": {}}}
    for name in recorded.get("members", {}):  # the rows of fit's table, as metrics.json names them
        out["members"][name] = metrics.score(metrics.softmax(logits[name]), y, n_classes)
        out["right"]["members"][name] = logits[name].argmax(1) == y
    for name, (_, combiner, members) in fitted.items():
        proba = combiner.predict_proba(np.stack([logits[m.name] for m in members]))
        out["combiners"][name] = metrics.score(proba, y, n_classes)
        out["right"]["combiners"][name] = proba.argmax(1) == y
    return out


def paired_gain(combiner_right: np.ndarray, member_right: np.ndarray) -> tuple[float, float, int, int]:
    """(gain, its paired standard error, both in points; images only the combiner gets right, only the
    member): the two are scored on the same images, so only the images they disagree on make noise."""
    n = len(combiner_right)
    only_c, only_m = int((combiner_right & ~member_right).sum()), int((~combiner_right & member_right).sum())
    se = math.sqrt(max(only_c + only_m - (only_c - only_m) ** 2 / n, 0.0)) / n
    return 100 * (only_c - only_m) / n, 100 * se, only_c, only_m


def table(result: dict, recorded: dict, n: int) -> str:
    """Member and combiner rows: test accuracy (the run's metrics.json) beside unseen accuracy, F1, NLL."""
    lines = [f"{'':9s} {'name':28s} {'test acc':>9s} {'unseen acc':>11s} {'unseen f1':>10s} {'unseen nll':>11s}",
             "-" * 82]
    for kind in ("members", "combiners"):
        # in fit's order (by OOF rank): sorting by unseen accuracy would read as a choice made on them
        for name, m in sorted(result[kind].items(), key=lambda kv: rank(recorded[kind][kv[0]]), reverse=True):
            test = recorded[kind][name].get("test", {}).get("accuracy")
            test_text = f"{test:9.4f}" if test is not None else f"{'-':>9s}"
            lines.append(f"{kind[:-1]:9s} {name:28s} {test_text} {m['accuracy']:11.4f} {m['f1']:10.4f} {m['nll']:11.4f}")
    # chosen as fit chose them, on OOF rows: picking by unseen accuracy would select on the set it scores
    best = {kind: max(result[kind], key=lambda name: rank(recorded[kind][name])) for kind in ("members", "combiners")}
    gain = 100 * (result["combiners"][best["combiners"]]["accuracy"] - result["members"][best["members"]]["accuracy"])
    lines.append(f"on {n} unseen images the best combiner by nested OOF accuracy ({best['combiners']}) is "
                 f"{gain:+.2f} points against the best member by OOF accuracy ({best['members']})")
    right = result.get("right")
    if right:
        _, se, only_c, only_m = paired_gain(right["combiners"][best["combiners"]], right["members"][best["members"]])
        lines.append(f"paired standard error of that gain: {se:.2f} points ({only_c} images only the combiner gets "
                     f"right, {only_m} only the member)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        run = predict.load_run(args.run)
        checked = check_finished(run)  # before the expensive part: decoding and predicting
        cfg, seed = data_config(run, args.path)
        device = predict.inference_device(args.device)
        images = load_unseen(run, cfg, seed, args.cache or default_cache_dir(), args.images_per_class,
                             progress=not args.quiet)
        note = short_classes_note(images, run.data.classes, args.images_per_class)
        if note:
            print(f"note: {note}", file=sys.stderr)
        result = evaluate(run, images, device, checked, progress=not args.quiet)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(table(result, checked[0], len(images.y)))
    return 0
