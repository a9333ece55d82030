"""Benchmarks: ``python -m ensemble.bench <name> [args]``.

Each benchmark is a module ``ensemble.bench.<name>`` exposing ``main(argv) -> int``;
add one by adding its name to :data:`BENCHMARKS`. Modules are imported only when run.
"""

from __future__ import annotations

import importlib
import sys

# name -> module path; each module exposes main(argv: list[str] | None) -> int
BENCHMARKS: dict[str, str] = {
    "combiners": "ensemble.bench.combiners",
    "predict": "ensemble.bench.predict",
    "train": "ensemble.bench.train",
    "unseen": "ensemble.bench.unseen",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its benchmark module with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    valid = ", ".join(sorted(BENCHMARKS))
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m ensemble.bench <name> [args]; names: {valid}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; valid names: {valid}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name]).main(rest))
