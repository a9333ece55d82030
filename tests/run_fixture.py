"""A small but complete synthetic run folder, laid out exactly as `outputs/<run>/` (see the spec).

`make_run(tmp_path)` writes labels, folds, per-(backbone, fold) histories, OOF and test logits
(one backbone trained with snapshots), placeholder weights, meta/done markers, data.json,
recipe.toml, combiners/<name>.json + .npz, metrics.json and metrics.csv.  Nothing is trained:
logits are drawn so that members differ in quality and disagree on some rows; the real
combiners "vote", "mean", "weighted" (greedy, 10 rounds), "mean+ts" and "weighted+ts" are fitted
on those OOF logits and saved with ensemble.combiner_store, and everything is scored with
ensemble.metrics, so metrics.json has fit's format and agrees with the cached arrays.
Simplifications: combiner OOF scores are in-sample (fit's are nested), and the weights files are
placeholders (one zero tensor), not loadable models.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ensemble.combiner_store import save_combiner
from ensemble.combiners import make_combiner
from ensemble.metrics import details, reliability, score, softmax

_ARCHS = ("resnet18", "convnext_nano", "efficientnet_b0", "vit_tiny_patch16_224",
          "mobilenetv3_large_100", "regnety_008_tv", "densenet121", "swin_tiny_patch4_window7")
_COMBINERS = ("vote", "mean", "weighted", "mean+ts", "weighted+ts")
_SCALARS = ("accuracy", "precision", "recall", "f1", "f1_weighted", "nll", "brier", "ece")


def make_run(tmp_path, n_members=3, n_classes=4, n_rows=200, folds=3, snapshots=3, seed=0,
             *, members="final", with_test=True, with_reliability=True,
             name="synthetic_run") -> Path:
    """Write a synthetic run folder under `tmp_path/name` and return its path.

    n_members backbones are written; backbone 0 ("snap_resnet18") is trained with `snapshots`
    snapshots when snapshots >= 2 (its logits then have S = snapshots), the others with S = 1.
    With members="final" (default) every backbone is one member, so len(member_names) ==
    n_members; with members="snapshots" backbone 0 contributes "<alias>@s1".."@sS" instead.
    with_test=False writes no test set; with_reliability=False leaves the per-split "reliability"
    blocks out of metrics.json (as an older fit would).
    """
    if members not in ("final", "snapshots"):
        raise ValueError(f"members must be 'final' or 'snapshots', got {members!r}")
    if n_members < 1 or n_classes < 2 or folds < 2 or n_rows < folds * n_classes:
        raise ValueError(f"need n_members >= 1, n_classes >= 2, folds >= 2 and n_rows >= "
                         f"folds * n_classes; got {n_members}, {n_classes}, {folds}, {n_rows}")
    rng = np.random.default_rng(seed)
    run = Path(tmp_path) / name
    run.mkdir(parents=True, exist_ok=False)
    classes = [f"class_{c}" for c in range(n_classes)]
    y = _balanced_labels(rng, n_rows, n_classes)
    fold_of = _stratified_folds(rng, y, folds)
    y_test = _balanced_labels(rng, max(n_rows // 4, n_classes), n_classes) if with_test else None
    np.save(run / "labels.npy", y)
    np.save(run / "folds.npy", fold_of)
    if with_test:
        np.save(run / "test_labels.npy", y_test)

    shared = rng.normal(size=(n_rows, n_classes))
    shared_test = None if y_test is None else rng.normal(size=(len(y_test), n_classes))
    aliases = _aliases(n_members)
    n_snap = snapshots if snapshots >= 2 else 1
    names, oof, test = [], [], []
    for b, alias in enumerate(aliases):
        s_count = n_snap if b == 0 else 1
        quality = 1.6 + 0.8 * b / max(n_members - 1, 1)
        oof_b, test_b = _write_backbone(run, rng, alias, (y, shared), fold_of,
                                        (y_test, shared_test), s_count, quality, folds)
        picks = range(1, s_count + 1) if (members == "snapshots" and s_count > 1) else [s_count]
        for i in picks:
            names.append(f"{alias}@s{i}" if (members == "snapshots" and s_count > 1) else alias)
            oof.append(oof_b[i - 1])
            test.append(None if test_b is None else test_b[i - 1])
    oof = np.stack(oof)                                  # (M, N, C)
    test = None if not with_test else np.stack(test)     # (M, Nt, C)

    _write_data_json(run, classes, n_rows, 0 if y_test is None else len(y_test))
    _write_recipe(run, name, aliases, folds, snapshots, members)
    _write_metrics(run, names, classes, oof, test, y, y_test, with_reliability)
    return run


def _balanced_labels(rng, n, n_classes):
    """Labels (n,) int64 with every class present, in random order."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def _stratified_folds(rng, y, folds):
    """Fold index (N,) int64: within each class rows are dealt round-robin after a shuffle."""
    out = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        out[rows] = (np.arange(len(rows)) + c) % folds
    return out


def _aliases(n):
    """n distinct backbone aliases; index 0 is the snapshot backbone, some are long."""
    out = ["snap_resnet18"]
    for i in range(1, n):
        arch = _ARCHS[i % len(_ARCHS)]
        out.append(arch if i < len(_ARCHS) else f"{arch}_v{i // len(_ARCHS) + 1}")
    return out


def _member_logits(rng, y, shared, quality):
    """Logits (N, C): the true class lifted by `quality`, plus row noise `shared` (N, C) that
    every member sees (hard rows stay hard for the ensemble) and the member's own noise."""
    logits = 0.8 * shared + rng.normal(0.0, 0.9, size=shared.shape)
    logits[np.arange(len(y)), y] += quality
    return logits


def _write_backbone(run, rng, alias, train, fold_of, test, s_count, quality, folds):
    """Write members/<alias>/fold<k>/ for every fold; return OOF (S, N, C) and test (S, Nt, C).

    train = (y (N,), shared noise (N, C)); test = (y_test (Nt,), shared (Nt, C)) or (None, None).
    """
    (y, shared), (y_test, shared_test) = train, test
    n, n_classes = shared.shape
    oof = np.zeros((s_count, n, n_classes), dtype=np.float32)
    test_sum = None if y_test is None else np.zeros((s_count, len(y_test), n_classes))
    epochs = max(8, 4 * s_count)
    snap_epochs = [epochs * (i + 1) // s_count for i in range(s_count)] if s_count > 1 else []
    for k in range(folds):
        rows = np.flatnonzero(fold_of == k)
        d = run / "members" / alias / f"fold{k}"
        d.mkdir(parents=True)
        strength = [quality * (0.6 + 0.4 * (s + 1) / s_count) for s in range(s_count)]
        oof_k = np.stack([_member_logits(rng, y[rows], shared[rows], q) for q in strength])
        oof[:, rows] = oof_k
        np.save(d / "oof_logits.npy", oof_k.astype(np.float32))
        if y_test is not None:
            test_k = np.stack([_member_logits(rng, y_test, shared_test, q) for q in strength])
            test_sum += test_k
            np.save(d / "test_logits.npy", test_k.astype(np.float32))
        _write_history(d, rng, epochs, snap_epochs, quality)
        save_file({"placeholder": np.zeros(1, dtype=np.float32)}, str(d / "weights.safetensors"))
        for i in range(s_count - 1):
            save_file({"placeholder": np.zeros(1, dtype=np.float32)},
                      str(d / f"snapshot{i}.safetensors"))
        meta = {"key": f"{alias}-fold{k}-synthetic", "alias": alias,
                "backbone": {"name": f"timm:{alias}", "alias": alias, "pretrained": False},
                "train": {"epochs": epochs, "snapshots": s_count if s_count > 1 else 0},
                "fold": k, "seconds": 1.0, "device": "cpu", "versions": {"numpy": np.__version__}}
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
        (d / "done.json").write_text(json.dumps({"done": True}))
    test = None if test_sum is None else (test_sum / folds).astype(np.float32)
    return oof, test


def _write_history(d, rng, epochs, snap_epochs, quality):
    """history.json with decreasing losses; cyclic bumps after each snapshot boundary."""
    rows = []
    for e in range(1, epochs + 1):
        since = e - max([s for s in snap_epochs if s < e], default=0)
        base = 1.6 * np.exp(-0.45 * (since if snap_epochs else e)) / quality + 0.15
        train_loss = base + rng.normal(0, 0.02)
        val_loss = base * 1.25 + 0.05 + rng.normal(0, 0.03)
        rows.append({"epoch": e, "lr": float(0.1 * (1 - since / (epochs + 1))),
                     "train_loss": float(train_loss),
                     "train_acc": float(np.clip(1 - train_loss / 2, 0, 1)),
                     "val_loss": float(val_loss), "val_acc": float(np.clip(1 - val_loss / 2, 0, 1)),
                     "seconds": 0.5})
    (d / "history.json").write_text(json.dumps({"epochs": rows, "snapshot_epochs": snap_epochs}))


def _write_data_json(run, classes, n, n_test):
    data = {"source": "synthetic", "classes": classes, "n_train": int(n), "n_test": int(n_test),
            "channels": 3, "image_size": 32, "fingerprint": "synthetic-0",
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (run / "data.json").write_text(json.dumps(data, indent=2))


def _write_recipe(run, name, aliases, folds, snapshots, members):
    lines = [f'name = "{name}"', "seed = 0", "", "[data]", 'source = "synthetic"', "",
             "[cv]", f"folds = {folds}", "", "[train]", "epochs = 6", "lr = 0.1", "snapshots = 0", ""]
    for b, alias in enumerate(aliases):
        lines += ["[[backbones]]", f'name = "timm:{alias}"', f'alias = "{alias}"']
        if b == 0 and snapshots >= 2:
            lines.append(f"snapshots = {snapshots}")
        lines.append("")
    lines += ["[ensemble]", 'combiners = ["vote", "mean", "weighted"]', f'members = "{members}"',
              "calibrate = true", 'weighted = { method = "greedy", rounds = 10 }',
              'meta_learner = "logistic"  # <escaped & shown>', ""]
    (run / "recipe.toml").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- combiners/metrics

def _fit_combiners(oof, test, y):
    """Fit the real combiners on the OOF logits (M, N, C); name -> (fitted, oof proba, test proba)."""
    out = {}
    for name in _COMBINERS:
        params = {"method": "greedy", "rounds": 10} if name.startswith("weighted") else {}
        combiner = make_combiner(name, **params).fit(oof, y)
        out[name] = (combiner, combiner.predict_proba(oof),
                     None if test is None else combiner.predict_proba(test))
    return out


def _split_metrics(proba, y, classes, with_reliability):
    """The metrics dict of one split as fit writes it: score + details (+ reliability)."""
    out = {**score(proba, y, len(classes)), **details(proba, y, classes)}
    if with_reliability:
        out["reliability"] = reliability(proba, y, n_bins=15)
    return out


def _write_metrics(run, names, classes, oof, test, y, y_test, with_reliability):
    """combiners/<name>.json + .npz, metrics.json and metrics.csv from the member logits."""
    oof_p = softmax(oof.astype(np.float64))
    test_p = None if test is None else softmax(test.astype(np.float64))
    combos = _fit_combiners(oof, test, y)

    def splits(p_oof, p_test):
        d = {"oof": _split_metrics(p_oof, y, classes, with_reliability)}
        if p_test is not None:
            d["test"] = _split_metrics(p_test, y_test, classes, with_reliability)
        return d

    members = {n: splits(oof_p[m], None if test_p is None else test_p[m])
               for m, n in enumerate(names)}
    combiners = {n: splits(po, pt) for n, (_, po, pt) in combos.items()}
    best = max(combiners, key=lambda n: combiners[n]["oof"]["accuracy"])
    metrics = {"members": members, "combiners": combiners, "best": best,
               "member_names": names, "classes": classes}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(run / "metrics.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["kind", "name", "split", *_SCALARS])
        for kind, block in (("member", members), ("combiner", combiners)):
            for n, sp in block.items():
                for split, m in sp.items():
                    wr.writerow([kind, n, split, *[m[k] for k in _SCALARS]])
    for combiner, _, _ in combos.values():
        save_combiner(combiner, run / "combiners")
