"""The one training loop, for every backbone, fold and snapshot schedule.

Data stays a uint8 tensor on the training device; a batch is an index slice,
augmented as a whole (airbench style) and normalised on the fly. The logits kept
for the held-out fold are those of the model at the end of its fixed schedule
(or at the end of each snapshot cycle): nothing is chosen by looking at them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import make_augment, normalize
from .recipe import TrainConfig


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at each optimizer step (updated every step).

    onecycle: linear warm-up, then linear decay to 0. cosine: warm-up, then cosine
    to 0. snapshots = M: M cosine cycles restarting at the full rate (Huang et al., 2017).
    """
    if cfg.snapshots:
        cycle = total_steps / cfg.snapshots
        return lambda step: 0.5 * (1 + math.cos(math.pi * (step % cycle) / cycle))
    warm = int(cfg.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 1 - t if cfg.schedule == "onecycle" else 0.5 * (1 + math.cos(math.pi * t))

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only: biases and normalisation scales are left alone."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _autocast(device: torch.device):
    # bf16 only on CUDA: on CPUs without AVX-512 it was measured 14x slower.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(x: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
    """Logits (N, n_classes), float32 on the CPU, for uint8 images ``x`` (N, C, H, W)."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = _prepare(x[start : start + batch_size].to(device, non_blocking=True), mean, std, channels_last)
        with _autocast(device):
            logits = model(xb).float()
            if tta_flip:
                logits = (logits + model(xb.flip(-1)).float()) / 2
        out.append(logits.cpu())
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)


def _snapshot_epochs(cfg: TrainConfig) -> list[int]:
    if not cfg.snapshots:
        return [cfg.epochs]
    every = cfg.epochs // cfg.snapshots
    return list(range(every, cfg.epochs + 1, every))


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
    """
    x, y = train[0].to(device), train[1].to(device)
    n = len(x)
    bs = min(cfg.batch_size, n)
    steps = n // bs  # the last partial batch is dropped; every row is seen across epochs
    channels_last = cfg.channels_last and device.type in ("cpu", "cuda")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, cfg.epochs * steps))
    augment = make_augment(list(cfg.augment))
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = set(_snapshot_epochs(cfg))
    history: dict = {"epochs": [], "snapshot_epochs": sorted(keep) if cfg.snapshots else []}
    oof, test, states = [], [], []

    bar = tqdm(total=cfg.epochs * steps, desc=desc, unit="batch", disable=not progress, leave=False)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        perm = torch.randperm(n, device=device, generator=gen)
        for s in range(steps):
            idx = perm[s * bs : (s + 1) * bs]
            xb = _prepare(augment(x[idx], gen), mean, std, channels_last)
            yb = y[idx]
            with _autocast(device):
                out = step_model(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                out = out.float()
                loss_sum += F.cross_entropy(out, yb, reduction="sum")
                correct += (out.argmax(1) == yb).sum()
            bar.update()
        seen = steps * bs
        val_logits = infer(model, val[0], mean, std, device, channels_last=channels_last)
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            "val_loss": F.cross_entropy(val_logits, val[1]).item(),
            "val_acc": (val_logits.argmax(1) == val[1]).float().mean().item(),
            "seconds": time.perf_counter() - t0,
        }
        history["epochs"].append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}")
        if epoch in keep:
            oof.append(val_logits.numpy())
            if test_x is not None:
                test.append(infer(model, test_x, mean, std, device, channels_last=channels_last).numpy())
            states.append({k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()})
    bar.close()
    return MemberOutput(
        oof_logits=np.stack(oof).astype(np.float32),
        test_logits=np.stack(test).astype(np.float32) if test_x is not None else None,
        history=history,
        states=states,
    )
