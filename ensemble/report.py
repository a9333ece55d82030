"""The generated report of a finished run: PNG plots and one self-contained ``index.html``.

    python -m ensemble.report outputs/<run> [--out DIR]

Everything is drawn from what the run cached (labels, folds, per-fold OOF logits, histories,
metrics.json, combiners/weighted.json); no combiner is refitted here.  Figures are built as
``matplotlib.figure.Figure`` objects on the Agg canvas, never through pyplot's global state, so
``build_figures`` can be inspected (e.g. for label overlaps) before ``write_report`` saves them.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ensemble import store
from ensemble.combiners import TS_SUFFIX
from ensemble.metrics import ece, reliability, softmax
from ensemble.recipe import tomllib

DPI = 110
MEMBER_COLORS = ("#1f77b4", "#9ecae1")     # OOF, test
COMBINER_COLORS = ("#d95f02", "#fdae6b")   # OOF, test
TRAIN_COLOR, HELD_OUT_COLOR = "#1f77b4", "#d62728"
MAX_LABEL = 22                             # characters kept of a tick label


class ReportError(ValueError):
    """The run folder is incomplete or inconsistent, so no report can be drawn."""


@dataclass(frozen=True)
class Run:
    """What the report reads from a run folder.

    y, folds: (N,) int64; oof_logits: (n_members, N, C) float32, row-aligned with y;
    histories: alias -> one list of epoch dicts per fold; order: greedy selection order
    (indices into member_names) or None when combiners/weighted.json has none; best_size:
    how many of those rounds the weighted combiner kept (None if not recorded).
    """
    path: Path
    name: str
    recipe_text: str
    metrics: dict
    member_names: list
    classes: list
    y: np.ndarray
    folds: np.ndarray
    oof_logits: np.ndarray
    histories: dict
    snapshot_epochs: dict
    order: list | None
    best_size: int | None = None

    @cached_property
    def recipe(self) -> dict:
        """The run's recipe as a table, parsed once ({} if it does not parse)."""
        try:
            return tomllib.loads(self.recipe_text)
        except tomllib.TOMLDecodeError:
            return {}


# ----------------------------------------------------------------------------- reading a run

def _need(path: Path, run_dir: Path, hint: Callable[[], str] | None = None) -> Path:
    """``path``, or a ReportError ending with ``hint()`` (default: finish the run)."""
    if not path.is_file():
        what = hint() if hint else (f"the run is incomplete; finish it with `{store.fit_command(run_dir)}` "
                                    "(cached jobs are reused), then retry")
        raise ReportError(f"{path} is missing: {what}")
    return path


def _read_json(path: Path, run_dir: Path, hint: Callable[[], str] | None = None) -> dict:
    _need(path, run_dir, hint)  # outside the try: its ReportError is a ValueError too
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        what = hint() if hint else f"rewrite it with `{store.fit_command(run_dir)}` (cached jobs are reused)"
        raise ReportError(f"{path} is not valid JSON ({exc}); {what}") from None


def _aliases(member_names: list) -> list:
    """Distinct backbone aliases in member order."""
    return list(dict.fromkeys(map(store.base_alias, member_names)))


def _check_metrics(path: Path, metrics: dict) -> None:
    rerun = f"rerun `{store.fit_command(path.parent)}` to rewrite it"
    if not isinstance(metrics, dict):
        raise ReportError(f"{path} holds no metrics object (a JSON {type(metrics).__name__}); {rerun}")
    for key in ("member_names", "members", "classes"):
        if key not in metrics:
            raise ReportError(f"{path} has no {key!r} key (keys: {sorted(metrics)}); {rerun}")
    for key in ("member_names", "classes"):
        if not isinstance(metrics[key], list) or not all(isinstance(n, str) for n in metrics[key]):
            raise ReportError(f"{path}: {key!r} is not a list of names; {rerun}")
    for kind in ("members", "combiners"):
        entries = metrics.get(kind, {})
        if not isinstance(entries, dict):
            raise ReportError(f"{path}: {kind!r} is not an object; {rerun}")
        for name, splits in entries.items():
            if not (isinstance(splits, dict) and isinstance(splits.get("oof"), dict)
                    and isinstance(splits.get("test", {}), dict)):
                raise ReportError(f"{path}: {kind} entry {name!r} is not an object with 'oof' scores; {rerun}")


def _oof_matrix(run_dir: Path, names: list) -> np.ndarray:
    """(n_members, N, C) OOF logits of the members ``names``, read through the run store."""
    try:
        return store.select(store.load_logits(run_dir, _aliases(names), with_test=False), names).oof
    except store.RunError as exc:
        raise ReportError(str(exc)) from None


def _histories(run_dir: Path, aliases: list, n_folds: int) -> tuple[dict, dict]:
    """alias -> [epoch dicts per fold], alias -> sorted snapshot epochs (union over folds)."""
    hist, snaps = {}, {}
    for alias in aliases:
        folders = [store.job_dir(run_dir, alias, k) for k in range(n_folds)]
        per_fold = [_read_json(d / "history.json", run_dir, partial(store.retrain_hint, run_dir, d)) for d in folders]
        for d, h in zip(folders, per_fold):
            if not isinstance(h, dict):
                raise ReportError(f"{d / 'history.json'} holds no history object; {store.retrain_hint(run_dir, d)}")
        hist[alias] = [h.get("epochs", []) for h in per_fold]
        snaps[alias] = sorted({int(e) for h in per_fold for e in h.get("snapshot_epochs", [])})
    return hist, snaps


def _greedy_order(run_dir: Path, n_members: int) -> tuple[list | None, int | None]:
    """The weighted combiner's selection order and kept prefix length, (None, None) if absent.

    Reads state "order_" (as ensemble.combiners.Weighted saves it) or "order", and "best_size_".
    """
    path = run_dir / "combiners" / "weighted.json"
    if not path.is_file():
        return None, None
    doc = _read_json(path, run_dir)
    state = doc.get("state") if isinstance(doc, dict) else None
    if not isinstance(state, dict):
        return None, None
    order = state.get("order_", state.get("order"))
    if not order or not all(isinstance(i, int) and 0 <= i < n_members for i in order):
        return None, None
    size = state.get("best_size_")
    return list(order), size if isinstance(size, int) and 1 <= size <= len(order) else None


def load_run(run_dir) -> Run:
    """Read everything the report needs; raises ReportError naming the first missing file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist; pass outputs/<run> of a fitted run")
    try:
        store.require_run_folder(run_dir)
    except store.RunError as exc:
        raise ReportError(str(exc)) from None
    metrics_path = run_dir / "metrics.json"
    metrics = _read_json(metrics_path, run_dir)
    _check_metrics(metrics_path, metrics)
    try:
        y = store.read_npy(_need(run_dir / "labels.npy", run_dir))
        folds = store.read_npy(_need(run_dir / "folds.npy", run_dir))
    except store.RunError as exc:
        raise ReportError(f"{exc}; rewrite it with `{store.fit_command(run_dir)}`") from None
    if y.shape != folds.shape or y.ndim != 1:
        raise ReportError(f"labels.npy {y.shape} and folds.npy {folds.shape} must be (N,) of equal "
                          f"length; rerun `{store.fit_command(run_dir)}`")
    names, classes = list(metrics["member_names"]), list(metrics["classes"])
    try:
        recipe_text = _need(run_dir / "recipe.toml", run_dir).read_text()
    except UnicodeDecodeError as exc:
        raise ReportError(f"{run_dir / 'recipe.toml'} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    hist, snaps = _histories(run_dir, _aliases(names), int(folds.max()) + 1)
    order, best_size = _greedy_order(run_dir, len(names))
    oof = _oof_matrix(run_dir, names)
    if oof.shape[-1] != len(classes):
        raise ReportError(f"the members' OOF logits have {oof.shape[-1]} classes, metrics.json names "
                          f"{len(classes)}; rerun `{store.fit_command(run_dir)}`")
    return Run(path=run_dir, name=_run_name(run_dir, recipe_text),
               recipe_text=recipe_text, metrics=metrics, member_names=names, classes=classes,
               y=y.astype(np.int64), folds=folds.astype(np.int64),
               oof_logits=oof,
               histories=hist, snapshot_epochs=snaps, order=order, best_size=best_size)


def _run_name(run_dir: Path, recipe_text: str) -> str:
    try:
        return str(tomllib.loads(recipe_text).get("name", run_dir.name))
    except tomllib.TOMLDecodeError:
        return run_dir.name


# ----------------------------------------------------------------------------- small helpers

def _short(name: str, width: int = MAX_LABEL) -> str:
    """Abbreviate a long label in the middle, keeping its tail (e.g. '@s3', '_v2')."""
    if len(name) <= width:
        return name
    tail = min(8, width // 3)
    return f"{name[:width - tail - 1]}…{name[-tail:]}"


def _keep_middle(name: str, pre: int, suf: int, width: int) -> str:
    """Abbreviate ``name`` in its first ``pre`` and last ``suf`` characters (the part several names
    share) rather than in between, where they differ."""
    mid = name[pre:len(name) - suf]
    room = max(width - min(len(mid), width // 2) - 2, 0)     # what the shared ends may keep
    head, tail = name[:min(pre, room - room // 2)], name[len(name) - min(suf, room // 2):]
    head += "…" if len(head) < pre else ""
    tail = ("…" if len(tail) < suf else "") + tail
    return head + _short(mid, max(width - len(head) - len(tail), 1)) + tail


def _shorts(names: list, width: int = MAX_LABEL, key: dict | None = None) -> list:
    """_short for each of several distinct names (longer labels when there are few of them);
    names that abbreviate alike are abbreviated in the part they share instead, and those that
    still do get '#1', '#2' in sorted order (added to ``key`` as label -> name)."""
    if len(names) <= 6:
        width += width // 2
    short = [_short(n, width) for n in names]
    if len(set(short)) < len(short):
        pre = len(os.path.commonprefix(names))
        suf = len(os.path.commonprefix([n[pre:][::-1] for n in names]))
        short = [_keep_middle(n, pre, suf, width) for n in names]
    for s in sorted({s for s in short if short.count(s) > 1}):  # a set's order varies with PYTHONHASHSEED
        alike = sorted(n for n, t in zip(names, short) if t == s)
        short = [f"{t}#{alike.index(n) + 1}" if t == s else t for n, t in zip(names, short)]
        if key is not None:
            key.update((f"{s}#{i}", n) for i, n in enumerate(alike, start=1))
    return short


def _fontsize(n_labels: int, axis_inches: float, largest: float = 10.0, smallest: float = 5.0) -> float:
    """A tick-label size in points so that n_labels fit side by side along axis_inches."""
    per_label_pt = axis_inches * 72.0 / max(n_labels, 1)
    return float(np.clip(0.6 * per_label_pt, smallest, largest))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _get(splits: dict, split: str, key: str):
    value = splits.get(split, {}).get(key)
    return None if value is None else float(value)


def _table_rows(metrics: dict) -> list:
    """[(name, kind, {split: metrics})] for every member (in member order) and combiner."""
    rows = [(n, "member", metrics["members"].get(n, {})) for n in metrics["member_names"]]
    rows += [(n, "combiner", s) for n, s in metrics.get("combiners", {}).items()]
    return rows


def _rank(row: tuple) -> tuple:
    """Sort key of a _table_rows row, best first: OOF accuracy, then OOF NLL (as fit picks the best)."""
    nll = _get(row[2], "oof", "nll")
    return -(_get(row[2], "oof", "accuracy") or -1.0), np.inf if nll is None else nll, row[1] != "combiner"


def _best_member(metrics: dict) -> str:
    names = metrics["member_names"]
    return min(names, key=lambda n: _rank((n, "member", metrics["members"].get(n, {}))))  # ties: lower NLL


# ----------------------------------------------------------------------------- 1. learning curves

def _curve_arrays(epochs: list) -> dict:
    keys = ("epoch", "train_loss", "val_loss", "train_acc", "val_acc")
    return {k: np.array([e.get(k, np.nan) for e in epochs], dtype=float) for k in keys}


def curves_figure(alias: str, histories: list, snapshot_epochs: list, augmented: bool = True) -> Figure:
    """Train and held-out-fold loss and accuracy per epoch: thin line per fold, bold mean
    (with markers when there are few epochs, so that one epoch still shows)."""
    folds = [_curve_arrays(h) for h in histories if h]
    marker = "o" if max((len(f["epoch"]) for f in folds), default=0) <= 10 else None
    fig = _figure(12, 5.0)
    ax_loss, ax_acc = fig.subplots(1, 2)
    common = sorted(set.intersection(*[set(f["epoch"].tolist()) for f in folds])) if folds else []
    keep = [np.isin(f["epoch"], common) for f in folds]
    panels = ((ax_loss, "loss", "cross-entropy loss (nats)"),
              (ax_acc, "acc", "accuracy (% correct)"))
    lines = (("train", TRAIN_COLOR, f"train ({'augmented ' if augmented else ''}batches, during the epoch)"),
             ("val", HELD_OUT_COLOR, "held-out fold"))
    for ax, metric, ylabel in panels:
        for split, color, label in lines:
            for f in folds:
                ax.plot(f["epoch"], f[f"{split}_{metric}"], color=color, lw=0.8, alpha=0.35, marker=marker, ms=3)
            if common:
                mean = np.mean([f[f"{split}_{metric}"][k] for f, k in zip(folds, keep)], axis=0)
                ax.plot(common, mean, color=color, lw=2.6, marker=marker, ms=6,
                        label=f"{label}, mean of {len(folds)} folds")
        for e in snapshot_epochs:
            ax.axvline(e, color="0.4", ls="--", lw=1.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if marker and folds:  # half an epoch of margin: one epoch gets a tick of its own
            epochs = np.concatenate([f["epoch"] for f in folds])
            ax.set_xlim(np.nanmin(epochs) - 0.5, np.nanmax(epochs) + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    handles, _ = ax_loss.get_legend_handles_labels()
    extra = [ax_loss.plot([], [], color="0.5", lw=0.8, alpha=0.6, label="one fold")[0]]
    if snapshot_epochs:
        extra.append(ax_loss.plot([], [], color="0.4", ls="--", lw=1.0,
                                  label="snapshot kept (cycle end)")[0])
    handles += extra
    fig.legend(handles=handles, fontsize=9, loc="outside lower center", ncol=len(handles))
    ax_loss.set_title("loss per epoch")
    ax_acc.set_title("accuracy per epoch")
    fig.suptitle(f"{_short(alias, 40)}: learning curves over {len(folds)} folds "
                 f"(held-out = the fold the model did not train on)", fontsize=12)
    return fig


# ----------------------------------------------------------------------------- 2. comparison

_PANELS = (("accuracy", "accuracy", "fraction of rows correct (higher is better)"),
           ("f1", "macro F1", "unweighted mean of per-class F1 (higher is better)"),
           ("nll", "NLL", "mean negative log-likelihood, nats (lower is better)"))


def comparison_figure(metrics: dict) -> Figure:
    """Accuracy, macro F1 and NLL of every member and combiner, OOF and test side by side."""
    rows = sorted(_table_rows(metrics), key=_rank)
    splits = [s for s in ("oof", "test") if any(s in r[2] for r in rows)]
    n, bar = len(rows), 0.8 / len(splits)
    fig = _figure(15, 1.8 + 0.26 * n * len(splits))
    axes = fig.subplots(1, 3, sharey=True)
    ypos = np.arange(n)
    for ax, (key, title, xlabel) in zip(axes, _PANELS):
        # NLL has no upper bound: a hard vote's (near one-hot probabilities) would flatten every other bar
        scaled = [r for r in rows if key != "nll" or not (r[1] == "combiner" and r[0].startswith("vote"))] or rows
        top = 1.0 if key != "nll" else max([_get(r[2], s, key) or 0.0 for r in scaled for s in splits] + [1e-9])
        for j, split in enumerate(splits):
            vals = [_get(r[2], split, key) for r in rows]
            colors = [(COMBINER_COLORS if r[1] == "combiner" else MEMBER_COLORS)[j] for r in rows]
            pos = ypos - 0.4 + bar * (j + 0.5)
            ax.barh(pos, [v or 0.0 for v in vals], height=bar, color=colors)
            for p, v in zip(pos, vals):
                if v is not None:
                    ax.text(min(v, top), p, f" {v:.3f}" + (" (off scale)" if v > top else ""), va="center",
                            fontsize=7)
        off_scale = any((_get(r[2], s, key) or 0.0) > top for r in rows for s in splits)
        ax.set_xlim(0, top * (1.45 if off_scale else 1.16))
        ax.set_title(title)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, labels=_shorts([r[0] for r in rows]),
                       fontsize=_fontsize(n, 0.26 * n * len(splits)))
    axes[0].set_ylim(n - 0.5, -0.5)          # best at top, no empty margin
    for label, r in zip(axes[0].get_yticklabels(), rows):
        if r[1] == "combiner":
            label.set_fontweight("bold")
            label.set_color(COMBINER_COLORS[0])
    handles = [Patch(color=c[j], label=f"{kind} {s.upper() if s == 'oof' else s}")
               for kind, c in (("member", MEMBER_COLORS), ("combiner", COMBINER_COLORS))
               for j, s in enumerate(splits)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    fig.suptitle("Members and combiners (bold, orange), sorted by OOF accuracy (then NLL), best at top",
                 fontsize=12)
    return fig


# ----------------------------------------------------------------------------- 3. confusion

def _confusion(metrics: dict, run_dir: Path | None = None) -> tuple[str, str, np.ndarray, str]:
    """(name, split, counts, note) of the confusion matrix the report draws: the best combiner's
    (the best member's if there is none), on the test split if present, else OOF."""
    best = metrics.get("best")
    kind = "combiners" if best in metrics.get("combiners", {}) else "members"
    note = ""
    if kind == "members":
        best, note = _best_member(metrics), " (no best combiner in metrics.json: best member shown)"
    splits = metrics[kind][best]
    split = "test" if splits.get("test", {}).get("confusion") else "oof"
    if not splits.get(split, {}).get("confusion"):
        command = store.fit_command(run_dir) if run_dir is not None else "python -m ensemble.fit"
        raise ReportError(f"metrics.json has no confusion matrix for {best!r}; rerun `{command}`")
    return best, split, np.asarray(splits[split]["confusion"], dtype=float), note


def confusion_figure(metrics: dict, run_dir: Path | None = None) -> Figure:
    """Row-normalised confusion matrix of the best combiner (test split if present, else OOF);
    a class with no rows in the split is a grey row marked 'no images'."""
    best, split, counts, note = _confusion(metrics, run_dir)
    empty = counts.sum(axis=1) == 0
    norm = np.ma.masked_where(np.repeat(empty[:, None], len(counts), axis=1),
                              counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))
    c = len(counts)
    side = float(np.clip(0.42 * c + 2.5, 5.5, 16))
    fig = _figure(side + 1.6, side + 0.6)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap=matplotlib.colormaps["Blues"].with_extremes(bad="0.85"), vmin=0, vmax=1)
    fs = _fontsize(c, side - 1.5, largest=10)
    names = _shorts(list(metrics["classes"]), 16)
    slant = c <= 12                       # few classes: 45 degrees reads best; many: vertical
    ax.set_xticks(range(c), labels=names, rotation=45 if slant else 90, fontsize=fs,
                  ha="right" if slant else "center", rotation_mode="anchor" if slant else "default")
    ax.set_yticks(range(c), labels=names, fontsize=fs)
    if c <= 20:
        for i, j in np.ndindex(c, c):
            if not empty[i]:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=min(fs, 9),
                        color="white" if norm[i, j] > 0.6 else "black")
    for i in np.flatnonzero(empty):
        ax.text((c - 1) / 2, i, "no images", ha="center", va="center", fontsize=min(fs, 9), color="0.3")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class's rows")
    ax.set_title(f"Confusion matrix: {_short(best, 40)}, {split.upper() if split == 'oof' else split} split, "
                 f"n = {int(counts.sum())}{note}\nrows normalised by true class"
                 + ("; grey: no images of the class" if empty.any() else ""), fontsize=11)
    return fig


# ----------------------------------------------------------------------------- 4. reliability

def _reliability_curves(run: Run) -> tuple[list, str]:
    """[(label, reliability dict)] for the best member, best combiner and '+ts' variants (OOF)."""
    m, notes = run.metrics, []
    member = _best_member(m)
    block = m["members"].get(member, {}).get("oof", {})
    if block.get("reliability"):
        rel, e = block["reliability"], _get(m["members"][member], "oof", "ece")
    else:
        proba = softmax(run.oof_logits[run.member_names.index(member)])
        rel, e = reliability(proba, run.y), ece(proba, run.y)
    curves = [(f"best member: {_short(member)}", rel, e)]
    combos = m.get("combiners", {})
    wanted = [n for n in [m.get("best")] + sorted(n for n in combos if n.split(":")[0].endswith(TS_SUFFIX))
              if n in combos]
    for name in dict.fromkeys(wanted):
        rel = combos[name].get("oof", {}).get("reliability")
        if rel:
            shown = _short(name, 40)  # a snapshot:<alias> name may be 112 characters
            label = f"best combiner: {shown}" if name == m.get("best") else f"calibrated: {shown}"
            curves.append((label, rel, _get(combos[name], "oof", "ece")))
        else:
            notes.append(name)
    note = (f"not drawn (metrics.json stores no 'reliability' for them): {', '.join(notes)}"
            if notes else "")
    return curves, note


def reliability_figure(run: Run) -> Figure:
    """Reliability diagram (OOF) and the share of rows per confidence bin."""
    curves, note = _reliability_curves(run)
    fig = _figure(7.5, 9.0)
    ax, ax_n = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1.2, label="perfect calibration")
    for i, (label, rel, e) in enumerate(curves):
        conf = np.asarray(rel["confidence"], dtype=float)
        acc = np.asarray(rel["accuracy"], dtype=float)
        count = np.asarray(rel["count"], dtype=float)
        edges = np.asarray(rel.get("edges", np.linspace(0, 1, len(count) + 1)), dtype=float)
        ok = np.isfinite(conf) & np.isfinite(acc)
        suffix = "" if e is None else f" (ECE {e:.3f})"
        ax.plot(conf[ok], acc[ok], marker="o", ms=4, lw=1.8, color=f"C{i}", label=label + suffix)
        ax_n.step(edges, np.append(count, count[-1:]) / max(count.sum(), 1), where="post",
                  color=f"C{i}", lw=1.5)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy in the bin (fraction correct)")
    ax.legend(fontsize=8, loc="lower right")  # below the diagonal: the corner curves rarely reach
    ax.grid(alpha=0.3)
    ax_n.set_xlabel("top-1 confidence (predicted probability of the chosen class)")
    ax_n.set_ylabel("share of rows")
    ax_n.grid(alpha=0.3)
    title = "Reliability diagram on out-of-fold rows"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11 if not note else 9.5)
    return fig


# ----------------------------------------------------------------------------- 5. diversity

def disagreement(oof_logits: np.ndarray) -> np.ndarray:
    """(M, M) fraction of rows whose argmax differs between members i and j; logits (M, N, C)."""
    pred = oof_logits.argmax(axis=-1)
    return (pred[:, None, :] != pred[None, :, :]).mean(axis=-1)


def diversity_figure(run: Run) -> Figure:
    """Heatmap of pairwise OOF disagreement between members."""
    d = disagreement(run.oof_logits)
    m = len(d)
    off = d[~np.eye(m, dtype=bool)]
    shown = np.ma.masked_where(np.eye(m, dtype=bool), d)    # the zero diagonal would eat the scale
    side = float(np.clip(0.38 * m + 3.0, 5.5, 18))
    fig = _figure(side + 2.2, side + 1.0)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(shown, cmap=cmap, vmin=off.min() if m > 1 else 0, vmax=off.max() if m > 1 else 1)
    fs = _fontsize(m, side - 1.5, largest=10)
    names = _shorts(run.member_names)
    ax.set_xticks(range(m), labels=names, rotation=90, fontsize=fs)
    ax.set_yticks(range(m), labels=names, fontsize=fs)
    if m <= 12:
        for i, j in np.ndindex(m, m):
            ax.text(j, i, f"{d[i, j]:.2f}", ha="center", va="center", fontsize=min(fs, 9),
                    color="white" if i != j and im.norm(d[i, j]) < 0.5 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of OOF rows where the top-1 classes differ\n"
                                              "(diagonal, always 0, in grey)")
    ax.set_title(f"Pairwise disagreement of {m} members on {run.oof_logits.shape[1]} "
                 f"out-of-fold rows", fontsize=11)
    return fig


# ----------------------------------------------------------------------------- 6. ensemble size

def size_curve(oof_logits: np.ndarray, y: np.ndarray, order: list) -> np.ndarray:
    """(len(order),) OOF accuracy of the mean probabilities of the first n selected members."""
    proba = softmax(oof_logits[order])                    # (len(order), N, C), repeats kept
    running = np.cumsum(proba, axis=0)
    return (running.argmax(axis=-1) == y[None]).mean(axis=1)


def ensemble_size_figure(run: Run) -> Figure:
    """OOF accuracy as members are added in greedy-selection order (or by OOF accuracy)."""
    m = run.metrics
    if run.order:
        order = run.order
        how = ("members in the weighted combiner's greedy-selection order, repeats as selected\n"
               "(in-sample for the selection: the order was chosen on these rows)")
    else:
        acc = [_get(m["members"].get(n, {}), "oof", "accuracy") or -1.0 for n in run.member_names]
        order = [int(i) for i in np.argsort(acc)[::-1]]
        why = ("combiners/weighted.json has no greedy selection order" if "weighted" in m.get("combiners", {})
               else "the run has no weighted combiner")
        how = f"members ordered by OOF accuracy:\n{why}"
    curve = size_curve(run.oof_logits, run.y, order)
    n = len(order)
    fig = _figure(float(np.clip(0.32 * n + 4.0, 8, 24)), 6.0)
    ax = fig.subplots()
    ax.plot(np.arange(1, n + 1), curve, marker="o", lw=2, color="C0",
            label="mean of the first n probabilities")
    best_member = _best_member(m)
    ref = [(f"best member ({_short(best_member)})",
            _get(m["members"].get(best_member, {}), "oof", "accuracy"), ":")]
    if m.get("best") in m.get("combiners", {}):
        ref.append((f"best combiner ({_short(m['best'], 40)}), as scored by fit",
                    _get(m["combiners"][m["best"]], "oof", "accuracy"), "--"))
    for (label, value, ls), color in zip(ref, ("0.35", "C3")):
        if value is not None:
            ax.axhline(value, color=color, ls=ls, lw=1.3, label=label)
    if run.order and run.best_size:
        ax.axvline(run.best_size, color="C2", ls="-.", lw=1.3,
                   label=f"rounds kept by the weighted combiner ({run.best_size}, the lowest OOF NLL)")
    short = dict(zip(run.member_names, _shorts(run.member_names)))
    labels = [f"{step}: {short[run.member_names[i]]}" for step, i in enumerate(order, start=1)]
    ax.set_xticks(np.arange(1, n + 1), labels=labels, rotation=90,
                  fontsize=_fontsize(n, 0.32 * n, largest=9))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))  # decimals from the view: one label per gridline
    ax.set_ylim(top=min(ax.get_ylim()[1], 1.005))  # autoscale's margin would show accuracies above 100%
    ax.set_xlabel("ensemble size n (member added at step n)")
    ax.set_ylabel("OOF accuracy (% correct)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"OOF accuracy of the mean of the first n members' probabilities\n{how}", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- assembling

def _file_safe(alias: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", alias)  # aliases are at most 100 characters (recipe.is_name)


def build_figures(run: Run) -> dict:
    """File name -> Figure for every plot of the report, in display order."""
    figs = {"comparison.png": comparison_figure(run.metrics),
            "confusion.png": confusion_figure(run.metrics, run.path),
            "reliability.png": reliability_figure(run)}
    if len(run.member_names) > 1:  # one member disagrees with nobody
        figs["diversity.png"] = diversity_figure(run)
    figs["ensemble_size.png"] = ensemble_size_figure(run)
    for alias in run.histories:
        figs[f"curves_{_file_safe(alias)}.png"] = curves_figure(
            alias, run.histories[alias], run.snapshot_epochs[alias], _augmented(run, alias))
    return figs


def _augmented(run: Run, alias: str) -> bool:
    """Whether the recipe trains ``alias`` on augmented batches (its backbone's own augment, else
    [train]'s; the default augments)."""
    table = run.recipe
    train = table.get("train", {}) if isinstance(table.get("train"), dict) else {}
    augment = train.get("augment", True)
    for b in table.get("backbones", []):
        if isinstance(b, dict) and b.get("alias") == alias and "augment" in b:
            augment = b["augment"]
    return bool(augment)


_CAPTIONS = {
    "comparison.png": "Every member and combiner on out-of-fold (OOF) rows and, where there is one, "
                      "the test set. Combiner OOF scores come from fit's nested cross-validation.",
    "confusion.png": "Where the best combiner's errors go: each row is one true class, "
                     "normalised to 1.",
    "reliability.png": "Calibration: a well-calibrated model's points lie on the diagonal. "
                       "'+ts' variants are temperature-scaled.",
    "diversity.png": "How often two members disagree on the top-1 class of an OOF row: "
                     "an ensemble gains most from accurate members that disagree.",
    "ensemble_size.png": "OOF accuracy as members are averaged in one by one, in the order "
                         "named in the plot's title.",
}


def _caption(run: Run, name: str) -> str:
    for alias, epochs in run.snapshot_epochs.items():
        if name == f"curves_{_file_safe(alias)}.png":
            snapshots = "; dashed = a snapshot kept (cycle end)" if epochs else ""
            batches = "augmented batches" if _augmented(run, alias) else "batches"
            return (f"Learning curves of {alias}: one thin line per fold, bold = mean over folds{snapshots}. "
                    f"Train scores are running means over the epoch's {batches} while the weights "
                    "change, so they can sit below the held-out fold's, scored after the epoch.")
    if name == "confusion.png" and not _confusion(run.metrics)[2].sum(axis=1).all():
        return _CAPTIONS[name] + (" A grey row marked 'no images' is a class with no images in the split "
                                  "shown: it has nothing to normalise.")
    return _CAPTIONS.get(name, name)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def metrics_table(metrics: dict) -> str:
    """HTML table: one row per (member/combiner, split) with accuracy, macro F1, NLL, ECE."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in (
        "name", "kind", "split", "accuracy", "macro F1", "NLL", "ECE")) + "</tr>"
    body = []
    ordered = sorted(_table_rows(metrics), key=lambda r: (r[1] != "member", *_rank(r)[:2]))
    for name, kind, splits in ordered:  # as fit's table: members, then combiners, each by OOF accuracy, then NLL
        for split, vals in splits.items():
            if not isinstance(vals, dict):
                continue
            cls = ' class="best"' if kind == "combiner" and name == metrics.get("best") else ""
            cells = "".join(f"<td>{_fmt(_get(splits, split, k))}</td>"
                            for k in ("accuracy", "f1", "nll", "ece"))
            body.append(f"<tr{cls}><td>{html.escape(name)}</td><td>{kind}</td>"
                        f"<td>{html.escape(split)}</td>{cells}</tr>")
    return f"<table>\n{head}\n" + "\n".join(body) + "\n</table>"


_CSS = """body{font-family:sans-serif;margin:1em auto;padding:0 2em;max-width:1400px;color:#222}
img{max-width:100%;height:auto;border:1px solid #ddd}figure{margin:1.5em 0}
table{border-collapse:collapse;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.best{background:#fff3e0;font-weight:bold}
pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def _shown(path) -> str:
    """A path (or a name taken from one) as text: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def _label_note(run: Run) -> str:
    """The key to the plot labels _shorts had to number, '' if none was."""
    key = {}
    _shorts(run.classes, 16, key)                                    # confusion
    _shorts([r[0] for r in _table_rows(run.metrics)], MAX_LABEL, key)  # comparison
    _shorts(run.member_names, MAX_LABEL, key)                         # diversity, ensemble size
    if not key:
        return ""
    items = "; ".join(f"<code>{html.escape(label)}</code> → {html.escape(name)}" for label, name in key.items())
    return f"<p>Numbered labels in the plots: {items}.</p>\n"


def render_html(run: Run, pngs: dict) -> str:
    """The self-contained page: every PNG as a data URI, the metrics table and the recipe."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}"><figcaption><code>{html.escape(name)}</code>: '
        f'{html.escape(_caption(run, name))}</figcaption></figure>'
        for name, data in pngs.items())
    if "diversity.png" not in pngs:
        figures += "\n<p>No pairwise disagreement plot: the run has only one member.</p>"
    has_test = any("test" in r[2] for r in _table_rows(run.metrics))
    test = (" Split <code>test</code>: the test set, which nothing trained or chose on." if has_test
            else " The run has no test set.")
    title = html.escape(_shown(run.name))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
            f"<title>{title}: ensemble report</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{title}</h1>\n"
            f"<p>Run folder <code>{html.escape(_shown(run.path))}</code>; "
            f"{len(run.y)} training images (OOF rows), {len(run.classes)} classes: "
            f"{html.escape(store.class_list(run.classes))}; "
            f"report generated {now}. Best combiner (nested OOF accuracy): "
            f"<b>{html.escape(str(run.metrics.get('best')))}</b>{_choice(run.metrics)}.</p>\n"
            f"<h2>Metrics</h2>\n<p>Split <code>oof</code>: a member's row is predicted by the one fold model "
            f"that did not train on it; a combiner's by nested cross-validation (fitted without that row's "
            f"fold).{test}</p>\n"
            f"{metrics_table(run.metrics)}\n<h2>Plots</h2>\n{_label_note(run)}{figures}\n"
            f"<h2>Recipe</h2>\n<pre>{html.escape(run.recipe_text)}</pre>\n</body></html>\n")


def _choice(metrics: dict) -> str:
    """The choice of the best, itself scored nested (from fit since 2026-11-24; older runs lack it)."""
    value = metrics.get("choice_accuracy")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return ""
    return (f"; picking the best this way, scored on folds it was not picked on: {value:.4f} OOF accuracy "
            "(the best's own nested score reads a little high: it won among several)")


def write_report(run_dir, out_dir=None) -> Path:
    """Write every PNG and index.html to out_dir (default run_dir/report); return index.html."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / "report"
    try:
        _check_out(out, run)
        out.mkdir(parents=True, exist_ok=True)
        pngs = _draw(run)
        for old in out.glob("*.png"):  # a previous report's plots that this one has not (other aliases)
            if old.name not in pngs and (old.name in _CAPTIONS or old.name.startswith("curves_")):
                old.unlink()
        for name, png in pngs.items():
            store.atomic_write(out / name, lambda f, png=png: f.write(png))
        index = out / "index.html"
        store.write_text(index, render_html(run, pngs))
    except OSError as exc:
        raise ReportError(f"cannot write the report to {_shown(out)}: {exc.strerror or exc}") from None
    return index


def _draw(run: Run) -> dict:
    """File name -> PNG bytes of every plot. Glyphs the installed fonts lack (e.g. CJK class names)
    are said once on stderr, not once per glyph and figure as matplotlib warns."""
    # names are text, never mathtext: a class folder 'coin_$1_$2' must not be parsed as TeX
    with warnings.catch_warnings(record=True) as caught, matplotlib.rc_context({"text.parse_math": False}):
        warnings.filterwarnings("always", message="Glyph .* missing from font", category=UserWarning)
        pngs = {name: _png(fig) for name, fig in build_figures(run).items()}
    missing = set()
    for w in caught:
        glyph = re.match(r"Glyph (\d+) .*missing from font", str(w.message))
        if glyph:
            missing.add(chr(int(glyph.group(1))))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if missing:
        print(f"note: the installed fonts cannot draw {len(missing)} character(s) of the labels "
              f"({' '.join(sorted(missing)[:10])}); the plots show them as boxes", file=sys.stderr)
    return pngs


GENERATOR = '<meta name="generator" content="ensemble.report">'


def _is_report(folder: Path) -> bool:
    """Whether ``folder`` holds a report of this module (its index.html names the generator, or,
    written before that, ends its title with ': ensemble report')."""
    try:
        with open(folder / "index.html", encoding="utf-8", errors="replace") as f:
            head = f.read(4000)
    except OSError:
        return False
    return GENERATOR in head or ": ensemble report</title>" in head


def _check_out(out: Path, run: Run) -> None:
    """ReportError for a folder the report cannot or should not write to: a file, a non-empty folder
    that holds no previous report (its files would be overwritten or mixed in), inside the run folder
    (but its report/), or inside the images the run reads (PNGs there become images)."""
    where = _shown(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"cannot write the report to {where}: it is a file; give a folder (--out DIR) "
                          "or remove the file")
    full, own = out.resolve(), (run.path / "report").resolve()
    if full.is_relative_to(run.path.resolve()) and full != own:
        raise ReportError(f"--out {where} is inside the run folder; give {_shown(run.path / 'report')} "
                          "or a folder outside it")
    if full != own and out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise ReportError(f"cannot write the report to {where}: the folder holds other files and no previous "
                          "report (index.html by python -m ensemble.report); give an empty or new folder")
    data = run.recipe.get("data", {})
    inside = store.inside_images(full, data) if isinstance(data, dict) else None
    if inside:
        raise ReportError(f"--out {where} is inside {inside}: its PNGs would be read as images on the next run; "
                          "give a folder outside it")


def main(argv=None) -> int:
    """`python -m ensemble.report RUN_DIR [--out DIR]`: write the report, print index.html's path."""
    parser = argparse.ArgumentParser(prog="python -m ensemble.report",
                                     description=store.summary(__doc__))
    parser.add_argument("run_dir", type=Path, help="a fitted run folder, outputs/<run>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        index = write_report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # as predict and bench: one line; files are written atomically
        print("interrupted: the report is incomplete; run the same command again", file=sys.stderr)
        return 130
    print(_shown(index))  # a strict UTF-8 stdout cannot print a non-UTF-8 path's surrogates
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
