"""Training throughput of one backbone, three ways, side by side in one process.

    python -m ensemble.bench train --backbone timm:test_resnet [--steps 10 --warmup 3 --rounds 8
        --batch-size 128 --threads 2 --workers 2 --classic-channels-last
        --archive ../shared/data/cifar10/train.tar.gz]

(a) model    forward + backward + SGD step on one synthetic float batch already in memory:
             the speed of the model itself, the ceiling for (b).
(b) toolkit  the toolkit's own step, the code ``train_member`` runs (``TrainStep`` + ``run_epoch``):
             the CIFAR images as one uint8 tensor in memory, index-slice batches, batched flip + crop,
             normalisation, channels_last (recipe default), SGD and the per-step LambdaLR schedule.
(c) classic  the usual notebook loop on the same images: torchvision ``ImageFolder`` + ``DataLoader``
             (``--workers`` processes, shuffled) + per-image PIL ``RandomCrop(32, padding=4)``,
             ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``.

All three train the same backbone (fresh, same seed) with the same optimizer, batch size, threads,
warm-up and number of timed steps. (a) and (b) use the toolkit's memory format (channels_last, the
recipe default); (c) trains NCHW as a notebook does, or, with ``--classic-channels-last``, in the
toolkit's format too, so that only the source of the batches differs.

``(warmup + steps) * batch-size`` images are extracted from the archive to a temporary ImageFolder,
which (b) reads through the toolkit's own ``folder`` loader and (c) through torchvision. Each of
``--rounds`` rounds times ``--steps`` steps of a, b and c in turn (rotating the order), so that
changes in the machine's speed fall on all three alike. Prints img/s of each and the ratios b/a
and b/c (over all rounds, and per round) against the targets for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ensemble.bench._args import check_at_least, check_backbone

# b/a and b/c targets on 2 CPU cores (the acceptance figures)
TARGETS = {"timm:test_resnet": {"b/a": 0.90, "b/c": 2.0}, "timm:resnet18": {"b/a": 0.95}}
DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10" / "train.tar.gz"
IMAGE_SIZE = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, _, details = __doc__.partition("\n")  # the summary once, as the description; the rest after the options
    p = argparse.ArgumentParser(prog="python -m ensemble.bench train", description=summary,
                                epilog=details.strip("\n"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:test_resnet", help="backbone name (default timm:test_resnet)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each loop per round (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps before the first round; before every round for (c) (default 3)")
    p.add_argument("--rounds", type=int, default=8, help="rounds; each times a, b and c in turn (default 8)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process (default 2)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of (c) (default 2)")
    p.add_argument("--classic-channels-last", action="store_true",
                   help="train (c) in the toolkit's memory format too, so that b/c compares the data paths "
                        "alone (default: NCHW, as a notebook writes it)")
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE,
                   help="tar(.gz) of a CIFAR-style ImageFolder (default ../shared/data/cifar10/train.tar.gz "
                        "relative to the repository root)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"steps": 1, "warmup": 0, "rounds": 1, "batch_size": 1, "threads": 1, "workers": 0})
    check_backbone(p, args.backbone)
    return args


# --------------------------------------------------------------------------- images


def extract_subset(archive: Path, per_class: int, out: Path) -> int:
    """Write the first ``per_class`` images of every class folder in ``archive`` to ``out/<class>/``.

    The archive holds ``[top/]<class>/<image>`` members; returns the number of images written.
    """
    from ensemble import data

    counts: dict[str, int] = {}
    with tarfile.open(archive, mode="r|*") as tf:
        for member in tf:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if not member.isfile() or len(parts) < 2 or data.is_hidden(tuple(parts)) or not data.is_image(parts[-1]):
                continue
            label = parts[-2]
            if counts.get(label, 0) >= per_class:
                continue
            (out / label).mkdir(parents=True, exist_ok=True)
            (out / label / parts[-1]).write_bytes(tf.extractfile(member).read())
            counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        raise ValueError(f"{archive}: expected class folders of images, found {len(counts)} class(es)")
    return sum(counts.values())


def load_toolkit_images(folder: Path, cache: Path):
    """The toolkit's own ``folder`` loader on ``folder``: (uint8 (N, 3, 32, 32), int64 (N,), mean, std)."""
    from ensemble.data import load_dataset
    from ensemble.recipe import DataConfig

    ds = load_dataset(DataConfig(source="folder", path=str(folder), image_size=IMAGE_SIZE), cache, seed=0,
                      progress=False)
    return ds.train.x, ds.train.y, ds.mean, ds.std


# --------------------------------------------------------------------------- the three loops


def make_model(name: str, n_classes: int, channels_last: bool) -> torch.nn.Module:
    from ensemble import backbones

    torch.manual_seed(0)
    model = backbones.create(name, num_classes=n_classes, in_chans=3)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, label_smoothing: float):
    """forward, loss, backward, update on a float batch already prepared: (x, y) -> None."""

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(run: Callable[[int], None], warmup: int, steps: int) -> float:
    """Seconds taken by ``run(steps)`` after an untimed ``run(warmup)``."""
    if warmup:
        run(warmup)
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def rounds_of(run: Callable[[int], None], warmup: int, steps: int) -> Callable[[], float]:
    """A round of ``steps`` timed steps of ``run``; the first round warms up first."""
    warmed = False

    def one_round() -> float:
        nonlocal warmed
        seconds = timed(run, 0 if warmed else warmup, steps)
        warmed = True
        return seconds

    return one_round


def model_loop(args, cfg, n_classes: int) -> Callable[[], float]:
    """(a): a round = timed steps on one synthetic batch in memory; returns their seconds."""
    from ensemble.train import make_optimizer, use_channels_last

    cl = use_channels_last(cfg, torch.device("cpu"))
    model = make_model(args.backbone, n_classes, cl).train()
    step = plain_step(model, make_optimizer(model, cfg), cfg.label_smoothing)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn((args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    xb = xb.contiguous(memory_format=torch.channels_last) if cl else xb
    yb = torch.randint(0, n_classes, (args.batch_size,), generator=g)

    def run(n: int) -> None:
        for _ in range(n):
            step(xb, yb)

    return rounds_of(run, args.warmup, args.steps)


def toolkit_loop(args, cfg, x, y, mean, std, n_classes: int) -> Callable[[], float]:
    """(b): a round = ``train.run_epoch`` over the timed steps with the toolkit's ``TrainStep``."""
    from ensemble.train import TrainStep, run_epoch

    cpu = torch.device("cpu")
    model = make_model(args.backbone, n_classes, False)
    step = TrainStep(model, cfg, args.warmup + args.rounds * args.steps, mean, std, cpu)
    gen = torch.Generator().manual_seed(0)

    def run(n: int) -> None:
        loss, _, _ = run_epoch(step, x, y, args.batch_size, gen, steps=n)
        loss.item()  # read once per epoch, as train_member does

    return rounds_of(run, args.warmup, args.steps)


def classic_loop(args, cfg, folder: Path, mean, std, n_classes: int) -> Callable[[], float]:
    """(c): a round = a fresh epoch of ImageFolder + DataLoader + per-image PIL transforms.

    The DataLoader's workers start during the warm-up steps of every round, as at the
    start of a notebook's epoch (untimed), and never run while (a) or (b) are timed. The
    model is NCHW, as a notebook has it, unless ``--classic-channels-last``.
    """
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from ensemble.train import make_optimizer, use_channels_last

    cl = args.classic_channels_last and use_channels_last(cfg, torch.device("cpu"))
    model = make_model(args.backbone, n_classes, cl).train()
    step = plain_step(model, make_optimizer(model, cfg), cfg.label_smoothing)
    tf = transforms.Compose([
        transforms.RandomCrop(IMAGE_SIZE, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    loader = DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(0))

    def one_round() -> float:
        batches = iter(loader)

        def run(n: int) -> None:
            for _ in range(n):
                xb, yb = next(batches)
                step(xb.contiguous(memory_format=torch.channels_last) if cl else xb, yb)

        seconds = timed(run, args.warmup, args.steps)
        batches = None  # drops the iterator: stops its workers before the next loop is timed
        return seconds

    return one_round


def measure(loops: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Timed seconds of every loop in every round; the order rotates each round (abc, bca, cab, ...)

    so that a change of machine load between rounds falls on every loop alike.
    """
    names = list(loops)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            seconds[k].append(loops[k]())
    return seconds


# --------------------------------------------------------------------------- report


def report(args, seconds: dict[str, list[float]]) -> dict[str, float]:
    """Print img/s of each loop (all rounds together) and the ratios; returns the ratios."""
    images = args.steps * args.batch_size
    rate = {k: images * len(v) / sum(v) for k, v in seconds.items()}
    labels = {"a": "model (synthetic tensors)", "b": "toolkit step", "c": "classic DataLoader loop"}
    for k in ("a", "b", "c"):
        per_round = ", ".join(f"{images / s:.0f}" for s in seconds[k])
        print(f"({k}) {labels[k]:<27} {rate[k]:>8.0f} img/s   (rounds: {per_round})")
    targets = TARGETS.get(args.backbone, {})
    ratios = {"b/a": rate["b"] / rate["a"], "b/c": rate["b"] / rate["c"]}
    for key, value in ratios.items():
        num, den = key.split("/")
        per_round = ", ".join(f"{sd / sn:.2f}" for sn, sd in zip(seconds[num], seconds[den]))
        target = f"  target >= {targets[key]:.2f} on 2 CPU cores:" if key in targets else ""
        verdict = (" met" if value >= targets[key] else " NOT met") if key in targets else ""
        print(f"{key} = {value:.3f}   (rounds: {per_round}){target}{verdict}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    from ensemble.recipe import TrainConfig

    args = parse_args(argv)
    archive = args.archive.resolve()
    if not archive.is_file():
        print(f"error: no archive at '{archive}'; pass --archive PATH to a tar(.gz) of a CIFAR-style "
              "ImageFolder (class folders of 32x32 images), e.g. the CIFAR-10 training set", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size)  # recipe defaults: SGD, flip + crop, channels_last
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-") as tmp:
        folder = Path(tmp) / "images"
        n_needed = (args.warmup + args.steps) * args.batch_size
        n = extract_subset(archive, math.ceil(n_needed / 10), folder)
        if n < n_needed:
            print(f"error: {args.warmup + args.steps} steps of {args.batch_size} need {n_needed} images; "
                  f"'{archive}' gave {n}: lower --steps or --batch-size", file=sys.stderr)
            return 2
        x, y, mean, std = load_toolkit_images(folder, Path(tmp) / "cache")
        n_classes = int(y.max()) + 1
        print(f"{args.backbone}: batch {args.batch_size}, {args.threads} threads, {args.warmup} warm-up steps, "
              f"{args.rounds} rounds of {args.steps} timed steps per loop, {n} images from {archive.name}, "
              f"(c) with {args.workers} DataLoader workers; channels_last: (a) (b) {cfg.channels_last}, "
              f"(c) {args.classic_channels_last and cfg.channels_last}; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        loops = {
            "a": model_loop(args, cfg, n_classes),
            "b": toolkit_loop(args, cfg, x, y, mean, std, n_classes),
            "c": classic_loop(args, cfg, folder, mean, std, n_classes),
        }
        seconds = measure(loops, args.rounds)
    report(args, seconds)
    return 0
