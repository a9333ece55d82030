"""Image sources decoded once into uint8 tensors, cached on disk per source.

`load_dataset(cfg, cache_dir, seed)` reads the recipe's data section and returns a
`Dataset`: training `Images` (and test `Images` when there is a test set), a content
fingerprint and per-channel normalisation statistics.

Sources: scikit-learn's `digits`; the torchvision datasets `cifar10`, `cifar100`,
`mnist`, `fashion_mnist`, `svhn`; and `folder`, an ImageFolder tree (class folders at
the root or under one single top folder) or a tar archive of one, read in place.

Every source is decoded and resized once to `(image_size, image_size)`; the uint8
arrays are saved under `cache_dir` as `.npy` files keyed by a cheap fingerprint of the
source (path, sizes, mtimes, image size), so a second load skips decoding. The
`per_class` and `test_fraction` selections are applied after the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .progress import bar as progress_bar
from .store import is_utf8, write_npy, write_text

SOURCES = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "folder")
# torchvision ImageFolder's extensions, and .gif
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
# bump when the decoded arrays of a source would change (3: links in tars, 16-bit gray; 4: a path stored twice
# in a tar, 16-bit PGMs)
_CACHE_VERSION = 4
_CHUNK = 2048  # images decoded (and resized) per batch
_GRAY_MODES = ("1", "L", "LA", "La", "F")  # "I" modes: _wide_gray_to_uint8
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """A problem with the user's data or data settings; the message says how to fix it."""


class NoImagesError(DataError):
    """The folder is there but holds no images (e.g. a disk not mounted at its mount point)."""


class DataNote(UserWarning):
    """Something the user should know about their images: files skipped, transparent pixels shown.
    Warned on every load (kept with the cached arrays); the commands print it as a note."""


@contextlib.contextmanager
def notes_printed():
    """Print each DataNote warned inside as a ``note:`` line on stderr (once: the training and test
    images may warn the same), also when loading fails; other warnings go on as usual."""
    notes: list[str] = []
    try:
        with _notes_kept(notes):
            yield
    finally:
        for note in dict.fromkeys(notes):
            print(f"note: {note}", file=sys.stderr)


@contextlib.contextmanager
def _notes_kept(notes: list[str]):
    """Append the message of each DataNote warned inside to `notes`; other warnings go on as usual."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataNote)
            yield
    finally:
        for w in caught:
            if issubclass(w.category, DataNote):
                notes.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _warn_notes(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(DataNote(note), stacklevel=3)


@dataclass(frozen=True)
class Images:
    """Labelled images: `x` uint8 (N, C, H, W) contiguous on the CPU, `y` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(f"Images.x must be uint8 (N, C, H, W); got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (len(self.x),):
            raise ValueError(
                f"Images.y must be int64 ({len(self.x)},) to match x; got {self.y.dtype} {tuple(self.y.shape)}"
            )


@dataclass(frozen=True)
class Dataset:
    """Training images, optional test images, their content fingerprints and train statistics.

    `fingerprint` is the training part's (what shapes a model's weights); `test_fingerprint`
    the test part's ("" without one: it shapes only the test logits). `mean` and `std` are
    per channel, on the 0..1 scale (pixel / 255), over `train.x`.
    """

    train: Images
    test: Images | None
    fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @cached_property
    def train_digests(self) -> list[bytes]:
        """A digest of each training image's pixels (equal for copies of one image)."""
        return row_digests(self.train.x)

    @cached_property
    def copies(self) -> np.ndarray | None:
        """For each training image, the index of the first one with the same pixels; None when no
        two are alike (see :func:`copy_groups`)."""
        return _first_of_each(self.train_digests)

    @cached_property
    def test_fingerprint(self) -> str:
        return "" if self.test is None else fingerprint(self.test)

    @cached_property
    def legacy_fingerprint(self) -> str:
        """The fingerprint of training and test images together that runs recorded in data.json
        before 2026-11 ("" without a test set, where it equals `fingerprint`)."""
        return "" if self.test is None else fingerprint(self.train, self.test)


# --------------------------------------------------------------------------- entry point


def load_dataset(cfg, cache_dir: Path, seed: int, progress: bool = True) -> Dataset:
    """Load the images that the recipe's data section `cfg` describes.

    `cfg` needs the attributes source, root, path, test_path, test_fraction, per_class,
    image_size and download. `seed` drives the stratified `test_fraction` hold-out.
    Raises DataError for anything the user has to fix.
    """
    return select(*read_source(cfg, cache_dir, progress), cfg, seed)


def read_source(cfg, cache_dir: Path, progress: bool = True) -> tuple[Images, Images | None]:
    """Every image of the recipe's source, and of ``data.test_path`` when given (decoded once, cached).

    Raises DataError for anything the user has to fix in `cfg`.
    """
    if cfg.source not in SOURCES:
        raise DataError(f"data.source = {cfg.source!r} is unknown; use one of: {', '.join(SOURCES)}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 1:
        raise DataError(f"data.image_size must be a positive integer, got {cfg.image_size!r}")
    if cfg.test_path and cfg.test_fraction > 0:
        raise DataError(
            f"data.test_path = {cfg.test_path!r} and data.test_fraction = {cfg.test_fraction} both ask for a "
            "test set; set only one of them"
        )
    if not 0 <= cfg.test_fraction < 1:
        raise DataError(f"data.test_fraction must be in [0, 1), got {cfg.test_fraction}")
    cache_dir = Path(cache_dir)
    train, test = _load_source(cfg, cache_dir, progress)
    if cfg.test_path:
        if test is not None:
            _warn_notes([f"data.test_path replaces {cfg.source}'s official test split as the test set"])
        test = _load_folder_cached(cfg.test_path, "data.test_path", cfg, cache_dir, progress, known=train.classes)
    return train, test


def select(train: Images, test: Images | None, cfg, seed: int) -> Dataset:
    """The recipe's images from its source: ``per_class``, then the ``test_fraction`` hold-out."""
    train = keep_per_class(train, cfg.per_class)
    if cfg.test_fraction > 0:
        if test is not None:
            _warn_notes([(f"data.test_fraction = {cfg.test_fraction} replaces {cfg.source}'s official test split: "
                          "the test set is held out of its training split")])
        train, test = hold_out(train, cfg.test_fraction, seed)
    train, test = _same_channels(train, test)
    mean, std = channel_stats(train.x)
    dataset = Dataset(train=train, test=test, fingerprint=fingerprint(train), mean=mean, std=std)
    _note_shared_images(dataset)
    return dataset


def _load_source(cfg, cache_dir: Path, progress: bool) -> tuple[Images, Images | None]:
    if cfg.source == "folder":
        return _load_folder_cached(cfg.path, "data.path", cfg, cache_dir, progress), None
    if cfg.source == "digits":
        key = {"source": "digits", "root": str(cfg.root), "image_size": cfg.image_size}
        return _cached(cache_dir, "digits", key, lambda: (_read_digits(cfg.image_size), None))
    root = Path(cfg.root or ".").expanduser().resolve()
    key = {"source": cfg.source, "root": str(root), "image_size": cfg.image_size}
    read = partial(_read_torchvision, cfg.source, root, cfg.download, cfg.image_size)
    return _cached(cache_dir, cfg.source, key, read)


# --------------------------------------------------------------------------- selection


def keep_per_class(images: Images, per_class: int) -> Images:
    """The first `per_class` images of every class, in source order (all when 0)."""
    if per_class <= 0:
        return images
    y = images.y.numpy()
    counts = np.bincount(y, minlength=len(images.classes))
    short = [f"{images.classes[c]!r} has {counts[c]}" for c in np.flatnonzero(counts < per_class)]
    if short:
        raise DataError(
            f"data.per_class = {per_class} needs that many images in every class, but "
            f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}; lower data.per_class"
        )
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(len(images.classes))]))
    return _subset(images, keep)


def hold_out(images: Images, fraction: float, seed: int) -> tuple[Images, Images]:
    """Stratified split into (train, test) with `fraction` of the images in test.

    Both parts keep source order. Deterministic for a given `seed`. Copies of one image (the
    same pixels) go to the same part: a test image must not be a training image.
    """
    from sklearn.model_selection import train_test_split

    y = images.y.numpy()
    copies = copy_groups(images.x)
    distinct = np.arange(len(y)) if copies is None else np.unique(copies)  # the first of each image's copies
    n, n_classes = len(distinct), len(images.classes)
    counts = np.bincount(y[distinct], minlength=n_classes)
    worst = int(counts.argmin())
    images_of = "images" if copies is None else "distinct images"
    if counts[worst] < 2:
        raise DataError(
            f"data.test_fraction needs at least 2 {images_of} per class for a stratified hold-out, but class "
            f"{images.classes[worst]!r} has {counts[worst]}; add images or set data.test_fraction = 0"
        )
    n_test = math.ceil(fraction * n)
    if n_test < n_classes or n - n_test < n_classes:
        raise DataError(
            f"data.test_fraction = {fraction} of {n} {images_of} gives {n_test} test and {n - n_test} training "
            f"ones; both must be at least the number of classes ({n_classes}): change data.test_fraction"
        )
    _, test_rows = train_test_split(distinct, test_size=fraction, stratify=y[distinct], random_state=seed)
    in_test = np.isin(np.arange(len(y)) if copies is None else copies, test_rows)
    return _subset(images, np.flatnonzero(~in_test)), _subset(images, np.flatnonzero(in_test))


def _subset(images: Images, idx: np.ndarray) -> Images:
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return Images(images.x[index].contiguous(), images.y[index].contiguous(), images.classes)


def _note_shared_images(dataset: Dataset) -> None:
    """A note when test images are pixel for pixel training images: their test scores measure
    memory, not accuracy on images the models never saw."""
    test = dataset.test
    if test is None or not len(test.y):
        return
    seen = set(dataset.train_digests)
    shared = sum(d in seen for d in row_digests(test.x))
    if shared:
        also = "is also a training image" if shared == 1 else "are also training images"
        _warn_notes([(f"{shared} of the {len(test.y)} test images {also} (the same pixels): their test scores "
                      "measure memory, not accuracy on unseen images; remove them from the test set")])


def copy_groups(x: torch.Tensor) -> np.ndarray | None:
    """For each image, the index of the first image with the same pixels; None when no two are alike."""
    return _first_of_each(row_digests(x))


def _first_of_each(digests: list[bytes]) -> np.ndarray | None:
    first: dict[bytes, int] = {}
    groups = np.array([first.setdefault(d, i) for i, d in enumerate(digests)], dtype=np.int64)
    return None if len(first) == len(groups) else groups


def row_digests(x: torch.Tensor) -> list[bytes]:
    return [hashlib.blake2b(memoryview(r).cast("B"), digest_size=16).digest() for r in np.ascontiguousarray(x.numpy())]


def _same_channels(train: Images, test: Images | None) -> tuple[Images, Images | None]:
    """Grayscale stays 1 channel only if both parts are grayscale; else both become RGB."""
    if test is None or test.x.shape[1] == train.x.shape[1]:
        return train, test
    return _to_rgb(train), _to_rgb(test)


def _to_rgb(images: Images) -> Images:
    if images.x.shape[1] == 3:
        return images
    return Images(images.x.expand(-1, 3, -1, -1).contiguous(), images.y, images.classes)


# --------------------------------------------------------------------------- fingerprint and statistics


def fingerprint(images: Images, *more: Images) -> str:
    """A content hash (16 hex digits) of the class names and x, y of `images` (and of `more`)."""
    h = hashlib.sha256(json.dumps(list(images.classes)).encode())
    for t in (t for part in (images, *more) for t in (part.x, part.y)):
        a = np.ascontiguousarray(t.numpy())
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 `x` (N, C, H, W) on the 0..1 scale, exact."""
    a = x.numpy()
    n_channels = a.shape[1]
    s1, s2 = np.zeros(n_channels, np.int64), np.zeros(n_channels, np.int64)
    for i in range(0, len(a), chunk):
        b = a[i : i + chunk].astype(np.int64)
        s1 += b.sum(axis=(0, 2, 3))
        s2 += np.einsum("nchw,nchw->c", b, b)
    count = max(a.shape[0] * a.shape[2] * a.shape[3], 1)
    mean = s1 / count / 255.0
    std = np.sqrt(np.maximum(s2 / count / 255.0**2 - mean**2, 0.0))
    constant = [c for c in range(n_channels) if std[c] == 0]
    if constant and len(a):  # dividing by 0 would make that channel NaN in every input
        warnings.warn(DataNote(
            f"channel {constant[0]} is the same value ({round(mean[constant[0]] * 255)}) in every training pixel, "
            "so it tells the classes nothing: it is centred, not scaled (std 1)"), stacklevel=2)
        std[constant] = 1.0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------------- cache


def _cached(
    cache_dir: Path, name: str, key: dict, read: Callable[[], tuple[Images, Images | None]]
) -> tuple[Images, Images | None]:
    """Return `read()`, from `cache_dir/<name>-<hash of key>/` when it was decoded before.

    The DataNotes that decoding warned are kept with the arrays and warned again on every load.
    """
    digest = hashlib.sha256(json.dumps({"v": _CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / f"{name}-{digest}"
    hit = _read_cache(folder)
    if hit is not None:
        train, test, notes = hit
    else:
        notes: list[str] = []
        try:
            with _notes_kept(notes):
                train, test = read()
        except DataError:
            _warn_notes(notes)  # a note may explain the error: a tree of .heic files has "no images"
            raise
        try:
            _write_cache(folder, key, train, test, notes)
        except OSError as exc:  # a read-only or full disk: the images are decoded, only the next run is slower
            note = f"the decoded images could not be cached in {cache_dir} ({exc.strerror or exc})"
            _warn_notes([note + "; the next run decodes them again"])
    _warn_notes(notes)
    return train, test


def _read_cache(folder: Path) -> tuple[Images, Images | None, list[str]] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        classes = tuple(meta["classes"])
        arrays = {f: torch.from_numpy(np.load(folder / f"{f}.npy", allow_pickle=False)) for f in meta["arrays"]}
        train = Images(arrays["train_x"], arrays["train_y"], classes)
        test = Images(arrays["test_x"], arrays["test_y"], classes) if "test_x" in arrays else None
        notes = [str(n) for n in meta["notes"]]  # a cache written before notes were kept is read again once
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: decode again and overwrite
    return train, test, notes


def _write_cache(folder: Path, key: dict, train: Images, test: Images | None, notes: list[str]) -> None:
    arrays = {"train_x": train.x, "train_y": train.y}
    if test is not None:
        arrays |= {"test_x": test.x, "test_y": test.y}
    for name, t in arrays.items():
        write_npy(folder / f"{name}.npy", t.numpy())
    about = {k: v for k, v in key.items() if k != "files"} | ({"n_files": len(key["files"])} if "files" in key else {})
    meta = {"classes": list(train.classes), "arrays": list(arrays), "key": about, "notes": notes}
    write_text(folder / "meta.json", json.dumps(meta, indent=1))  # last: marks complete


# --------------------------------------------------------------------------- built-in sources


def _read_digits(image_size: int) -> Images:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to 0..255, 1 channel."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None])
    return Images(resize(x, image_size), torch.from_numpy(d.target.astype(np.int64)), tuple(str(i) for i in range(10)))


def _read_torchvision(source: str, root: Path, download: bool, image_size: int) -> tuple[Images, Images]:
    """The official train and test splits of a torchvision dataset under `root`."""
    train = _torchvision_split(source, root, download, image_size, train=True)
    test = _torchvision_split(source, root, download, image_size, train=False)
    return train, test


def _torchvision_split(source: str, root: Path, download: bool, image_size: int, train: bool) -> Images:
    from torchvision import datasets

    kind = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST,
            "fashion_mnist": datasets.FashionMNIST, "svhn": datasets.SVHN}[source]
    split = {"split": "train" if train else "test"} if source == "svhn" else {"train": train}
    try:
        ds = kind(str(root), download=download, **split)
    except (RuntimeError, OSError) as err:  # "Dataset not found or corrupted", URLError, ...
        how = (
            "downloading needs internet access: run once on a machine that is online, or copy the files there"
            if download
            else "its files are not there: set data.download = true (needs internet) or point data.root at them"
        )
        raise DataError(f"{source}: could not load the dataset from folder '{root}' ({err}); {how}") from err
    x = torch.as_tensor(np.asarray(ds.data)).to(torch.uint8)
    if x.ndim == 3:  # MNIST-like (N, H, W)
        x = x.unsqueeze(1)
    elif source != "svhn":  # CIFAR (N, H, W, C); SVHN is already (N, C, H, W)
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(ds.labels if source == "svhn" else ds.targets), dtype=torch.int64)
    classes = tuple(getattr(ds, "classes", None) or (str(c) for c in range(10)))
    return Images(resize(x.contiguous(), image_size), y.contiguous(), classes)


# --------------------------------------------------------------------------- folders and archives


def _load_folder_cached(path: str, key_name: str, cfg, cache_dir: Path, progress: bool,
                        known: tuple[str, ...] | None = None) -> Images:
    """Images of an ImageFolder tree or tar archive at `path` (the recipe key `key_name`).

    With `known` (the training classes, for a test set) the images are labelled by those classes,
    of which the tree may hold any.
    """
    root = _check_folder_path(path, key_name)
    base = {"source": "folder", "path": str(root), "image_size": cfg.image_size}
    if known is not None:
        base["classes"] = list(known)  # the labels depend on them
    if root.is_dir():
        listing = list_tree(root)
        stats = [(p, *_size_mtime(root.joinpath(*p))) for p in listing.files]
        # the folders and other files decide classes or notes
        key = {**base, "files": stats, "folders": sorted(listing.dirs), "others": listing.others}
        read = partial(_read_tree, root, listing, cfg.image_size, progress, known)
    else:
        size, mtime, ino, ctime = _size_mtime(root)
        key = {**base, "size": size, "mtime_ns": mtime, "ino": ino, "ctime_ns": ctime}
        read = partial(_read_archive, root, cfg.image_size, progress, known)
    return _cached(cache_dir, "folder", key, lambda: (read(), None))[0]


def _check_folder_path(path: str, key_name: str) -> Path:
    if not path:
        raise DataError(f"{key_name} is empty: source 'folder' needs a class-folder tree or a .tar/.tar.gz/.tgz of one")
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{key_name} = {path!r}: '{root}' does not exist; check the path")
    if root.is_file() and not (root.name.lower().endswith(ARCHIVE_EXTENSIONS) or tarfile.is_tarfile(root)):
        raise DataError(
            f"{key_name} = {path!r} is a file but not a tar archive; give a folder of class folders "
            f"or a {'/'.join(ARCHIVE_EXTENSIONS)} of one"
        )
    return root


def _stat(p: Path) -> os.stat_result:
    try:
        return p.stat()
    except OSError as exc:
        raise DataError(_unreadable(p, exc)) from None


def _unreadable(p: Path, exc: OSError) -> str:
    broken = " (a link to nothing)" if p.is_symlink() and not p.exists() else ""
    return f"cannot read '{p}'{broken} ({exc.strerror or exc}); make it readable or remove it"


def _size_mtime(p: Path) -> tuple[int, int, int, int]:
    """What tells a changed file: size and mtime, and inode and ctime, which change when a file is
    replaced (`mv`) or rewritten with its old mtime kept (`cp -p`, `touch -r`, an extracted archive)."""
    st = _stat(p)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def is_hidden(parts: tuple[str, ...]) -> bool:
    """Dot-files and folders, and macOS's ``__MACOSX`` archive folders: never images nor classes."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class Listing:
    """What a class-folder tree or tar archive holds, as relative path parts (hidden names left out)."""

    files: list[tuple[str, ...]]  # the images, sorted
    dirs: set[tuple[str, ...]]  # every folder
    others: list[tuple[str, ...]]  # files that are not images, sorted
    blobs: dict[tuple[str, ...], bytes] | None = None  # an archive's images, read in the one pass
    error: Exception | None = None  # why an archive could not be read to its end (what came before is kept)


def list_tree(root: Path) -> Listing:
    """The images, folders and other files under the folder `root`, following symbolic links but
    visiting each real folder once (a link loop or a second link to a folder is not followed).
    A folder that cannot be listed is a DataError: its images would be left out silently."""
    files, dirs, others, seen = [], set(), [], {root.resolve()}

    def unlistable(err: OSError) -> None:
        raise DataError(f"cannot list the folder '{err.filename}' ({err.strerror or err}); make it readable "
                        "or remove it")

    for here, subdirs, names in os.walk(root, onerror=unlistable, followlinks=True):
        rel = Path(here).relative_to(root).parts
        subdirs[:] = sorted(d for d in subdirs if not is_hidden((d,)) and _first_visit(Path(here) / d, seen))
        dirs.update(rel + (d,) for d in subdirs)
        for n in names:
            if not is_hidden((n,)):
                (files if is_image(n) else others).append(rel + (n,))
    return Listing(sorted(files), dirs, sorted(others))


def _first_visit(folder: Path, seen: set[Path]) -> bool:
    real = folder.resolve()
    if real in seen:
        return False
    seen.add(real)
    return True


def list_tar(path: Path, progress: Callable[[int], None] | None = None) -> Listing:
    """The images (with their bytes), folders and other files of the tar archive at `path`, in one
    sequential pass; nothing is extracted to disk. A hard or symbolic link to an image read before it
    is that image again (as a tree with the link would read it); other links are other files.

    `progress` is called with the bytes read so far. An archive that cannot be read to its end,
    or that stops without tar's end-of-archive block (cut short), gives what came before with
    ``error`` set: Python's tarfile takes a header cut short for the archive's end.
    """
    listing = Listing([], set(), [], {})
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for m in tf:
                parts = tar_parts(m.name)
                if parts and not is_hidden(parts):
                    _add_tar_member(listing, tf, m, parts)
                if progress is not None:
                    progress(raw.tell())
            if tf.offset and tf.fileobj.tell() - tf.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("it ends before tar's end-of-archive block: it was cut short")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        listing.error = err
    # a path stored twice (`tar -r`/`-u` appends a newer copy) is one file, the last copy, as tar extracts it
    listing.files = sorted({p for p in listing.files if p in listing.blobs})
    listing.others = sorted(set(listing.others) - set(listing.files))
    return listing


def tar_parts(name: str) -> tuple[str, ...]:
    """A tar member's path as parts, with '.', empty parts and '..' resolved as a folder tree would."""
    parts: list[str] = []
    for p in name.split("/"):
        if p == "..":
            parts = parts[:-1]
        elif p not in ("", "."):
            parts.append(p)
    return tuple(parts)


def _add_tar_member(listing: Listing, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
    if m.isdir():
        listing.dirs.add(parts)
        return
    blob = None
    if m.isfile() and is_image(parts[-1]):
        blob = tf.extractfile(m).read()
    elif m.islnk() or m.issym():  # a hard link names the archive path; a symbolic one, a path from its folder
        target = tar_parts(m.linkname if m.islnk() else "/".join(parts[:-1] + (m.linkname,)))
        blob = listing.blobs.get(target) if is_image(parts[-1]) else None
    elif not m.isfile():
        return  # a device, a fifo
    if blob is None:
        listing.others.append(parts)
        listing.blobs.pop(parts, None)  # a later non-image member replaces an earlier image of that path
        return
    listing.files.append(parts)
    listing.blobs[parts] = blob
    listing.dirs.update(parts[:i] for i in range(1, len(parts)))


def count_of(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def images_lie(n: int) -> str:
    """'1 image lies', '2 images lie'."""
    return f"{count_of(n, 'image')} {'lies' if n == 1 else 'lie'}"


def skipped_note(where: str, others: list[tuple[str, ...]]) -> str | None:
    """The note on the files of `where` (relative path parts) that are not images; None without any."""
    if not others:
        return None
    what = "is not an image" if len(others) == 1 else "are not images"
    return (f"'{where}': skipped {count_of(len(others), 'file')} that {what} "
            f"(e.g. '{'/'.join(others[0])}'); images end in {', '.join(IMAGE_EXTENSIONS)}")


def _note_skipped(where: str, others: list[tuple[str, ...]]) -> None:
    if others:
        warnings.warn(DataNote(skipped_note(where, others)), stacklevel=2)


def _read_tree(root: Path, listing: Listing, image_size: int, progress: bool,
               known: tuple[str, ...] | None = None) -> Images:
    _note_skipped(str(root), listing.others)  # first: it explains a tree of .heic files that has "no images"
    classes, order, labels = _layout(listing.files, listing.dirs, str(root), known)
    paths = [root.joinpath(*listing.files[i]) for i in order]
    blobs = []
    for p in progress_bar(paths, progress=progress, desc=f"reading {root.name}", unit="img"):
        try:
            blobs.append(p.read_bytes())
        except OSError as exc:
            raise DataError(_unreadable(p, exc)) from None
    x = _decode_blobs(blobs, [str(p) for p in paths], image_size, progress)
    return Images(x, torch.from_numpy(labels), classes)


def _read_archive(path: Path, image_size: int, progress: bool, known: tuple[str, ...] | None = None) -> Images:
    with progress_bar(progress=progress, total=path.stat().st_size, desc=f"reading {path.name}", unit="B",
                      unit_scale=True) as bar:
        listing = list_tar(path, lambda done: bar.update(done - bar.n))
    if listing.error is not None:
        fix = "make it readable" if isinstance(listing.error, PermissionError) else "it is damaged or not a tar: replace it"
        raise DataError(f"cannot read the archive '{path}' ({listing.error}); {fix}") from listing.error
    _note_skipped(str(path), listing.others)
    classes, order, labels = _layout(listing.files, listing.dirs, str(path), known)
    files = [listing.files[i] for i in order]
    x = _decode_blobs([listing.blobs[p] for p in files], [f"{path}:{'/'.join(p)}" for p in files], image_size, progress)
    return Images(x, torch.from_numpy(labels), classes)


def class_folder_depth(files: list[tuple[str, ...]], known) -> int:
    """How many top folders lie above the class folders of `files` (relative path parts) when the
    classes are `known`: 0 (class folders at the root) or 1 (under one single top folder).

    The reading in which every image lies in a folder of a known class wins; failing both, one top
    folder holding deeper files is skipped, as training reads a tree. Shared by test sets and predict.
    """
    index = class_index(known)
    single_top = len({p[0] for p in files}) == 1
    for skip in (0, 1) if single_top else (0,):
        if all(len(p) >= skip + 2 and class_of(p[skip], index) is not None for p in files):
            return skip
    return 1 if single_top and any(len(p) >= 3 for p in files) else 0


def class_index(classes) -> dict[str, int]:
    """The index of each class by its name in Unicode NFC form, for :func:`class_of`."""
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        index.setdefault(unicodedata.normalize("NFC", c), i)
    return index


def class_of(folder: str, index: dict[str, int]) -> int | None:
    """The class a folder name is in `index` (of :func:`class_index`), or None. A name matches in
    either Unicode form: macOS writes 'café' decomposed (NFD), most other systems composed (NFC)."""
    return index.get(unicodedata.normalize("NFC", folder))


def _layout(files: list[tuple[str, ...]], dirs: set[tuple[str, ...]], where: str, known=None):
    """Classes (sorted), file order (sorted by path) and labels of an ImageFolder listing.

    `files` and `dirs` are relative path parts; class folders sit at the root or under one single
    top folder, and an image's class is its folder there, at any depth below. Training data
    (`known` None) needs 2 classes or more and no empty class folder. A test set is labelled by
    the `known` training classes: it may hold any of them, but no other.
    Returns (classes, order: list[int], labels: int64 (N,)).
    """
    if not files:
        raise NoImagesError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in '{where}'; expected <class>/<image> files")
    if known is None:
        firsts = {p[0] for p in files} | {d[0] for d in dirs}
        skip = 1 if len(firsts) == 1 and any(len(p) >= 3 for p in files) else 0
    else:
        skip = class_folder_depth(files, known)
    if skip:  # one top folder holding the class folders
        where = f"{where}/{files[0][0]}"
        files = [p[1:] for p in files]
        dirs = {d[1:] for d in dirs if len(d) > 1}
    loose = [p[0] for p in files if len(p) == 1]
    if loose:
        raise DataError(
            f"{images_lie(len(loose))} outside class folders in '{where}' (e.g. {loose[0]!r}); "
            "put every image in a folder named after its class"
        )
    if known is None:
        classes = tuple(sorted({p[0] for p in files} | {d[0] for d in dirs}))
        _check_training_classes(classes, files, where)
    else:
        index = class_index(known)
        extra = sorted({p[0] for p in files if class_of(p[0], index) is None})
        if extra:
            raise DataError(
                f"'{where}' has class folders that the training data lacks: {extra[:5]}"
                f"{' ...' if len(extra) > 5 else ''}; the models cannot predict them: remove them from the test "
                "set or add them to the training data"
            )
        classes = tuple(known)
    order = sorted(range(len(files)), key=lambda i: files[i])
    index = class_index(classes)
    labels = np.array([class_of(files[i][0], index) for i in order], dtype=np.int64)
    return classes, order, labels


_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}


def _check_training_classes(classes: tuple[str, ...], files: list[tuple[str, ...]], where: str) -> None:
    counts = {c: 0 for c in classes}
    for p in files:
        counts[p[0]] += 1
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise DataError(f"class folder '{where}/{empty[0]}' has no images; add images or remove the folder")
    if len(classes) < 2:
        raise DataError(f"found only one class folder ({classes[0]!r}) in '{where}'; classification needs at least 2")
    not_utf8 = [c for c in classes if not is_utf8(c)]
    if not_utf8:
        raise DataError(f"class folder {not_utf8[0].encode('utf-8', 'surrogateescape')!r} in '{where}' has a name "
                        "that is not UTF-8 text (written by an older system?); rename it: the run stores, prints "
                        "and plots class names as UTF-8")
    if all(c.lower() in _SPLIT_NAMES for c in classes):
        train = next((c for c in classes if c.lower().startswith("train")), classes[0])
        warnings.warn(DataNote(
            f"the classes of '{where}' are named {', '.join(classes)}, like the parts of a split: if the classes "
            f"are the folders inside them, set data.path to '{where}/{train}' (and data.test_path to the other "
            "part)"), stacklevel=3)


# --------------------------------------------------------------------------- decoding


def _decode_blobs(blobs: list[bytes], names: list[str], image_size: int, progress: bool,
                  transparent: list[str] | None = None) -> torch.Tensor:
    """Decode encoded images to uint8 (N, C, image_size, image_size).

    C = 1 if every image is grayscale, else 3. JPEGs are decoded in batches by
    torchvision's libjpeg-turbo decoder (measured fastest here), others by PIL.
    The names of images with transparent pixels go to ``transparent`` when given,
    else into a DataNote.
    """
    chunks, found = [], []
    with progress_bar(progress=progress, total=len(blobs), desc="decoding", unit="img") as bar:
        for start in range(0, len(blobs), _CHUNK):
            part = slice(start, start + _CHUNK)
            chunks.append(_decode_chunk(blobs[part], names[part], image_size, found))
            bar.update(len(chunks[-1]))
    if transparent is not None:
        transparent += found
    elif found:
        warnings.warn(DataNote(
            f"{count_of(len(found), 'image')} with transparent pixels (e.g. '{found[0]}'): the alpha "
            "channel is dropped, as torchvision's ImageFolder does, so the models see the colours under it; flatten "
            "them onto a background first if those colours are arbitrary (predict refuses such images)"
        ), stacklevel=2)
    channels = max(c.shape[1] for c in chunks)
    return torch.cat([c.expand(-1, channels, -1, -1) for c in chunks]).contiguous()


def _decode_chunk(blobs: list[bytes], names: list[str], image_size: int, transparent: list[str]) -> torch.Tensor:
    """Decode and resize one chunk; the names of images with transparent pixels go to `transparent`."""
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, b in enumerate(blobs) if b[:2] == b"\xff\xd8" and not _over_pixel_limit(b)]
    for i, img in zip(jpegs, _decode_jpegs([blobs[i] for i in jpegs])):
        images[i] = img
    for i, img in enumerate(images):
        if img is None or img.shape[0] not in (1, 3):  # not a JPEG, CMYK, failed batch, ...
            images[i] = _decode_pil(blobs[i], names[i], transparent)
    channels = max(img.shape[0] for img in images)
    out = torch.empty((len(images), channels, image_size, image_size), dtype=torch.uint8)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape[1:]), []).append(i)
    for idx in by_size.values():
        batch = torch.stack([images[i].expand(channels, -1, -1) for i in idx])
        out[idx] = resize(batch, image_size)
    return out


def _over_pixel_limit(blob: bytes) -> bool:
    """Whether an image's header gives more pixels than PIL's decompression-bomb limit (or cannot be
    read): such JPEGs go to PIL, which notes or refuses them, as it does every other format."""
    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as im:  # reads the header only
                width, height = im.size
    except _PIL_ERRORS:
        return True
    return width * height > limit


def _decode_jpegs(blobs: list[bytes]) -> list[torch.Tensor | None]:
    """Batch-decode JPEG bytes to (C, H, W) uint8; None where an image needs PIL.

    torchvision's batched libjpeg-turbo decoder is about 4x faster than a PIL loop on
    CIFAR-sized images. torchvision 0.29 deprecates it in favour of TorchCodec; where it
    is gone, every image goes to PIL (same pixels, slower).
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return [None] * len(blobs)
    if not blobs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return list(decode_jpeg(data, mode=ImageReadMode.UNCHANGED))
    except RuntimeError:  # one bad file fails the batch: PIL then names it
        return [None] * len(blobs)


def pil_reason(err: BaseException) -> str:
    """PIL's message without the ``<_io.BytesIO object at 0x...>`` it names in-memory files by."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)) or type(err).__name__


def _wide_gray_to_uint8(a: np.ndarray, mode: str, fmt: str | None = None) -> np.ndarray:
    """Gray pixels of an "I;16" image to uint8, its 16-bit range scaled to 8 bits; of an "I" image
    likewise, or (a 32-bit TIFF, with no fixed range) kept as they are when every value fits in 0..255.
    PIL opens a 16-bit PGM as "I", already scaled to 0..65535: always scaled."""
    a = a.astype(np.float64)
    if mode != "I" or fmt in ("PPM", "PNG") or a.max(initial=0) > 255:
        a = a * (255 / 65535)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def has_transparent_pixels(im: Image.Image) -> bool:
    """Whether the image has an alpha channel (or a colour key) that hides some of its pixels."""
    bands = im.getbands()
    if not ("A" in bands or "a" in bands or "transparency" in im.info):
        return False
    return im.convert("RGBA").getchannel("A").getextrema()[0] < 255  # all 255: the alpha carries nothing


def _decode_pil(blob: bytes, name: str, transparent: list[str]) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below as a DataNote
            warnings.filterwarnings("ignore", "Palette images with Transparency")  # the transparency note says it
            with Image.open(io.BytesIO(blob)) as im:
                im.load()
                width, height = im.size
                if has_transparent_pixels(im):
                    transparent.append(name)
                if im.mode.startswith("I"):  # 16-bit (or 32-bit int) gray: PIL's convert("L") clips it to white
                    a = _wide_gray_to_uint8(np.asarray(im), im.mode, im.format)
                else:
                    a = np.array(im.convert("L" if im.mode in _GRAY_MODES else "RGB"))  # a writable copy
    except _PIL_ERRORS as err:
        raise DataError(f"cannot decode image '{name}' ({pil_reason(err)}); remove or replace the file") from err
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        warnings.warn(DataNote(
            f"'{name}' is {width}x{height} pixels, over PIL's decompression-bomb limit of {limit} pixels "
            "(twice that is refused); it was decoded and resized as every image is"
        ), stacklevel=2)
    return torch.from_numpy(a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1)))


def resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size): antialiased bilinear on float.

    Returns `x` itself when it already has that size.
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty((*x.shape[:2], size, size), dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        f = F.interpolate(x[i : i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[i : i + chunk] = f.round_().clamp_(0, 255).to(torch.uint8)
    return out


def decode_images(blobs: list[bytes], names: list[str], image_size: int, channels: int | None = None,
                  transparent: list[str] | None = None) -> torch.Tensor:
    """Encoded images to uint8 (N, C, image_size, image_size), decoded and resized as training data is.

    `channels` (1 or 3) forces grayscale or RGB to match a trained model. The names of images with
    transparent pixels go to `transparent` when given (else into a DataNote). Raises DataError naming the
    first image that cannot be decoded (predict then decodes that batch one by one to report each file).
    """
    if not blobs:
        raise ValueError("decode_images needs at least one image")
    return _to_channels(_decode_blobs(blobs, names, image_size, progress=False, transparent=transparent), channels)


def _to_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Repeat grayscale to RGB, or convert RGB to grayscale (ITU-R 601-2 luma, as PIL's "L")."""
    if channels is None or channels == x.shape[1]:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1:
        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
        return ((x.to(torch.int32) * w).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)
    raise ValueError(f"channels must be 1, 3 or None, got {channels}")
