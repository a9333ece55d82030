"""``python -m ensemble.predict RUN INPUT...``: apply a finished run to new images.

Every fold model of each member predicts; the fold logits are averaged (k-fold
bagging, as ``fit`` did for the test set); the fitted combiner (default: the best
by nested OOF accuracy) turns member logits into class probabilities. Labels come
from ImageFolder trees whose class folders are the run's classes; with labels, the
metrics of ``fit`` are printed and saved beside the CSV.

Loading a run never unpickles anything: the recipe is TOML, data info and combiner
state are JSON/NPZ (``allow_pickle=False``), weights are safetensors. Other files in
the run folder are never opened. Exit status: 0 all fine, 1 some inputs failed,
2 usage or run errors.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import backbones, store
from . import combiners as comb
from .combiner_store import CombinerStateError, load_combiner
from .data import (
    ARCHIVE_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DataError,
    class_folder_depth,
    class_index,
    class_of,
    count_of,
    decode_images,
    images_lie,
    list_tar,
    list_tree,
    pil_reason,
    skipped_note,
)
from .evaluate import SCALARS, split_metrics
from .progress import bar as progress_bar
from .recipe import BackboneConfig, Recipe, RecipeError, from_dict, is_device
from .store import RunError, fit_command
from .train import infer, resolve_device, use_channels_last

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Formats that can run code when loaded; a run never needs them, so they are never opened.
UNSAFE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin", ".dill")


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class DataInfo:
    """How the run's images were prepared (data.json): C_img channels, S x S pixels."""

    classes: tuple[str, ...]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Run:
    """A run folder, read without unpickling: recipe, data info, fitted-combiner index."""

    dir: Path
    recipe: Recipe
    data: DataInfo
    combiners: dict | None  # index.json "combiners" ({name: {"file", "members"}}); None if not fitted
    best: str | None
    unsafe: tuple[Path, ...]  # pickle-like files found in the folder (never opened)


@dataclass(frozen=True)
class Member:
    """One ensemble member: a backbone and the weights file of each fold folder."""

    name: str
    backbone: BackboneConfig
    weights: str  # file name in members/<alias>/fold<k>/


def load_run(run_dir: str | Path) -> Run:
    """Read ``recipe.toml``, ``data.json`` and ``combiners/index.json`` (if fitted) of a run."""
    run_dir = Path(run_dir)
    store.require_run_folder(run_dir)
    recipe = _read_recipe(run_dir / "recipe.toml")
    data = _read_data_info(run_dir / "data.json")
    index_path = run_dir / "combiners" / "index.json"
    combiners, best = (None, None)
    if index_path.is_file():
        combiners, best = _read_index(index_path)
    return Run(run_dir, recipe, data, combiners, best, _unsafe_files(run_dir))


def _read_recipe(path: Path) -> Recipe:
    """The run's recipe, as run. Predict needs none of its [data] section (it reads data.json, and
    the data paths need not exist on this machine), so one this version refuses is left at the defaults."""
    try:
        table = tomllib.loads(path.read_text())
        try:
            recipe = from_dict(table, str(path))
        except RecipeError:
            recipe = from_dict(table | {"data": {}}, str(path))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RunError(f"{path}: not a readable TOML recipe ({exc})") from None
    except RecipeError as exc:
        raise RunError(str(exc)) from None
    for i, b in enumerate(recipe.backbones):
        try:
            backbones.split_name(b.name)
        except backbones.BackboneError as exc:
            raise RunError(f"{path}: backbones[{i}].name {exc}") from None
    return recipe


def _read_data_info(path: Path) -> DataInfo:
    d = store.read_json(path, run_dir=path.parent)
    try:
        info = DataInfo(
            classes=tuple(str(c) for c in d["classes"]),
            channels=int(d["channels"]),
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: expected classes, channels, image_size, mean and std; got a bad entry ({exc!r})") \
            from None
    ok = (len(info.classes) >= 2 and info.channels in (1, 3) and 1 <= info.image_size <= 4096
          and len(info.mean) == len(info.std) == info.channels and all(s > 0 for s in info.std))
    if not ok:
        raise RunError(
            f"{path}: expected >= 2 classes, channels 1 or 3, mean and std with one positive value per "
            f"channel; got {len(info.classes)} classes, channels {info.channels}, mean {info.mean}, std {info.std}"
        )
    return info


def _read_index(path: Path) -> tuple[dict, str | None]:
    doc = store.read_json(path, run_dir=path.parent.parent)
    entries = doc.get("combiners") if isinstance(doc, dict) else None
    good = isinstance(entries, dict) and all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("members"), list)
        and all(isinstance(m, str) for m in e["members"]) for e in entries.values()
    )
    best = doc.get("best") if isinstance(doc, dict) else None
    if not good or (best is not None and best not in entries):
        raise RunError(
            f"{path}: expected {{\"best\": name, \"combiners\": {{name: {{\"file\": str, \"members\": [str]}}}}}}; "
            "the file is damaged: re-run fit on this run to rewrite it"
        )
    return entries, best


def _unsafe_files(run_dir: Path) -> tuple[Path, ...]:
    """Files whose names say pickle or torch checkpoint: listed by name, never opened."""
    found = []
    for here, _, names in os.walk(run_dir):
        found += [Path(here) / n for n in names if n.lower().endswith(UNSAFE_SUFFIXES)]
    return tuple(sorted(found))


def all_members(run: Run) -> list[str]:
    """Every member name the run can provide: each alias, and ``<alias>@s<i>`` of snapshot backbones."""
    names = []
    for b in run.recipe.backbones:
        names.append(b.alias)
        names += [f"{b.alias}@s{i}" for i in range(1, b.train.snapshots + 1)] if b.train.snapshots else []
    return names


def resolve_member(run: Run, name: str) -> Member:
    """``alias`` -> the final weights; ``alias@s<i>`` -> snapshot i (1-based; the last is the final model)."""
    alias, sep, snap = name.partition("@s")
    by_alias = {b.alias: b for b in run.recipe.backbones}
    b = by_alias.get(alias)
    n_snapshots = (b.train.snapshots or 1) if b else 0
    if b is None or (sep and not (snap.isdigit() and 1 <= int(snap) <= n_snapshots and n_snapshots > 1)):
        raise RunError(
            f"{run.dir / 'combiners' / 'index.json'}: member {name!r} is not in this run "
            f"(members: {', '.join(all_members(run))}); the file is damaged: re-run fit on this run"
        )
    i = int(snap) if sep else n_snapshots
    return Member(name, b, store.weight_files(n_snapshots)[i - 1])


def load_method(run: Run, method: str | None) -> tuple[str, comb.Combiner, list[Member]]:
    """The fitted combiner ``method`` (default: the run's best) and the members it combines."""
    if run.combiners is None or (method is None and run.best is None):
        raise RunError(
            f"{run.dir}: no fitted combiner (combiners/index.json is missing or empty): the run is "
            f"unfinished; complete it with `{fit_command(run.dir)}`"
        )
    name = run.best if method is None else method
    if name not in run.combiners:
        raise RunError(_not_fitted_message(run, name))
    entry = run.combiners[name]
    members = [resolve_member(run, m) for m in entry["members"]]
    folder = run.dir / "combiners"
    try:
        combiner = load_combiner(folder, entry["file"])
    except CombinerStateError as exc:
        raise RunError(f"{exc}; re-run `{fit_command(run.dir)}` to rewrite it") from None
    except ValueError as exc:  # an unsafe file name in index.json
        raise RunError(f"{folder / 'index.json'}: {exc}") from None
    if combiner.n_members_ != len(members) or combiner.n_classes_ != len(run.data.classes):
        raise RunError(
            f"{folder / (entry['file'] + '.json')}: fitted on {combiner.n_members_} members and "
            f"{combiner.n_classes_} classes, but index.json lists {len(members)} members and data.json "
            f"{len(run.data.classes)} classes; re-run `{fit_command(run.dir)}` to rewrite it"
        )
    return name, combiner, members


def _not_fitted_message(run: Run, name: str) -> str:
    fitted = ", ".join(run.combiners) or "none"
    try:
        comb.combiner_class(name)
    except ValueError as exc:
        return f"--method {name!r}: {exc}. Fitted for this run: {fitted}"
    per_backbone = [n for n in run.combiners if n.startswith(name + ":")]
    if per_backbone:  # one snapshot combiner per snapshot backbone
        return (f"combiner {name!r} was fitted once per snapshot backbone: give --method "
                f"{' or '.join(per_backbone)}")
    wanted = list(dict.fromkeys([*run.recipe.ensemble.combiners, name.removesuffix(comb.TS_SUFFIX)]))
    listed = "[" + ",".join(f'"{n}"' for n in wanted) + "]"
    extra = " --set ensemble.calibrate=true" if name.endswith(comb.TS_SUFFIX) else ""
    return (
        f"combiner {name!r} was not fitted for this run (fitted: {fitted}); fit it without retraining with "
        f"`{fit_command(run.dir)} --set 'ensemble.combiners={listed}'{extra}`"
    )


# --------------------------------------------------------------------------- models


@dataclass
class MemberModels:
    """The k fold models of one member, in eval mode on the inference device."""

    member: Member
    models: list[nn.Module]
    channels_last: bool


def load_members(run: Run, members: list[Member], device: torch.device) -> list[MemberModels]:
    """Build every fold model of ``members`` and load its safetensors weights (strict)."""
    out = []
    for m in members:
        channels_last = use_channels_last(m.backbone.train, device)
        # on the CPU: member_logits moves one member's fold models to a GPU at a time
        models = [_load_fold_model(run, m, k, torch.device("cpu"), channels_last) for k in range(run.recipe.cv.folds)]
        out.append(MemberModels(m, models, channels_last))
    return out


def require_finished(run: Run, alias: str, fold: int) -> Path:
    """The folder of the job (alias, fold); a RunError naming the command that completes the run
    when the job has not finished."""
    folder = store.job_dir(run.dir, alias, fold)
    if not (folder / "done.json").is_file():
        raise RunError(f"{folder}: job not finished (no done.json): the run is unfinished; complete it with "
                       f"`{fit_command(run.dir)}`")
    return folder


def _load_fold_model(run: Run, member: Member, fold: int, device: torch.device, channels_last: bool) -> nn.Module:
    folder = require_finished(run, member.backbone.alias, fold)
    return load_model(member.backbone, len(run.data.classes), run.data.channels, folder / member.weights,
                      device, channels_last, store.retrain_hint(run.dir, folder))


def load_model(b: BackboneConfig, n_classes: int, channels: int, path: Path, device: torch.device,
               channels_last: bool, hint: str) -> nn.Module:
    """Backbone ``b`` with the safetensors weights at ``path`` (strict), in eval mode on ``device``.

    Weights that are unreadable, hold NaN or inf, or do not fit the backbone are a RunError
    naming ``path`` and ending with ``hint`` (what to do about it).
    """
    state = read_weights(path, hint)
    try:
        model = backbones.create(b.name, num_classes=n_classes, in_chans=channels, stem=b.stem, pretrained="",
                                 model_args=b.model_args)
    except Exception as exc:  # noqa: BLE001 - timm/torchvision raise many types for a bad name/args
        raise RunError(f"cannot build backbone {b.name!r} to load {path} ({exc}); is the timm or torchvision "
                       "it was trained with installed?") from None
    bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise RunError(f"{path}: tensor {bad!r} holds NaN or inf; {hint}")
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise RunError(f"{path}: these weights do not fit {b.name} with {n_classes} classes and "
                       f"{channels}-channel input: {mismatch}; {hint}")
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _state_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """'' when ``got`` has exactly the keys and shapes of ``expected``, else a one-line summary."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(missing)} missing tensors (e.g. {missing[0]!r})" if missing else "",
             f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]!r})" if unexpected else "",
             f"{len(shapes)} of the wrong shape (e.g. {shapes[0]!r}: expected {tuple(expected[shapes[0]].shape)}, "
             f"got {tuple(got[shapes[0]].shape)})" if shapes else ""]
    return ", ".join(p for p in parts if p)


def read_weights(path: Path, hint: str = "restore it") -> dict[str, torch.Tensor]:
    """A safetensors state dict; anything else (truncated, a pickle renamed) is a RunError naming the file."""
    from safetensors.torch import load_file

    store.require_weights_file(path, hint)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise RunError(f"{path}: not a readable safetensors weights file ({exc}); {hint}") from None


@torch.inference_mode()
def member_logits(members: list[MemberModels], images: torch.Tensor, mean, std, device: torch.device,
                  tta: bool = False, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Member logits float32 (n_members, N, C): each the mean over its fold models' logits.

    ``images`` uint8 (N, C_img, S, S). The progress bar counts images done by every model.
    On a GPU only one member's k fold models are on it at a time (the others wait on the CPU):
    an ensemble's weights together may not fit on the card.
    """
    out: np.ndarray | None = None
    with progress_bar(progress=progress, total=len(images) * len(members), desc="predicting", unit="img") as bar:
        for i, mm in enumerate(members):
            models = [m.to(device) for m in mm.models]
            for start in range(0, len(images), batch_size):
                xb = images[start : start + batch_size].to(device)
                folds = [infer(model, xb, mean, std, device, batch_size, mm.channels_last, tta) for model in models]
                mean_logits = torch.stack(folds).mean(0).numpy()
                if out is None:
                    out = np.empty((len(members), len(images), mean_logits.shape[1]), dtype=np.float32)
                out[i, start : start + len(xb)] = mean_logits
                bar.update(len(xb))
            if device.type == "cuda" and len(members) > 1:
                for m in mm.models:
                    m.to("cpu")
    return out if out is not None else np.zeros((len(members), 0, 0), dtype=np.float32)


# --------------------------------------------------------------------------- inputs


class Inputs(NamedTuple):
    """Decoded inputs: uint8 ``x`` (N, C_img, S, S), display ``paths`` (N), ``labels`` int64 (N,)
    with -1 where unknown (None when no input had labels), ``failures`` [(path, reason)] and
    ``notes`` (things skipped on purpose)."""

    x: torch.Tensor
    paths: list[str]
    labels: np.ndarray | None
    failures: list[tuple[str, str]]
    notes: list[str]


class _Entry(NamedTuple):
    path: str  # as shown to the user
    source: Path | bytes  # a file to read, or bytes already read from an archive
    label: int  # -1 when unknown


def read_inputs(paths: list[str], data: DataInfo, progress: bool = False, chunk: int = 512) -> Inputs:
    """Images from files, folders, ImageFolder trees and tar archives, decoded as in training.

    A path or image that cannot be used becomes a failure; the others are still read.
    """
    entries, failures, notes = [], [], []
    for arg in paths:
        found, fail, note = _list_input(arg, data.classes)
        entries += found
        failures += fail
        notes += note
    images, kept = [], []
    with progress_bar(progress=progress, total=len(entries), desc="reading", unit="img") as bar:
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            x, ok, failed = _decode_batch(part, data)
            images += [x] if ok else []
            kept += ok
            failures += failed
            bar.update(len(part))
    size = data.image_size
    x = torch.cat(images) if images else torch.zeros((0, data.channels, size, size), dtype=torch.uint8)
    y = np.asarray([e.label for e in kept], dtype=np.int64)
    return Inputs(x, [e.path for e in kept], y if (y >= 0).any() else None, failures, notes)


TRANSPARENT = ("has transparent pixels: the colours under them are arbitrary, and so would its prediction be; "
               "flatten it onto a background first")


def _decode_batch(entries: list[_Entry], data: DataInfo) -> tuple[torch.Tensor | None, list[_Entry], list]:
    """Read and decode a batch of entries; every unreadable or refused file becomes a failure.

    An image with transparent pixels is refused (training drops alpha; the colours under it are
    arbitrary), found while it is decoded. Returns uint8 (n_ok, C_img, S, S) or None, the entries
    decoded, and [(path, reason)] failures.
    """
    blobs, ok, failures = [], [], []
    for e in entries:
        try:
            blobs.append(e.source.read_bytes() if isinstance(e.source, Path) else e.source)
            ok.append(e)
        except OSError as exc:
            failures.append((e.path, f"cannot be read ({exc.strerror or exc})"))
    if not ok:
        return None, [], failures
    transparent: list[str] = []
    images, good, bad = _decode_or_split(blobs, ok, data, transparent)
    x = torch.cat(images) if images else None
    if transparent:
        hidden = set(transparent)
        keep = [i for i, e in enumerate(good) if e.path not in hidden]
        failures += [(e.path, TRANSPARENT) for e in good if e.path in hidden]
        x, good = (x[keep] if keep else None), [good[i] for i in keep]
    return x, good, failures + bad


def _decode_or_split(blobs: list[bytes], entries: list[_Entry], data: DataInfo, transparent: list[str]):
    """Decode all at once; on a bad image, split in halves until each bad file stands alone.
    The names of images with transparent pixels go to ``transparent``."""
    try:
        names = [e.path for e in entries]
        return [decode_images(blobs, names, data.image_size, data.channels, transparent)], entries, []
    except DataError as exc:
        if len(entries) == 1:
            reason = pil_reason(exc.__cause__) if exc.__cause__ else str(exc)
            return [], [], [(entries[0].path, f"not a readable image ({reason})")]
    mid = len(entries) // 2
    a = _decode_or_split(blobs[:mid], entries[:mid], data, transparent)
    b = _decode_or_split(blobs[mid:], entries[mid:], data, transparent)
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _list_input(arg: str, classes: tuple[str, ...]) -> tuple[list[_Entry], list, list[str]]:
    """(entries, failures, notes) for one INPUT argument."""
    path = Path(arg).expanduser()
    if not path.exists():
        return [], [(arg, "does not exist")], []
    if path.is_dir():
        return _list_dir(arg, path, classes)
    if not path.is_file():  # reading a device or a pipe would never end
        return [], [(arg, "not a regular file (a device or a pipe)")], []
    if path.name.lower().endswith(IMAGE_EXTENSIONS):
        return [_Entry(arg, path, -1)], [], []
    if path.name.lower().endswith(ARCHIVE_EXTENSIONS) or tarfile.is_tarfile(path):
        return _list_archive(arg, path, classes)
    return [], [(arg, f"not an image ({', '.join(IMAGE_EXTENSIONS)}) nor a .tar/.tar.gz of images")], []


def _list_dir(arg: str, root: Path, classes) -> tuple[list[_Entry], list, list[str]]:
    try:
        listing = list_tree(root)
    except DataError as exc:
        return [], [(arg, str(exc))], []
    if not listing.files:
        return [], [(arg, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")], []
    labels, note = _folder_labels(listing.files, classes, arg)
    entries = [_Entry(os.path.join(arg, *p), root.joinpath(*p), c) for p, c in zip(listing.files, labels)]
    return entries, [], note + _skipped_note(arg, listing.others)


def _list_archive(arg: str, path: Path, classes) -> tuple[list[_Entry], list, list[str]]:
    """Images of a tar archive, read in memory (nothing is extracted to disk)."""
    listing = list_tar(path)
    failures = []
    if listing.error is not None:
        where = f" after {len(listing.files)} images" if listing.files else ""
        failures.append((arg, f"not a readable tar archive{where} ({listing.error})"))
    elif not listing.files:
        failures.append((arg, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this archive"))
    labels, note = _folder_labels(listing.files, classes, arg)
    entries = [_Entry(f"{arg}:{'/'.join(p)}", listing.blobs[p], c) for p, c in zip(listing.files, labels)]
    return entries, failures, note + _skipped_note(arg, listing.others)


def _folder_labels(files: list[tuple[str, ...]], classes, where: str) -> tuple[list[int], list[str]]:
    """Class index of each file when ``files`` form a class-folder tree of the run's classes, else -1.

    Read as a test set is in training (:func:`ensemble.data.class_folder_depth`): an image's class
    is the folder it lies in at the root, or under one single top folder, at any depth below.
    """
    index = class_index(classes)
    unlabelled = [-1] * len(files)
    if not files:
        return unlabelled, []
    skip = class_folder_depth(files, classes)
    in_folders = [p for p in files if len(p) >= skip + 2]
    strange = sorted({p[skip] for p in in_folders if class_of(p[skip], index) is None})
    if len(in_folders) == len(files) and not strange:
        return [class_of(p[skip], index) for p in files], []
    if not in_folders:
        return unlabelled, []  # plain images: nothing to label
    if strange:
        why = (f"folders {strange[:3]} are not classes of the run ({', '.join(classes[:10])}"
               f"{' ...' if len(classes) > 10 else ''})")
    else:
        loose = next(p for p in files if len(p) < skip + 2)
        why = f"{images_lie(len(files) - len(in_folders))} outside the class folders (e.g. {'/'.join(loose)!r})"
    return unlabelled, [f"{where}: {why}; its images are predicted without labels"]


def _skipped_note(where: str, others: list[tuple[str, ...]]) -> list[str]:
    note = skipped_note(where, others)
    return [note] if note else []


# --------------------------------------------------------------------------- outputs


def write_csv(path: Path, paths: list[str], proba: np.ndarray, classes, labels: np.ndarray | None) -> None:
    """``path, pred, prob_<class>..., [label]``; proba (N, C); labels (N,) with -1 = unknown (empty)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "pred", *(f"prob_{c}" for c in classes), *(["label"] if labels is not None else [])])
    pred = proba.argmax(axis=1)
    for i, p in enumerate(paths):
        p = p.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name that is not UTF-8, escaped
        # 9 decimals: vote's tie-break (1e-6 to the winner) must survive, or a 2-2 vote reads 0.500000 twice
        # and the argmax of the prob columns disagrees with `pred`
        row = [p, classes[pred[i]], *(f"{v:.9f}" for v in proba[i])]
        if labels is not None:
            row.append(classes[labels[i]] if labels[i] >= 0 else "")
        w.writerow(row)
    try:
        store.write_text(path, buf.getvalue())
    except OSError as exc:  # a full or read-only disk, a folder that takes no files
        raise RunError(f"cannot write --out {path}: {exc.strerror or exc}") from None


def metrics_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + ".metrics.json")


def labelled_metrics(proba: np.ndarray, labels: np.ndarray, classes) -> dict:
    """``fit``'s metrics (accuracy, macro P/R/F1, NLL, Brier, ECE, confusion ...) on the labelled rows."""
    known = labels >= 0
    return split_metrics(proba[known], labels[known], list(classes))


def describe(run: Run) -> str:
    """What ``--members`` prints: the members, their finished folds, the fitted combiners."""
    k = run.recipe.cv.folds
    d = run.data
    lines = [f"run {run.dir}: {count_of(len(run.recipe.backbones), 'backbone')} x {k} folds, {len(d.classes)} classes, "
             f"{d.channels}-channel {d.image_size}x{d.image_size} images", "members:"]
    for b in run.recipe.backbones:
        done = sum((store.job_dir(run.dir, b.alias, f) / "done.json").is_file() for f in range(k))
        snaps = f"  snapshots: {', '.join(f'{b.alias}@s{i}' for i in range(1, b.train.snapshots + 1))}" \
            if b.train.snapshots else ""
        lines.append(f"  {b.alias:24} {b.name:28} {done}/{k} folds done{snaps}")
    if not run.combiners:
        lines.append(f"fitted combiners: none; complete the run with `{fit_command(run.dir)}`")
        return "\n".join(lines)
    scores = _recorded_scores(run.dir)
    lines.append("fitted combiners (--method NAME):")
    for name, entry in run.combiners.items():
        s = scores.get(name, {})
        acc = "".join(f"  {split} acc {s[split]['accuracy']:.4f}" for split in ("oof", "test") if split in s)
        best = " (best)" if name == run.best else ""
        lines.append(f"  {name + best:20} members: {', '.join(entry['members'])}{acc}")
    return "\n".join(lines)


def _recorded_scores(run_dir: Path) -> dict:
    try:
        return store.read_json(run_dir / "metrics.json").get("combiners", {})
    except (RunError, AttributeError):
        return {}


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.predict", description=store.summary(__doc__))
    p.add_argument("run", type=Path, help="a run folder written by `python -m ensemble.fit`")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders, ImageFolder trees (labelled) or .tar/.tar.gz of them")
    p.add_argument("--method", help="fitted combiner to use (default: the run's best by nested OOF accuracy)")
    p.add_argument("--members", action="store_true", help="list the run's members and fitted combiners, then exit")
    p.add_argument("--out", default="preds.csv",
                   help="CSV of predictions (default preds.csv); metrics go to <stem>.metrics.json")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="test-time augmentation: flip averages each model's logits of the image and of its "
                        "mirror image (only for members trained with the flip augmentation)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_intermixed_args(argv)  # options may come before, between or after the INPUTs
    if args.out.endswith(("/", os.sep)):  # Path() drops it: `--out results/` would write a file 'results'
        p.error(f"--out {args.out} names a folder; give a CSV file name, e.g. {args.out}preds.csv")
    args.out = Path(args.out)
    if not args.members and not args.inputs:
        p.error("give at least one INPUT (or --members to list what the run holds)")
    if args.members and (args.inputs or args.method is not None):
        p.error("--members lists what the run holds and predicts nothing; give it without INPUT and --method")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not is_device(args.device):
        p.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.out.is_dir():
        p.error(f"--out {args.out} is a folder; give a CSV file name, e.g. {args.out / 'preds.csv'}")
    if args.out.exists() and not args.out.is_file():
        p.error(f"--out {args.out} is not a regular file (a device or a pipe); give a CSV file name")
    why = store.unwritable(args.out.parent)
    if why:
        p.error(f"--out {args.out}: {why}")
    out = args.out.resolve()
    if out.is_relative_to(args.run.resolve()):
        p.error(f"--out {args.out} is inside the run folder {args.run}; write the predictions elsewhere")
    if any(out == Path(i).resolve() for i in args.inputs):
        p.error(f"--out {args.out} is one of the INPUTs; give another CSV file name")
    if args.out.name.lower().endswith(IMAGE_EXTENSIONS + ARCHIVE_EXTENSIONS):  # it would overwrite an input
        p.error(f"--out {args.out} is named like an image or an archive; give a CSV file name")
    return args


def inference_device(name: str) -> torch.device:
    """The device ``--device name`` asks for; RunError when it cannot be had."""
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        raise RunError(f"--device {name!r}: {exc}") from None


def check_flip(members: list[Member], method: str) -> None:
    """``--tta flip`` averages in each model's logits of the mirrored image: meaningless for a
    model that never trained on mirrored images (a mirrored digit is another digit)."""
    for m in members:
        if "flip" not in m.backbone.train.augment:
            raise RunError(f"--tta flip: {method}'s member {m.name!r} never trained on mirrored images "
                           f"(its augment is {list(m.backbone.train.augment)}); predict without --tta flip")


def predict(run: Run, args: argparse.Namespace) -> int:
    """Predict ``args.inputs`` with ``run``; returns the exit status (0, or 1 when inputs failed)."""
    name, combiner, members = load_method(run, args.method)
    if args.tta == "flip":
        check_flip(members, name)
    device = inference_device(args.device)
    models = load_members(run, members, device)
    start = time.perf_counter()
    inputs = read_inputs(args.inputs, run.data, progress=not args.quiet)
    reading = time.perf_counter() - start
    for path, reason in inputs.failures:
        print(f"error: {path}: {reason}", file=sys.stderr)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    if not inputs.paths:
        print("error: no image could be read; nothing predicted", file=sys.stderr)
        return 1
    start = time.perf_counter()
    logits = member_logits(models, inputs.x, run.data.mean, run.data.std, device, args.tta == "flip",
                           args.batch_size, progress=not args.quiet)
    proba = combiner.predict_proba(logits)
    seconds = time.perf_counter() - start
    metrics_path(args.out).unlink(missing_ok=True)  # first: a kill must not pair an earlier CSV's metrics with this
    write_csv(args.out, inputs.paths, proba, run.data.classes, inputs.labels)
    print(f"method {name}{' (best)' if name == run.best else ''}: {count_of(len(members), 'member')} x "
          f"{run.recipe.cv.folds} folds on {device}; wrote {args.out}")
    if inputs.labels is not None:
        report_metrics(proba, inputs.labels, run, name, args)
    n = len(inputs.paths)
    failed = f"; {count_of(len(inputs.failures), 'input')} failed" if inputs.failures else ""
    print(f"{count_of(n, 'image')} predicted in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} images/s "
          f"(reading and decoding: {reading:.2f} s){failed}")
    return 1 if inputs.failures else 0


def report_metrics(proba: np.ndarray, labels: np.ndarray, run: Run, name: str, args: argparse.Namespace) -> dict:
    """Print and save (``<stem>.metrics.json``) the metrics on the labelled rows."""
    m = labelled_metrics(proba, labels, run.data.classes)
    n = int((labels >= 0).sum())
    print(f"{n} labelled images: " + ", ".join(f"{k} {m[k]:.4f}" for k in SCALARS))
    doc = {"run": str(run.dir), "method": name, "n_images": len(labels), "n_labelled": n, "tta": args.tta,
           "metrics": m}
    store.write_json(metrics_path(args.out), doc)
    return m


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        run = load_run(args.run)
        for path in run.unsafe:
            print(f"warning: {path}: ignored, never opened (pickle-like files are not part of a run)",
                  file=sys.stderr)
        if args.members:
            print(describe(run))
            code = 0
        else:
            code = predict(run, args)
        sys.stdout.flush()  # here, not at exit (a pipe is block-buffered): a reader gone is 141 below
        return code
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the CSV is written atomically: nothing half-written is left
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `predict ... | head -1`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 141  # 128 + SIGPIPE, as a shell tool stopped by the closed pipe; 1 would say "inputs failed"


if __name__ == "__main__":
    sys.exit(main())
