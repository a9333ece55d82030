"""Inference throughput of ``predict``: one backbone x k fold models against one forward pass.

    python -m ensemble.bench predict [--backbone timm:resnet18 --folds 5 --images 1024
                                      --image-size 32 --channels 3 --batch-size 256 --repeats 3]

Side by side in one process, alternating, on the same uint8 images: (a) one forward pass of
one model (``train.infer``, as ``fit`` scores a fold) and (b) ``predict.member_logits`` over the
k fold models (k forward passes per image, then the fold mean). Each timing repeats its call
until it has taken at least 0.2 s (a shorter time is mostly timer and scheduling noise), and the
median of ``--repeats`` such timings is kept. Prints images/s of both and their ratio, expected
near 1/k, with a warning when it is above 1 (k passes cannot be faster than one: the machine's
load changed). Weights are random (speed does not depend on them). Also times decoding the same
images from PNG files with ``predict.read_inputs``, the other cost of a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ensemble import backbones, store
from ensemble.bench._args import (
    check_at_least,
    check_backbone,
    check_device,
    check_model_runs,
)
from ensemble.predict import DataInfo, Member, MemberModels, member_logits, read_inputs
from ensemble.recipe import BackboneConfig
from ensemble.train import infer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.bench predict", description=store.summary(__doc__))
    p.add_argument("--backbone", default="timm:resnet18", help="backbone name (default timm:resnet18)")
    p.add_argument("--stem", default="default", choices=("default", "cifar"), help="stem (default: default)")
    p.add_argument("--folds", type=int, default=5, help="fold models (default 5)")
    p.add_argument("--images", type=int, default=1024, help="images (default 1024)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels (default 3)")
    p.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats of each side, alternating; the median is kept (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"folds": 1, "images": 1, "image_size": 1, "classes": 2, "batch_size": 1,
                             "repeats": 1, "seed": 0})
    args.device = check_device(p, args.device)
    check_backbone(p, args.backbone)
    check_model_runs(p, args.backbone, classes=args.classes, channels=args.channels, image_size=args.image_size,
                     batch_size=args.batch_size, train=False, stem=args.stem)
    return args


def fold_models(args: argparse.Namespace, device: torch.device) -> MemberModels:
    """``args.folds`` randomly initialised copies of the backbone, as predict would load them."""
    models = []
    for k in range(args.folds):
        torch.manual_seed(args.seed + k)
        net = backbones.create(args.backbone, args.classes, args.channels, stem=args.stem)
        models.append(net.to(device).eval().to(memory_format=torch.channels_last))
    member = Member("bench", BackboneConfig(name=args.backbone, alias="bench"), "weights.safetensors")
    return MemberModels(member, models, channels_last=True)


MIN_SECONDS = 0.2  # a timing shorter than this is mostly timer and scheduling noise
CEILING = 1.05  # predict / single above this: k passes beat one, so the machine's speed changed


def timed(fn, min_seconds: float = MIN_SECONDS) -> tuple[float, int]:
    """(seconds per call, calls): ``fn`` called again and again until the calls took ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return seconds / calls, calls


def decode_rate(x: torch.Tensor, info: DataInfo, repeats: int) -> float:
    """Images/s of read_inputs on ``x`` (N, C, S, S) written as PNG files (median of ``repeats`` timings)."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(x.numpy()):
            Image.fromarray(img.transpose(1, 2, 0).squeeze(-1) if img.shape[0] == 1 else img.transpose(1, 2, 0)) \
                .save(Path(tmp) / f"{i:05d}.png")
        read_inputs([str(Path(tmp) / "00000.png")], info)  # warm-up: imports, decoder set-up
        seconds = statistics.median(timed(lambda: read_inputs([tmp], info))[0] for _ in range(repeats))
        got = read_inputs([tmp], info)
    assert torch.equal(got.x, x), "decoded PNGs differ from the images written"
    return len(x) / seconds


def main(argv: list[str] | None = None) -> int:
    try:
        return bench(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def bench(args: argparse.Namespace) -> int:
    device = args.device
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.images, args.channels, args.image_size, args.image_size),
                      dtype=torch.uint8, generator=gen)
    mean, std = (0.5,) * args.channels, (0.25,) * args.channels
    member = fold_models(args, device)
    one = member.models[0]

    def single():
        infer(one, x, mean, std, device, args.batch_size, channels_last=True)

    def ensemble():
        member_logits([member], x, mean, std, device, batch_size=args.batch_size)

    single(), ensemble()  # warm-up (allocator, oneDNN/cuDNN kernel choice)
    a, b = [], []
    for _ in range(args.repeats):  # alternate, so that load changes hit both sides alike
        a.append(timed(single))
        b.append(timed(ensemble))
    (sa, na), (sb, nb) = (statistics.median_low(t) for t in (a, b))  # median time, with its number of calls
    check = member_logits([member], x[:8], mean, std, device, batch_size=args.batch_size)[0]
    expected = torch.stack([infer(m, x[:8], mean, std, device, channels_last=True) for m in member.models]).mean(0)
    assert np.allclose(check, expected.numpy(), atol=1e-4), "member_logits is not the fold mean"
    info = DataInfo(tuple(map(str, range(args.classes))), args.channels, args.image_size, mean, std)
    print(f"{args.backbone} ({args.stem} stem), {args.images} random {args.channels}x{args.image_size}x"
          f"{args.image_size} images, batch {args.batch_size}, {device} with {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, each timing >= {MIN_SECONDS} s; load average {os.getloadavg()[0]:.2f}")
    folds = f"{args.folds} fold{'s' if args.folds > 1 else ''}"
    print(f"{'single forward pass (1 model)':<36} {args.images / sa:>9.1f} images/s  ({sa:.3f} s a call, {na} calls)")
    print(f"{f'predict, {folds} (fold mean)':<36} {args.images / sb:>9.1f} images/s  ({sb:.3f} s a call, {nb} calls)")
    print(f"ratio predict / single: {sa / sb:.3f} (1/{args.folds} = {1 / args.folds:.3f})")
    if sa / sb > CEILING:
        print(f"warning: unreliable: predict over {folds} ran faster than one forward pass, which it cannot; "
              f"the machine's speed changed during the run (load average now {os.getloadavg()[0]:.2f}): "
              "rerun on an idle machine")
    print(f"{'decoding PNG files (read_inputs)':<36} {decode_rate(x, info, args.repeats):>9.1f} images/s")
    return 0
