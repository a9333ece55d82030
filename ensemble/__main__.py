"""``python -m ensemble``: the toolkit is four commands; say which."""

import sys

USAGE = """usage: python -m ensemble.<command> ...

  python -m ensemble.fit RECIPE [--set KEY=VALUE] [--out DIR] [--jobs N]   train, combine, report
  python -m ensemble.predict RUN INPUT... [--method NAME] [--out CSV]      apply a finished run
  python -m ensemble.report RUN [--out DIR]                                (re)write the plot report
  python -m ensemble.bench {combiners,train,predict,unseen} ...            benchmarks

each takes --help; start with: python -m ensemble.fit recipes/digits_5fold.toml"""

if __name__ == "__main__":
    asked = sys.argv[1:] in (["--help"], ["-h"])  # asked for help: on stdout, status 0
    print(USAGE, file=sys.stdout if asked else sys.stderr)
    sys.exit(0 if asked else 2)
