"""Fit the combiners on the cached OOF logits and score members and combiners honestly.

Members are scored on their OOF logits. A combiner is scored on nested
out-of-fold probabilities (:func:`ensemble.combiners.cross_val_proba` over the
saved folds), then refitted on every OOF row for the test set and for
``predict``. Nothing here trains a network: a rerun with a changed
``[ensemble]`` section takes seconds.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np

from . import combiners as comb
from . import metrics, store
from .combiner_store import save_combiner, saved_form
from .recipe import Recipe

SCALARS = ("accuracy", "precision", "recall", "f1", "f1_weighted", "nll", "brier", "ece")


def split_metrics(proba: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Scalar metrics plus confusion matrix, per-class report and reliability bins."""
    out = metrics.score(proba, y, len(classes))
    out.update(metrics.details(proba, y, classes))
    out["reliability"] = metrics.reliability(proba, y)
    return out


def _combiner_params(recipe: Recipe, name: str) -> dict:
    base = name.removesuffix(comb.TS_SUFFIX)
    e = recipe.ensemble
    if base == "weighted":
        return {"method": e.weighted.method, "rounds": e.weighted.rounds}
    if base == "stacking":
        return {"meta_learner": e.meta_learner, "meta_params": dict(e.meta_params)}
    return {}


def build_combiners(recipe: Recipe) -> dict[str, comb.Combiner]:
    """Unfitted combiners of the recipe (plus ``+ts`` variants when ``calibrate``)."""
    names = list(recipe.ensemble.combiners)
    if recipe.ensemble.calibrate:
        names += [n + comb.TS_SUFFIX for n in recipe.ensemble.combiners]
    out = {}
    for name in names:
        try:
            out[name] = comb.make_combiner(name, **_combiner_params(recipe, name))
        except (ValueError, TypeError) as exc:
            raise recipe.error("ensemble", f"cannot build combiner {name!r}: {exc}") from None
    return out


def check_fits(recipe: Recipe, n_classes: int, fit_rows: int) -> None:
    """Fit every learning combiner once on random logits, before any training.

    scikit-learn refuses some meta_params only when fitting (a ``class_weight`` naming no
    class) or predicting (k-NN's ``n_neighbors`` above the rows), and some values cannot be
    saved (``C = inf``): all fail here, in a second, not after the training. ``fit_rows`` is
    the fewest rows a nested fit sees; k-NN, whose fit only stores rows, is tried on that
    many, the other meta-learners on at most 500.
    """
    n_members = sum(b.train.snapshots if recipe.ensemble.members == "snapshots" and b.train.snapshots else 1
                    for b in recipe.backbones)
    knn = recipe.ensemble.meta_learner == "knn"
    y = np.arange(fit_rows if knn else max(min(fit_rows, 500), 2 * n_classes)) % n_classes
    logits = np.random.default_rng(0).normal(size=(n_members, len(y), n_classes))
    for name, combiner in build_combiners(recipe).items():
        if combiner.learns:
            with warnings.catch_warnings():  # random logits: a convergence warning says nothing
                warnings.simplefilter("ignore")
                _fitted(recipe, name, "", _try, combiner.clone(), logits, y)


def _try(combiner: comb.Combiner, logits: np.ndarray, y: np.ndarray) -> None:
    combiner.fit(logits, y).predict_proba(logits[:, :2])  # k-NN checks n_neighbors when it predicts
    saved_form(combiner)


_KEPT = "; the trained members are kept: change [ensemble] and rerun, nothing retrains"


def _fitted(recipe: Recipe, name: str, after: str, step, *args):
    """``step(*args)``, with a combiner's refusal turned into a one-line recipe error (+ ``after``)."""
    try:
        return step(*args)
    except (ValueError, TypeError) as exc:
        why = " ".join(str(exc).split())
        raise recipe.error("ensemble", f"combiner {name!r} cannot be fitted: {why}{after}") from None


def member_sets(recipe: Recipe, run_dir: Path) -> tuple[store.Logits, dict[str, store.Logits]]:
    """The members every combiner sees, and each snapshot backbone's snapshots.

    Every fold file is read once (all snapshots); both views are selections of it.
    """
    every = store.load_logits(run_dir, [b.alias for b in recipe.backbones])
    names, snaps = [], {}
    for b in recipe.backbones:
        own = [n for n in every.names if store.base_alias(n) == b.alias]
        if b.train.snapshots:
            snaps[b.alias] = store.select(every, own)
        names += own if recipe.ensemble.members == "snapshots" else [b.alias]
    return store.select(every, names), snaps


def _inputs_for(name: str, members: store.Logits, snaps: dict[str, store.Logits]) -> dict[str, store.Logits]:
    """Result name -> the logits a combiner is fitted on (one per snapshot backbone for ``snapshot``)."""
    if name.removesuffix(comb.TS_SUFFIX) != "snapshot":
        return {name: members}
    if len(snaps) == 1:
        return {name: next(iter(snaps.values()))}
    return {f"{name}:{alias}": logits for alias, logits in snaps.items()}


def evaluate(recipe: Recipe, run_dir: Path, quiet: bool = False) -> dict:
    """Write combiners/, metrics.json and metrics.csv for a run whose jobs are all done."""
    run_dir = Path(run_dir)
    classes = store.read_json(run_dir / "data.json")["classes"]
    members, snaps = member_sets(recipe, run_dir)
    result: dict = {"members": {}, "combiners": {}, "member_names": members.names, "classes": classes}
    for i, name in enumerate(members.names):
        result["members"][name] = _score_splits(members, metrics.softmax(members.oof[i]),
                                               None if members.test is None else metrics.softmax(members.test[i]),
                                               classes)
    index, nested = {}, {}
    for base_name, combiner in build_combiners(recipe).items():
        for name, logits in _inputs_for(base_name, members, snaps).items():
            oof = _fitted(recipe, name, _KEPT, comb.cross_val_proba, combiner, logits.oof, logits.y, logits.folds)
            fitted = _fitted(recipe, name, _KEPT, combiner.clone().fit, logits.oof, logits.y)
            test = None if logits.test is None else fitted.predict_proba(logits.test)
            save_combiner(fitted, run_dir / "combiners", _file_name(name))
            index[name] = {"file": _file_name(name), "members": logits.names}
            result["combiners"][name] = _score_splits(logits, oof, test, classes)
            nested[name] = oof
    result["best"] = max(result["combiners"], key=lambda n: rank(result["combiners"][n]), default=None)
    result["choice_accuracy"] = choice_accuracy(nested, members.y, members.folds) if nested else None
    store.write_json(run_dir / "combiners" / "index.json", {"best": result["best"], "combiners": index})
    keep = {entry["file"] for entry in index.values()} | {"index"}
    for old in (run_dir / "combiners").glob("*"):  # a combiner dropped from the recipe leaves no state
        if old.suffix in (".json", ".npz") and old.stem not in keep:
            old.unlink()
    store.write_json(run_dir / "metrics.json", result)
    store.write_text(run_dir / "metrics.csv", to_csv(result))
    if not quiet:
        print(table(result))
    return result


def _file_name(name: str) -> str:
    return name.replace(":", "-").replace("+", "_")


def rank(entry: dict) -> tuple[float, float]:
    """How fit picks the best: OOF accuracy, then OOF log-loss (an entry of metrics.json)."""
    oof = entry["oof"]
    return _rank_by(oof["accuracy"], oof["nll"])


def _rank_by(accuracy: float, nll: float) -> tuple[float, float]:
    return (accuracy, -nll)


def choice_accuracy(nested: dict[str, np.ndarray], y: np.ndarray, folds: np.ndarray) -> float:
    """The OOF accuracy of picking the best combiner, the pick itself scored nested.

    The best combiner's own nested accuracy is the largest of several estimates, so it reads
    high (the winner's curse). Here each fold's rows are predicted by the combiner that ranks
    best (accuracy, then NLL, as :func:`rank`) on the other folds' nested rows only.
    """
    hits = 0
    for k in np.unique(folds):
        pick, held = folds != k, folds == k
        best = max(nested, key=lambda n: _rank_by(float((nested[n][pick].argmax(axis=1) == y[pick]).mean()),
                                                  metrics.nll(nested[n][pick], y[pick])))
        hits += int((nested[best][held].argmax(axis=1) == y[held]).sum())
    return hits / len(y)


def _score_splits(logits: store.Logits, oof: np.ndarray, test: np.ndarray | None, classes: list[str]) -> dict:
    out = {"oof": split_metrics(oof, logits.y, classes)}
    if test is not None:
        out["test"] = split_metrics(test, logits.y_test, classes)
    return out


def rows(result: dict):
    """(kind, name, split, scalar metrics) for every member and combiner."""
    for kind in ("members", "combiners"):
        for name, splits in result[kind].items():
            for split, values in splits.items():
                yield kind.rstrip("s"), name, split, {k: values[k] for k in SCALARS}


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["kind", "name", "split", *SCALARS])
    for kind, name, split, values in rows(result):
        writer.writerow([kind, name, split, *(f"{values[k]:.6f}" for k in SCALARS)])
    return buf.getvalue()


def table(result: dict) -> str:
    """The end-of-fit table: OOF (nested for combiners) and test accuracy, macro F1, NLL."""
    has_test = any("test" in s for s in result["members"].values())
    # names are never cut: two aliases of up to 100 characters may share their first 28
    w = max([28] + [len(n) for kind in ("members", "combiners") for n in result[kind]])
    head = f"{'':9} {'name':{w}} {'oof acc':>8} {'oof f1':>7} {'oof nll':>8}"
    head += f" {'test acc':>8} {'test f1':>7} {'test nll':>8}" if has_test else ""
    lines = [head, "-" * len(head)]
    for kind in ("members", "combiners"):
        # best first, as the best combiner is picked: OOF accuracy, then OOF NLL
        for name, s in sorted(result[kind].items(), key=lambda kv: rank(kv[1]), reverse=True):
            line = f"{kind.rstrip('s'):9} {name:{w}} {s['oof']['accuracy']:8.4f} {s['oof']['f1']:7.4f} "
            line += f"{s['oof']['nll']:8.4f}"
            if "test" in s:
                line += f" {s['test']['accuracy']:8.4f} {s['test']['f1']:7.4f} {s['test']['nll']:8.4f}"
            lines.append(line)
    if result.get("best"):
        lines.append(f"best combiner by nested OOF accuracy: {result['best']}")
    if result.get("choice_accuracy") is not None:
        lines.append(f"picking the best this way, scored nested too: {result['choice_accuracy']:.4f} OOF accuracy")
    return "\n".join(lines)
