"""Entry point of ``python -m ensemble.bench <name> [args]`` (see ``ensemble.bench``)."""

from ensemble.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
