"""Time every registered combiner: nested cross_val_proba + final fit + predict_proba.

    python -m ensemble.bench combiners [--members 15 --rows 50000 --classes 10 --folds 5 --seed 0]

Random logits and random labels (so every accuracy should sit at chance, 1/classes:
a quick honesty check on the side). Prints one row per combiner with its seconds and its
share of the total, then the total against the 30 s target for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ensemble import store
from ensemble.bench._args import check_at_least
from ensemble.combiners import available, cross_val_proba, make_combiner

TARGET_S = 30.0


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser (for the label check in :func:`main`) and the checked arguments."""
    p = argparse.ArgumentParser(prog="python -m ensemble.bench combiners", description=store.summary(__doc__))
    p.add_argument("--members", type=int, default=15, help="ensemble members (default 15)")
    p.add_argument("--rows", type=int, default=50_000, help="OOF rows (default 50000)")
    p.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--folds", type=int, default=5, help="folds of the nested CV (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"members": 1, "rows": 1, "classes": 2, "folds": 2, "seed": 0})
    if args.rows < args.folds:
        p.error(f"--rows must be >= --folds ({args.folds}), so that every fold holds rows; got {args.rows}")
    return p, args


def random_problem(members: int, rows: int, classes: int, folds: int, seed: int):
    """float32 logits (members, rows, classes), labels (rows,), fold indices (rows,)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((members, rows, classes), dtype=np.float32)  # float32 directly: no float64 copy
    logits *= 2.0
    y = rng.integers(0, classes, size=rows)
    fold_idx = rng.permutation(np.arange(rows) % folds)
    return logits, y, fold_idx


def time_combiner(name: str, logits, y, folds) -> tuple[float, float]:
    """(seconds, nested accuracy) for cross_val_proba + fit on all rows + predict_proba."""
    combiner = make_combiner(name)
    start = time.perf_counter()
    oof = cross_val_proba(combiner, logits, y, folds)
    combiner.clone().fit(logits, y).predict_proba(logits)
    seconds = time.perf_counter() - start
    return seconds, float(np.mean(oof.argmax(axis=1) == y))


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    logits, y, folds = random_problem(args.members, args.rows, args.classes, args.folds, args.seed)
    thin = [k for k in range(args.folds) if len(np.unique(y[folds != k])) < 2]
    if thin:  # a learned combiner cannot fit one class; only a handful of rows can draw that
        parser.error(f"--rows {args.rows}: with --folds {args.folds} and --seed {args.seed}, the random labels "
                     f"outside fold {thin[0]} are all one class; raise --rows")
    print(f"random logits {logits.shape} (members, rows, classes), {args.folds} folds, "
          f"seed {args.seed}; chance accuracy {1 / args.classes:.3f}")
    results = {name: time_combiner(name, logits, y, folds) for name in available()}
    total = sum(s for s, _ in results.values())
    print(f"{'combiner':<12} {'seconds':>8} {'share':>7} {'nested acc':>11}")
    for name, (seconds, acc) in results.items():
        print(f"{name:<12} {seconds:>8.2f} {seconds / total:>7.1%} {acc:>11.3f}")
    defaults = (args.members, args.rows, args.classes, args.folds) == (15, 50_000, 10, 5)
    print(f"total {total:.1f} s" + (f" (target < {TARGET_S:.0f} s on 2 CPU cores)" if defaults else
                                   " (the 30 s target is for the default sizes)"))
    return 0
