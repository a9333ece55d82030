"""The one training loop, for every backbone, fold and snapshot schedule.

Data stays a uint8 tensor on the training device; a batch is an index slice,
augmented as a whole (airbench style) and normalised on the fly. The logits kept
for the held-out fold are those of the model at the end of its fixed schedule
(or at the end of each snapshot cycle): nothing is chosen by looking at them.

:class:`TrainStep` is one optimizer step and :func:`run_epoch` one pass of
index-slice batches; ``train_member`` and ``python -m ensemble.bench train``
both run exactly these, so the benchmark measures the real code.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import Augment, make_augment, normalize
from .progress import bar as progress_bar
from .recipe import TrainConfig


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or non-finite held-out logits."""


@dataclass
class MemberOutput:
    """What one (backbone, fold) job produces; S = number of kept snapshots (1 without)."""

    oof_logits: np.ndarray  # float32 (S, n_val, n_classes)
    test_logits: np.ndarray | None  # float32 (S, n_test, n_classes)
    history: dict  # {"epochs": [...], "snapshot_epochs": [...]}
    states: list[dict[str, torch.Tensor]]  # S state dicts on the CPU; the last is the final model


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{name!r} asks for CUDA, but no CUDA device is available; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= n:
            raise ValueError(f"{name!r} asks for CUDA device {device.index}, but there are {n} (cuda:0..cuda:{n - 1})")
    return device


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at each optimizer step (updated every step).

    onecycle: linear warm-up, then linear decay to 0. cosine: warm-up, then cosine
    to 0. snapshots = M: M cosine cycles restarting at the full rate (Huang et al., 2017),
    in place of ``schedule`` and ``warmup``.
    """
    if cfg.snapshots:
        cycle = total_steps / cfg.snapshots
        return lambda step: 0.5 * (1 + math.cos(math.pi * (step % cycle) / cycle))
    warm = round(cfg.warmup * total_steps)  # not int(): 0.29 * 100 is 28.999...

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 1 - t if cfg.schedule == "onecycle" else 0.5 * (1 + math.cos(math.pi * t))

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only: biases, normalisation scales and what the model names in
    timm's ``no_weight_decay()`` (a ViT's position embedding and class token, relative position
    bias tables) are left alone."""
    keep = _no_weight_decay(model)  # names, or fnmatch patterns as timm reads them (XCiT: 'pos_embed.*')
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    spared = {n for n, _ in named if any(fnmatch.fnmatchcase(n, k) for k in keep)}
    decay = [p for n, p in named if p.ndim > 1 and n not in spared]
    rest = [p for n, p in named if p.ndim <= 1 or n in spared]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _no_weight_decay(model: nn.Module) -> set[str]:
    """Parameter names the model (or a timm module inside it) asks to keep out of weight decay."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        ask = getattr(module, "no_weight_decay", None)
        if callable(ask):
            names |= {f"{prefix}.{n}" if prefix else n for n in ask()}
    return names


def _autocast(device: torch.device):
    """bf16 autocast on GPUs with native bf16 (compute capability 8 and up: A100, H100, RTX 30xx on);
    float32 on older GPUs, where torch emulates bf16 slowly, and on the CPU, where bf16 was measured
    14x slower on CPUs without AVX-512."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a job on ``device`` trains (and infers) in channels_last memory format.

    On CUDA (tensor cores want NHWC) and on the CPU (oneDNN: timm:test_resnet and
    timm:resnet18 train 15-30% faster in channels_last on one thread here).
    """
    return cfg.channels_last and device.type in ("cpu", "cuda")


def _prepare(x: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32, then channels_last if asked.

    In this order: per-channel arithmetic on NCHW is vectorised, on NHWC it is not
    (a uint8 NHWC copy plus normalising it took 3x longer on one CPU thread).
    """
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; pinned and non-blocking when that is CUDA."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@torch.inference_mode()
def infer(
    model: nn.Module,
    x: torch.Tensor,
    mean,
    std,
    device: torch.device,
    batch_size: int = 512,
    channels_last: bool = False,
    tta_flip: bool = False,
) -> torch.Tensor:
    """Logits (N, n_classes), float32 on the CPU, for uint8 images ``x`` (N, C, H, W).

    Batched, in eval mode, without autograd; ``x`` may already be on ``device``.
    Logits stay on the device until the end, so a GPU never waits for the host.
    """
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = _prepare(_to_device(x[start : start + batch_size], device), mean, std, channels_last)
        with _autocast(device):
            logits = model(xb).float()
            if tta_flip:
                logits = (logits + model(xb.flip(-1)).float()) / 2
        out.append(logits)
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out).cpu()


class TrainStep:
    """One optimizer step on a uint8 batch: augment, normalise, forward, loss, backward, update.

    Built once per job: moves ``model`` to ``device`` (channels_last where
    :func:`use_channels_last` says so), makes its optimizer and its per-step LR
    schedule over ``total_steps``. ``self.model`` is the trained module (for
    :func:`infer` and state dicts); with ``cfg.compile`` the step runs a
    ``torch.compile``'d view of it.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, mean, std, device: torch.device):
        self.channels_last = use_channels_last(cfg, device)
        self.model = model.to(device, memory_format=torch.channels_last) if self.channels_last else model.to(device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, total_steps))
        self.augment: Augment = make_augment(cfg.augment)
        self.label_smoothing = cfg.label_smoothing
        self.mean, self.std, self.device = mean, std, device

    def __call__(
        self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on uint8 ``xb`` (B, C, H, W) and int64 ``yb`` (B,), both on the device.

        Returns (summed plain cross-entropy, number correct) of the batch as 0-d
        tensors on the device: nothing here waits for a GPU.
        """
        xb = _prepare(self.augment(xb, generator), self.mean, self.std, self.channels_last)
        with _autocast(self.device):
            out = self.forward(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            out = out.detach().float()
            return F.cross_entropy(out, yb, reduction="sum"), (out.argmax(1) == yb).sum()


def run_epoch(
    step: TrainStep,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    steps: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``steps`` (default ``len(x) // batch_size``) steps on index slices of a fresh permutation.

    ``x`` uint8 (N, C, H, W) and ``y`` int64 (N,) on the training device; the last
    partial batch is dropped. Returns (summed loss, number correct, rows seen), the
    first two as 0-d device tensors (read them once, at the end).
    """
    n = len(x)
    steps = n // batch_size if steps is None else steps
    if steps * batch_size > n:
        raise ValueError(f"{steps} steps of {batch_size} rows need {steps * batch_size} rows; got {n}")
    step.model.train()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    perm = torch.randperm(n, device=x.device, generator=generator)
    for s in range(steps):
        idx = perm[s * batch_size : (s + 1) * batch_size]
        batch_loss, batch_correct = step(x[idx], y[idx], generator)
        loss_sum += batch_loss
        correct += batch_correct
        if on_batch is not None:
            on_batch()
    return loss_sum, correct, steps * batch_size


def _snapshot_epochs(cfg: TrainConfig) -> list[int]:
    if not cfg.snapshots:
        return [cfg.epochs]
    every = cfg.epochs // cfg.snapshots
    return list(range(every, cfg.epochs + 1, every))


def _state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _check_finite(row: dict, val_logits: torch.Tensor, cfg: TrainConfig, desc: str) -> None:
    """Raise :class:`DivergedError` when an epoch's train loss or held-out logits are not finite."""
    loss_ok = math.isfinite(row["train_loss"])
    if not loss_ok or not torch.isfinite(val_logits).all():
        what = "held-out logits" if loss_ok else f"train loss {row['train_loss']:g}"
        raise DivergedError(
            f"{desc or 'training'} diverged in epoch {row['epoch']} ({what} not finite): "
            f"lower its lr (now {cfg.lr:g})"
            + (" (its snapshot cycles have no warm-up)" if cfg.snapshots else
               f" or raise train.warmup (now {cfg.warmup:g})")
        )


def train_member(
    model: nn.Module,
    cfg: TrainConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test_x: torch.Tensor | None,
    mean,
    std,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "",
) -> MemberOutput:
    """Train ``model`` on ``train`` for the fixed schedule; keep held-out and test logits.

    ``train`` and ``val`` are (uint8 images (N, C, H, W), int64 labels (N,)).
    Per epoch the history records train loss/accuracy (on the augmented batches)
    and held-out loss/accuracy (plain cross-entropy, no label smoothing).
    All images are copied to ``device`` once, as uint8.
    """
    # copied once: plain copies, since pinning would first make a second, page-locked host copy of them all
    x, y = train[0].to(device), train[1].to(device)
    val_x = val[0].to(device)
    test_x = None if test_x is None else test_x.to(device)
    bs = min(cfg.batch_size, len(x))
    steps = len(x) // bs  # the last partial batch is dropped; every row is seen across epochs
    step = TrainStep(model, cfg, cfg.epochs * steps, mean, std, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = set(_snapshot_epochs(cfg))
    history: dict = {"epochs": [], "snapshot_epochs": sorted(keep) if cfg.snapshots else []}
    oof, test, states = [], [], []

    with progress_bar(progress=progress, total=cfg.epochs * steps, desc=desc, unit="batch") as bar:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = step.optimizer.param_groups[0]["lr"]
            loss_sum, correct, seen = run_epoch(step, x, y, bs, gen, on_batch=bar.update)
            val_logits = infer(step.model, val_x, mean, std, device, channels_last=step.channels_last)
            row = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen,
                "val_loss": F.cross_entropy(val_logits, val[1]).item(),
                "val_acc": (val_logits.argmax(1) == val[1]).float().mean().item(),
                "seconds": time.perf_counter() - t0,
            }
            _check_finite(row, val_logits, cfg, desc)
            history["epochs"].append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}",
                            refresh=False)  # shown at the bar's next timed update
            if epoch in keep:
                oof.append(val_logits.numpy())
                if test_x is not None:
                    test.append(infer(step.model, test_x, mean, std, device, channels_last=step.channels_last).numpy())
                states.append(_state_on_cpu(step.model))
    return MemberOutput(
        oof_logits=np.stack(oof),
        test_logits=np.stack(test) if test_x is not None else None,
        history=history,
        states=states,
    )
