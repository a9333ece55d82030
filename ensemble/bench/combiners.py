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

from ensemble.combiners import available, cross_val_proba, make_combiner

TARGET_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.bench combiners", description=__doc__)
    p.add_argument("--members", type=int, default=15, help="ensemble members (default 15)")
    p.add_argument("--rows", type=int, default=50_000, help="OOF rows (default 50000)")
    p.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--folds", type=int, default=5, help="folds of the nested CV (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p.parse_args(argv)


def random_problem(members: int, rows: int, classes: int, folds: int, seed: int):
    """float32 logits (members, rows, classes), labels (rows,), fold indices (rows,)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(members, rows, classes)).astype(np.float32)
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
    args = parse_args(argv)
    logits, y, folds = random_problem(args.members, args.rows, args.classes, args.folds, args.seed)
    print(f"random logits {logits.shape} (members, rows, classes), {args.folds} folds, "
          f"seed {args.seed}; chance accuracy {1 / args.classes:.3f}")
    results = {name: time_combiner(name, logits, y, folds) for name in available()}
    total = sum(s for s, _ in results.values())
    print(f"{'combiner':<12} {'seconds':>8} {'share':>7} {'nested acc':>11}")
    for name, (seconds, acc) in results.items():
        print(f"{name:<12} {seconds:>8.2f} {seconds / total:>7.1%} {acc:>11.3f}")
    print(f"total {total:.1f} s (target < {TARGET_S:.0f} s on 2 CPU cores)")
    return 0
