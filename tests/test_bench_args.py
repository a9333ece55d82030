"""`python -m ensemble.bench <name>`: a bad argument is a one-line usage error (exit 2), never a traceback.

Every case fails in argument parsing (or, for the combiners' random labels, on a tiny problem),
before any benchmark work, so the whole table runs in a few seconds (listing timm's models once).
"""

from __future__ import annotations

import argparse
import io
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from ensemble.bench import main
from ensemble.bench import predict as bench_predict
from ensemble.bench import train as bench_train

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
    # a backbone that cannot take the bench's input: one line, as fit.check_backbones says it for a recipe
    (["predict", "--backbone", "timm:vit_tiny_patch16_224", "--images", "4"],
     "--backbone timm:vit_tiny_patch16_224 cannot run on 32x32 images: AssertionError"),
    (["train", "--backbone", "timm:vit_tiny_patch16_224", "--batch-size", "8"],
     "--backbone timm:vit_tiny_patch16_224 cannot train on 32x32 images in batches of 8"),
    (["train", "--batch-size", "1"], "--backbone timm:test_resnet cannot train on 32x32 images in batches of 1"),
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


# --------------------------------------------------------------------------- train: the report


def report(seconds: dict[str, list[float]], batch_size: int = 128, threads: int = 2) -> dict[str, float]:
    args = argparse.Namespace(steps=1, batch_size=batch_size, threads=threads, backbone="timm:test_resnet")
    return bench_train.report(args, seconds)


def test_train_ratios_are_the_median_of_the_rounds_and_one_slow_round_is_a_warning(capsys):
    # round 4 of (a) was slowed by another process: pooled rates would give b/a = 3.1, "met"
    ratios = report({"a": [1.0, 1.0, 1.0, 10.0], "b": [1.05] * 4, "c": [3.0] * 4})
    out = capsys.readouterr().out
    assert ratios["b/a"] == pytest.approx(1 / 1.05)
    assert "b/a = 0.952 median" in out and "(a) model (synthetic tensors)" in out and "median of rounds" in out
    warning = [line for line in out.splitlines() if line.startswith("warning: unreliable")]
    assert len(warning) == 1 and "b/a: the rounds vary 10.0x" in warning[0] and "rerun on an idle machine" in warning[0]


def test_train_b_above_its_ceiling_a_is_a_warning(capsys):
    ratios = report({"a": [1.0] * 3, "b": [0.8] * 3, "c": [2.0] * 3})
    out = capsys.readouterr().out
    assert ratios["b/a"] == pytest.approx(1.25)
    assert "warning: unreliable: b/a = 1.250 > 1: the toolkit step beat the model alone" in out


def test_train_steady_rounds_give_a_plain_verdict(capsys):
    ratios = report({"a": [1.0, 1.1, 0.9], "b": [1.05, 1.15, 0.95], "c": [2.5, 2.6, 2.4]})
    out = capsys.readouterr().out
    assert ratios["b/c"] == pytest.approx(2.5 / 1.05)
    assert "warning" not in out and "load average now" in out
    assert re.search(r"b/a = 0\.95\d median .*target >= 0\.90 on 2 CPU cores: met", out)
    assert "b/c = 2.381 median" in out and "target >= 2.00 on 2 CPU cores: met" in out


def test_train_targets_say_which_settings_they_are_for(capsys):
    report({"a": [1.0] * 2, "b": [1.0] * 2, "c": [3.0] * 2}, batch_size=32)
    assert "target >= 0.90 on 2 CPU cores (set for batch 128, 2 threads): met" in capsys.readouterr().out


# --------------------------------------------------------------------------- train: the archive


def png(size: int, seed: int, channels: int = 3) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def archive(path, classes: int, per_class: int, size: int = 32, channels: int = 3):
    with tarfile.open(path, "w:gz") as tf:
        for c in range(classes):
            for i in range(per_class):
                blob = png(size, 100 * c + i, channels)
                info = tarfile.TarInfo(f"train/class{c}/{i}.png")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return path


def text_file(path):
    path.write_text("not a tar archive")
    return path


TINY = ["--steps", "1", "--warmup", "1", "--rounds", "1", "--batch-size", "8", "--threads", "1", "--workers", "0"]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: text_file(tmp / "notes.txt"), "is not a readable tar(.gz) archive"),
    (lambda tmp: tmp, "is a folder, not a tar(.gz)"),
    (lambda tmp: archive(tmp / "one.tar.gz", classes=1, per_class=20), "found 1 class(es)"),
    (lambda tmp: archive(tmp / "small.tar.gz", classes=2, per_class=8, size=16), "class0/0.png is 16x16; this benchmark needs 32x32"),
    (lambda tmp: archive(tmp / "big.tar.gz", classes=2, per_class=8, size=64), "is 64x64; this benchmark needs 32x32"),
], ids=["not-a-tar", "folder", "one-class", "16px", "64px"])
def test_train_archive_that_cannot_serve_is_one_error_line(make, message, tmp_path, capsys):
    code, _, err = run(["train", *TINY, "--archive", str(make(tmp_path))], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_train_takes_the_images_it_needs_from_two_classes(tmp_path, capsys):
    """16 images needed, 8 in each of 2 classes: enough (the class count was once taken to be 10)."""
    folder = tmp_path / "out"
    assert bench_train.extract_subset(archive(tmp_path / "two.tar.gz", 2, 8), 16, folder) == 16
    assert sorted(len(list(d.iterdir())) for d in folder.iterdir()) == [8, 8]
    code, out, err = run(["train", *TINY, "--archive", str(tmp_path / "two.tar.gz")], capsys)
    assert code == 0, err
    assert "16 images from two.tar.gz" in out and "b/a = " in out


def test_train_on_a_grayscale_archive_trains_the_same_3_channel_model_in_every_loop(tmp_path, capsys):
    code, out, err = run(["train", *TINY, "--archive", str(archive(tmp_path / "gray.tar.gz", 2, 8, channels=1))],
                         capsys)
    assert code == 0, err
    assert "b/a = " in out


def test_train_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_train, "extract_subset", interrupted)
    code, _, err = run(["train", *TINY, "--archive", str(archive(tmp_path / "two.tar.gz", 2, 8))], capsys)
    assert code == 130 and err.strip() == "interrupted"


# --------------------------------------------------------------------------- predict: timings


def test_predict_times_each_call_for_at_least_a_fifth_of_a_second():
    calls = []
    per_call, n = bench_predict.timed(lambda: calls.append(1))
    assert n == len(calls) > 1 and per_call * n >= bench_predict.MIN_SECONDS


def test_predict_runs_tiny_and_says_fold_once(capsys):
    code, out, err = run(["predict", "--backbone", "timm:test_resnet", "--image-size", "8", "--images", "4",
                          "--folds", "1", "--repeats", "1"], capsys)
    assert code == 0, err
    assert "predict, 1 fold (fold mean)" in out and "1 folds" not in out
    assert "load average" in out and "each timing >= 0.2 s" in out


def test_predict_ctrl_c_is_one_line(capsys, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_predict, "timed", interrupted)
    code, _, err = run(["predict", "--backbone", "timm:test_resnet", "--image-size", "8", "--images", "4",
                        "--folds", "1", "--repeats", "1"], capsys)
    assert code == 130 and err.strip() == "interrupted"


def test_predict_faster_than_one_pass_is_a_warning(capsys, monkeypatch):
    real = bench_predict.timed
    fake = {"single": (0.5, 1), "ensemble": (0.25, 1)}  # 2 folds in half the time of one pass: impossible
    monkeypatch.setattr(bench_predict, "timed", lambda fn, *a: fake.get(fn.__name__) or real(fn, *a))
    code, out, err = run(["predict", "--backbone", "timm:test_resnet", "--image-size", "8", "--images", "4",
                          "--folds", "2", "--repeats", "1"], capsys)
    assert code == 0, err
    assert "ratio predict / single: 2.000" in out
    assert "warning: unreliable: predict over 2 folds ran faster than one forward pass" in out


def test_bench_without_a_name_prints_its_usage_on_stderr(capsys):
    code, out, err = run([], capsys)
    assert code == 2 and out == "" and err.startswith("usage: python -m ensemble.bench <name>")
