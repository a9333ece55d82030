"""Inference throughput of ``predict``: one backbone x k fold models against one forward pass.

    python -m ensemble.bench predict [--backbone timm:resnet18 --folds 5 --images 1024
                                      --image-size 32 --channels 3 --batch-size 256 --repeats 3]

Side by side in one process, alternating, on the same uint8 images: (a) one forward pass of
one model (``train.infer``, as ``fit`` scores a fold) and (b) ``predict.member_logits`` over the
k fold models (k forward passes per image, then the fold mean). Prints images/s of both and
their ratio, expected near 1/k. Weights are random (speed does not depend on them). Also times
decoding the same images from PNG files with ``predict.read_inputs``, the other cost of a run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ensemble import backbones, store
from ensemble.bench._args import check_at_least, check_backbone, check_device
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
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each side; the median is kept")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"folds": 1, "images": 1, "image_size": 1, "classes": 2, "batch_size": 1,
                             "repeats": 1, "seed": 0})
    args.device = check_device(p, args.device)
    check_backbone(p, args.backbone)
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


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def decode_rate(x: torch.Tensor, info: DataInfo) -> float:
    """Images/s of read_inputs on ``x`` (N, C, S, S) written as PNG files."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(x.numpy()):
            Image.fromarray(img.transpose(1, 2, 0).squeeze(-1) if img.shape[0] == 1 else img.transpose(1, 2, 0)) \
                .save(Path(tmp) / f"{i:05d}.png")
        read_inputs([str(Path(tmp) / "00000.png")], info)  # warm-up: imports, decoder set-up
        start = time.perf_counter()
        got = read_inputs([tmp], info)
        seconds = time.perf_counter() - start
    assert torch.equal(got.x, x), "decoded PNGs differ from the images written"
    return len(x) / seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        a += timed(single, 1)
        b += timed(ensemble, 1)
    sa, sb = statistics.median(a), statistics.median(b)
    check = member_logits([member], x[:8], mean, std, device, batch_size=args.batch_size)[0]
    expected = torch.stack([infer(m, x[:8], mean, std, device, channels_last=True) for m in member.models]).mean(0)
    assert np.allclose(check, expected.numpy(), atol=1e-4), "member_logits is not the fold mean"
    info = DataInfo(tuple(map(str, range(args.classes))), args.channels, args.image_size, mean, std)
    print(f"{args.backbone} ({args.stem} stem), {args.images} random {args.channels}x{args.image_size}x"
          f"{args.image_size} images, batch {args.batch_size}, {device} with {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'single forward pass (1 model)':<36} {args.images / sa:>9.1f} images/s  ({sa:.2f} s)")
    print(f"{f'predict, {args.folds} folds (fold mean)':<36} {args.images / sb:>9.1f} images/s  ({sb:.2f} s)")
    print(f"ratio predict / single: {sa / sb:.3f} (1/{args.folds} = {1 / args.folds:.3f})")
    print(f"{'decoding PNG files (read_inputs)':<36} {decode_rate(x, info):>9.1f} images/s")
    return 0
