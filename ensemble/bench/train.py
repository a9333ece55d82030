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

``(warmup + steps) * batch-size`` images, spread evenly over the classes, are extracted from the
archive (32x32 images only, so that (b) and (c) do the same work) to a temporary ImageFolder,
which (b) reads through the toolkit's own ``folder`` loader and (c) through torchvision. Each of
``--rounds`` rounds times ``--steps`` steps of a, b and c in turn (rotating the order), so that
changes in the machine's speed fall on all three alike. Prints img/s of each and the ratios b/a
and b/c, each the median over the rounds (and per round), against the targets for 2 CPU cores
(set for the default batch size and threads). A warning follows when the rounds disagree by more
than 1.5x or b/a exceeds 1.05 ((a) is the ceiling of (b)): the machine's load changed under the run.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ensemble.bench._args import check_at_least, check_backbone, check_model_runs

# b/a and b/c targets on 2 CPU cores (the acceptance figures)
TARGETS = {"timm:test_resnet": {"b/a": 0.90, "b/c": 2.0}, "timm:resnet18": {"b/a": 0.95}}
DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10" / "train.tar.gz"
IMAGE_SIZE = 32
DEFAULT_BATCH, DEFAULT_THREADS = 128, 2  # the settings the targets are for
SPREAD = 1.5  # max/min of the per-round ratios above which the rounds are said to disagree
CEILING = 1.05  # b/a above this: (b) beat its own ceiling (a), so the machine's speed changed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, _, details = __doc__.partition("\n")  # the summary once, as the description; the rest after the options
    p = argparse.ArgumentParser(prog="python -m ensemble.bench train", description=summary,
                                epilog=details.strip("\n"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:test_resnet", help="backbone name (default timm:test_resnet)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each loop per round (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps before the first round; before every round for (c) (default 3)")
    p.add_argument("--rounds", type=int, default=8, help="rounds; each times a, b and c in turn (default 8)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"images per step (default {DEFAULT_BATCH})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch threads of the training process (default {DEFAULT_THREADS})")
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
    check_model_runs(p, args.backbone, classes=10, channels=3, image_size=IMAGE_SIZE, batch_size=args.batch_size,
                     train=True)
    return args


# --------------------------------------------------------------------------- images


def extract_subset(archive: Path, n: int, out: Path) -> int:
    """Write ``n`` images of ``archive``, spread evenly over its class folders, to ``out/<class>/``.

    The archive holds ``[top/]<class>/<image>`` members; the first images of each class are taken,
    round-robin over the classes, until ``n`` are written or the archive has no more. Returns the
    number written. Raises ValueError for fewer than 2 classes or an image that is not 32x32
    (tarfile.TarError for a file that is no tar archive).
    """
    from PIL import Image

    from ensemble import data

    kept: dict[str, list[tuple[str, bytes]]] = {}  # class -> its first n images, in archive order
    with tarfile.open(archive, mode="r|*") as tf:
        for member in tf:
            parts = data.tar_parts(member.name)
            if not member.isfile() or len(parts) < 2 or data.is_hidden(parts) or not data.is_image(parts[-1]):
                continue
            images = kept.setdefault(parts[-2], [])
            if len(images) < n:
                images.append((parts[-1], tf.extractfile(member).read()))
    if len(kept) < 2:
        raise ValueError(f"'{archive}': expected class folders of images, found {len(kept)} class(es)")
    order = sorted(((i, label) for label, images in kept.items() for i in range(len(images))))[:n]  # round-robin
    for i, label in order:
        name, blob = kept[label][i]
        try:
            with Image.open(io.BytesIO(blob)) as im:
                size = im.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise ValueError(f"'{archive}': {label}/{name} is no readable image ({data.pil_reason(exc)})") from None
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"'{archive}': {label}/{name} is {size[0]}x{size[1]}; this benchmark needs "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE} images, so that (b) and (c) do the same work")
        (out / label).mkdir(parents=True, exist_ok=True)
        (out / label / name).write_bytes(blob)
    return len(order)


def load_toolkit_images(folder: Path, cache: Path):
    """The toolkit's own ``folder`` loader on ``folder``: (uint8 (N, 3, 32, 32), int64 (N,), mean, std); grayscale
    images are repeated to 3 channels so that (a), (b) and (c) train the same 3-channel model."""
    from ensemble.data import load_dataset
    from ensemble.recipe import DataConfig

    ds = load_dataset(DataConfig(source="folder", path=str(folder), image_size=IMAGE_SIZE), cache, seed=0,
                      progress=False)
    x, mean, std = ds.train.x, ds.mean, ds.std
    if x.shape[1] == 1:  # all-gray images: RGB, as (a)'s batches and torchvision's ImageFolder loader in (c) are
        x, mean, std = x.expand(-1, 3, -1, -1).contiguous(), mean * 3, std * 3
    return x, ds.train.y, mean, std


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
    """Print img/s of each loop and the ratios b/a and b/c, each the median over the rounds, with a
    warning when the rounds disagree or b beats its ceiling a; returns the ratios.

    Medians, not rates pooled over all rounds: one round slowed by another process would decide a
    pooled figure (and its verdict) alone.
    """
    images = args.steps * args.batch_size
    labels = {"a": "model (synthetic tensors)", "b": "toolkit step", "c": "classic DataLoader loop"}
    for k in ("a", "b", "c"):
        rates = [images / s for s in seconds[k]]
        per_round = ", ".join(f"{r:.0f}" for r in rates)
        print(f"({k}) {labels[k]:<27} {statistics.median(rates):>8.0f} img/s   (median of rounds: {per_round})")
    targets = TARGETS.get(args.backbone, {})
    at_defaults = (args.batch_size, args.threads) == (DEFAULT_BATCH, DEFAULT_THREADS)
    ratios, warnings = {}, []
    for key in ("b/a", "b/c"):
        num, den = key.split("/")
        rounds = [sd / sn for sn, sd in zip(seconds[num], seconds[den])]  # rate ratio = inverse time ratio
        ratios[key] = value = statistics.median(rounds)
        per_round = ", ".join(f"{r:.2f}" for r in rounds)
        spread = max(rounds) / min(rounds)
        if spread > SPREAD:
            warnings.append(f"{key}: the rounds vary {spread:.1f}x ({min(rounds):.2f} .. {max(rounds):.2f})")
        if key == "b/a" and value > CEILING:
            warnings.append(f"b/a = {value:.3f} > 1: the toolkit step beat the model alone, its ceiling")
        target = verdict = ""
        if key in targets:
            target = f"  target >= {targets[key]:.2f} on 2 CPU cores"
            target += ":" if at_defaults else f" (set for batch {DEFAULT_BATCH}, {DEFAULT_THREADS} threads):"
            verdict = " met" if value >= targets[key] else " NOT met"
        print(f"{key} = {value:.3f} median   (rounds: {per_round}){target}{verdict}")
    if warnings:
        print(f"warning: unreliable: {'; '.join(warnings)}; the machine's speed changed during the run "
              f"(load average now {os.getloadavg()[0]:.2f}): rerun on an idle machine")
    else:
        print(f"load average now {os.getloadavg()[0]:.2f}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return bench(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def bench(args: argparse.Namespace) -> int:
    from ensemble.recipe import TrainConfig

    archive = args.archive.resolve()
    wanted = ("pass --archive PATH to a tar(.gz) of a CIFAR-style ImageFolder (class folders of 32x32 images), "
              "e.g. the CIFAR-10 training set")
    if archive.is_dir():
        print(f"error: '{archive}' is a folder, not a tar(.gz); {wanted}", file=sys.stderr)
        return 2
    if not archive.is_file():
        print(f"error: no archive at '{archive}'; {wanted}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size)  # recipe defaults: SGD, flip + crop, channels_last
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-") as tmp:
        folder = Path(tmp) / "images"
        n_needed = (args.warmup + args.steps) * args.batch_size
        try:
            n = extract_subset(archive, n_needed, folder)
        except (tarfile.TarError, EOFError, OSError) as exc:
            print(f"error: '{archive}' is not a readable tar(.gz) archive ({exc}); {wanted}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
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
