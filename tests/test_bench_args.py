"""`python -m ensemble.bench <name>`: a bad argument is a one-line usage error (exit 2), never a traceback.

Every case fails in argument parsing (or, for the combiners' random labels, on a tiny problem),
before any benchmark work, so the whole table runs in a few seconds (listing timm's models once).
"""

from __future__ import annotations

import pytest

from ensemble.bench import main

BAD = [
    # (argv, message fragment on stderr)
    (["combiners", "--rows", "0"], "--rows must be >= 1, got 0"),
    (["combiners", "--members", "0"], "--members must be >= 1, got 0"),
    (["combiners", "--classes", "1"], "--classes must be >= 2, got 1"),
    (["combiners", "--folds", "1"], "--folds must be >= 2, got 1"),
    (["combiners", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["combiners", "--rows", "3"], "--rows must be >= --folds (5), so that every fold holds rows; got 3"),
    (["combiners", "--rows", "2", "--folds", "2"], "outside fold 0 are all one class; raise --rows"),
    (["combiners", "--rows", "many"], "argument --rows: invalid int value: 'many'"),
    (["predict", "--folds", "0"], "--folds must be >= 1, got 0"),
    (["predict", "--images", "0"], "--images must be >= 1, got 0"),
    (["predict", "--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["predict", "--classes", "1"], "--classes must be >= 2, got 1"),
    (["predict", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["predict", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["predict", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["predict", "--channels", "2"], "argument --channels: invalid choice: 2"),
    (["predict", "--device", "cuda:99"], "--device 'cuda:99': 'cuda:99' asks for CUDA"),
    (["predict", "--backbone", "timm:nosuch"], "--backbone names no timm model: 'timm:nosuch'"),
    (["predict", "--backbone", "timm:resnet1"], "close matches: timm:resnet18"),
    (["predict", "--backbone", "nosuch"], "--backbone must be timm:<model> | torchvision:<model>, got 'nosuch'"),
    (["train", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["train", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["train", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["train", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["train", "--workers", "-1"], "--workers must be >= 0, got -1"),
    (["train", "--backbone", "timm:nosuch"], "--backbone names no timm model: 'timm:nosuch'"),
    (["train", "--backbone", "torchvision:nosuch"], "--backbone names no torchvision model: 'torchvision:nosuch'"),
    (["unseen", "run", "--images-per-class", "0"], "--images-per-class must be >= 1, got 0"),
]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the bench CLI in this process: SystemExit or a returned status."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_a_one_line_usage_error(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"python -m ensemble.bench {argv[0]}: error: ")
    assert err.startswith("usage: ")


def test_train_help_gives_its_description_once(capsys):
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    assert out.count("Training throughput of one backbone, three ways") == 1
    assert "(b) toolkit" in out  # the details still follow the options
