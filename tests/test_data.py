"""Tests of ensemble.data on real tiny data: scikit-learn's digits, small PIL-made image
folders and archives, and (when present) a slice of the shared CIFAR-10 archive."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ensemble import data, fit, predict
from ensemble.data import DataError, Dataset, Images, decode_images, load_dataset, resize

CLASSES = ("cat", "dog", "emu")


def cfg(**overrides) -> SimpleNamespace:
    """A recipe data section with the recipe's defaults, digits at their native 8x8."""
    values = dict(source="digits", root="data", path="", test_path="", test_fraction=0.0, per_class=0,
                  image_size=8, download=False)
    return SimpleNamespace(**(values | overrides))


def load(cache: Path, seed: int = 0, **overrides) -> Dataset:
    return load_dataset(cfg(**overrides), cache, seed, progress=False)


def rng_image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def make_tree(root: Path, top: str | None = None, classes=CLASSES, per_class: int = 3, mode: str = "RGB",
              size=(12, 12), ext: str = ".png", seed: int = 0) -> Path:
    """An ImageFolder tree root/[top/]<class>/<i>.<ext> of random images; returns the tree root."""
    rng = np.random.default_rng(seed)
    base = root / top if top else root
    for c in classes:
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng_image(rng, size, mode).save(base / c / f"{i:02d}{ext}")
    return root


def make_tar(tree: Path, archive: Path) -> Path:
    mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tf:
        for entry in sorted(tree.iterdir()):
            tf.add(entry, arcname=entry.name)
    return archive


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_classes(tmp_path):
    ds = load(tmp_path)
    assert ds.train.x.shape == (1797, 1, 8, 8) and ds.train.x.dtype == torch.uint8
    assert ds.train.x.is_contiguous() and ds.train.x.device.type == "cpu"
    assert ds.train.y.dtype == torch.int64 and ds.train.y.shape == (1797,)
    assert ds.train.classes == tuple(str(i) for i in range(10))
    assert ds.test is None
    assert int(ds.train.x.max()) == 255 and int(ds.train.x.min()) == 0
    x = ds.train.x.double() / 255
    assert ds.mean == pytest.approx([x.mean().item()], abs=1e-12)
    assert ds.std == pytest.approx([x.std(correction=0).item()], abs=1e-12)


def test_digits_per_class_keeps_first_images_in_source_order(tmp_path):
    full, five = load(tmp_path), load(tmp_path, per_class=5)
    assert len(five.train.y) == 50
    assert torch.bincount(five.train.y).tolist() == [5] * 10
    y = full.train.y.numpy()
    expected = np.sort(np.concatenate([np.flatnonzero(y == c)[:5] for c in range(10)]))
    assert torch.equal(five.train.x, full.train.x[expected])
    assert five.fingerprint != full.fingerprint


def _rows(images: Images) -> list[bytes]:
    return sorted(bytes(r) + bytes([int(c)]) for r, c in zip(images.x.reshape(len(images.x), -1).numpy(), images.y))


def test_digits_test_fraction_is_stratified_disjoint_and_seeded(tmp_path):
    full = load(tmp_path)
    a, b, other = (load(tmp_path, seed=s, test_fraction=0.2) for s in (0, 0, 1))
    assert len(a.test.y) == 360 and len(a.train.y) == 1797 - 360
    counts, test_counts = torch.bincount(full.train.y), torch.bincount(a.test.y)
    assert torch.all((test_counts - 0.2 * counts).abs() <= 1)
    assert sorted(_rows(a.train) + _rows(a.test)) == _rows(full.train)
    assert a.fingerprint == b.fingerprint and torch.equal(a.test.x, b.test.x)
    assert a.fingerprint != other.fingerprint and not torch.equal(a.test.y, other.test.y)
    x = a.train.x.double() / 255  # statistics come from the training part only
    assert a.mean == pytest.approx([x.mean().item()], abs=1e-12)


def test_per_class_then_test_fraction(tmp_path):
    ds = load(tmp_path, per_class=20, test_fraction=0.25)
    assert torch.bincount(ds.test.y).tolist() == [5] * 10
    assert torch.bincount(ds.train.y).tolist() == [15] * 10


def test_image_size_resizes_every_image(tmp_path):
    ds = load(tmp_path, image_size=16)
    assert ds.train.x.shape == (1797, 1, 16, 16) and ds.train.x.dtype == torch.uint8
    flat = torch.full((2, 3, 9, 7), 77, dtype=torch.uint8)
    assert torch.equal(resize(flat, 4), torch.full((2, 3, 4, 4), 77, dtype=torch.uint8))
    assert resize(ds.train.x, 16) is ds.train.x  # already that size: no copy


def test_progress_bar_only_when_asked(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    load_dataset(cfg(source="folder", path=str(tree)), tmp_path / "c1", 0, progress=False)
    assert capsys.readouterr().err == ""
    load_dataset(cfg(source="folder", path=str(tree)), tmp_path / "c2", 0, progress=True)
    assert "decoding" in capsys.readouterr().err


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: magic 0x08 0x<ndim>, then the dims) of uint8 `array`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("source, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_source_from_local_files(tmp_path, source, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / "vision" / folder / "raw"
    train_x, test_x = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    ds = load(tmp_path / "cache", source=source, root=str(tmp_path / "vision"), image_size=28)
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.test.x.shape == (10, 1, 28, 28)
    assert np.array_equal(ds.train.x[:, 0].numpy(), train_x) and ds.test.y.tolist() == list(range(10))
    assert len(ds.train.classes) == 10
    with pytest.warns(data.DataNote, match=f"replaces {source}'s official test split"):
        carved = load(tmp_path / "cache", source=source, root=str(tmp_path / "vision"), image_size=14,
                      test_fraction=0.5)
    assert carved.train.x.shape == (15, 1, 14, 14) and len(carved.test.y) == 15  # official test not used


# --------------------------------------------------------------------------- folders and archives


@pytest.mark.parametrize("top", [None, "train"])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tree_and_archive_load_the_same_images(tmp_path, top, suffix):
    tree = make_tree(tmp_path / "tree", top=top, size=(10, 10))
    archive = make_tar(tree, tmp_path / f"set{suffix}")
    a = load(tmp_path / "cache", source="folder", path=str(tree), image_size=10)
    b = load(tmp_path / "cache", source="folder", path=str(archive), image_size=10)
    assert a.train.classes == b.train.classes == CLASSES
    assert a.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert a.fingerprint == b.fingerprint
    base = tree / top if top else tree
    png = np.asarray(Image.open(base / "dog" / "01.png")).transpose(2, 0, 1)  # lossless: exact pixels
    assert np.array_equal(a.train.x[4].numpy(), png)


def test_jpeg_decoding_matches_pil(tmp_path):
    tree = make_tree(tmp_path / "tree", ext=".JPG", size=(16, 16))
    ds = load(tmp_path / "cache", source="folder", path=str(tree), image_size=16)
    pil = np.asarray(Image.open(tree / "emu" / "02.JPG").convert("RGB")).transpose(2, 0, 1).astype(int)
    assert np.abs(ds.train.x[8].numpy().astype(int) - pil).max() <= 2


def test_mixed_sizes_and_modes_become_rgb_of_image_size(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=("a", "b"), mode="RGB", size=(20, 14), ext=".bmp")
    rng = np.random.default_rng(1)
    rng_image(rng, (9, 30), "L").save(tree / "a" / "gray.png")
    rng_image(rng, (8, 8), "RGB").convert("P").save(tree / "b" / "palette.gif")
    Image.new("RGBA", (11, 11), (10, 20, 30, 40)).save(tree / "b" / "alpha.webp", lossless=True)
    Image.new("RGB", (7, 9), (200, 100, 50)).save(tree / "b" / "scan.TIF")
    Image.new("RGBA", (5, 5), (1, 2, 3, 255)).save(tree / "a" / "opaque.png")  # alpha that hides nothing
    Image.new("L", (6, 6), 77).save(tree / "b" / "zz.pgm")  # netpbm, as in torchvision's ImageFolder
    with pytest.warns(data.DataNote, match=r"^1 image with transparent pixels \(e\.g\. '.*/b/alpha\.webp'\)"):
        ds = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    assert ds.train.x.shape == (12, 3, 12, 12)
    assert ds.train.x[11, :, 3, 3].tolist() == [77, 77, 77]
    assert ds.train.x[10, :, 6, 6].tolist() == [200, 100, 50]  # b/scan.TIF, last in b
    gray = ds.train.x[3]  # a/gray.png sorts after a/00..02.bmp
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert ds.train.x[4, :, 2, 2].tolist() == [1, 2, 3]  # a/opaque.png
    alpha = ds.train.x[8]  # b/00..02.bmp, then b/alpha.webp: its alpha dropped, as ImageFolder's convert("RGB")
    assert alpha[:, 5, 5].tolist() == pytest.approx([10, 20, 30], abs=3)


def test_files_that_are_not_images_are_skipped_with_a_note(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "cat" / "notes.txt").write_text("not an image")
    (tree / "labels.csv").write_text("file,label")
    (tree / "dog" / ".DS_Store").write_bytes(b"hidden: skipped without a word")
    for path in (tree, make_tar(tree, tmp_path / "tree.tar")):
        with pytest.warns(data.DataNote, match=r"skipped 2 files that are not images \(e\.g\. 'cat/notes\.txt'\)"):
            ds = load(tmp_path / "cache", source="folder", path=str(path), image_size=12)
        assert len(ds.train.y) == 9 and ds.train.classes == CLASSES


def test_all_grayscale_stays_one_channel(tmp_path):
    tree = make_tree(tmp_path / "tree", mode="L", size=(6, 6))
    ds = load(tmp_path / "cache", source="folder", path=str(tree), image_size=6)
    assert ds.train.x.shape == (9, 1, 6, 6) and len(ds.mean) == len(ds.std) == 1


def test_test_path_gives_a_separate_test_set(tmp_path):
    train = make_tree(tmp_path / "train", per_class=4, seed=0)
    test = make_tar(make_tree(tmp_path / "test", top="val", per_class=2, seed=1), tmp_path / "test.tgz")
    ds = load(tmp_path / "cache", source="folder", path=str(train), test_path=str(test), image_size=12)
    assert len(ds.train.y) == 12 and len(ds.test.y) == 6
    assert ds.test.classes == ds.train.classes and ds.test.y.tolist() == [0, 0, 1, 1, 2, 2]
    x = ds.train.x.double() / 255
    assert ds.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-12)


def test_a_test_set_may_hold_some_of_the_classes(tmp_path):
    """A test set lacking a class, with an empty class folder, is labelled by the training classes."""
    train = make_tree(tmp_path / "train", per_class=4, seed=0)
    test = make_tree(tmp_path / "test", classes=("emu",), per_class=2, seed=1)
    (test / "cat").mkdir()  # empty: no class of the test set
    ds = load(tmp_path / "cache", source="folder", path=str(train), test_path=str(test), image_size=12)
    assert ds.test.classes == CLASSES and ds.test.y.tolist() == [2, 2] and len(ds.test.x) == 2
    assert fit.describe_test_set(ds) == "2 test (1 of 3 classes)"  # fit's data line says so
    with pytest.raises(DataError, match="cat' has no images"):  # the same tree as training data is refused
        load(tmp_path / "cache", source="folder", path=str(test), image_size=12)


@pytest.mark.parametrize("layout, classes", [
    ("emu/2020/a.png emu/2021/b.png", ["emu", "emu"]),  # one class, with subfolders
    ("top/emu/a.png top/cat/sub/b.png empty/", ["cat", "emu"]),  # one top folder beside an empty one
])
def test_a_test_set_is_read_by_the_training_classes(tmp_path, layout, classes):
    """The class folders of a test set are the ones named like training classes, and predict
    reads such a tree the same way."""
    train = make_tree(tmp_path / "train", per_class=4)
    test = tmp_path / "test"
    for rel in layout.split():
        (test / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            (test / rel).mkdir(exist_ok=True)
        else:
            rng_image(np.random.default_rng(99), (12, 12), "RGB").save(test / rel)  # not a training image
    ds = load(tmp_path / "cache", source="folder", path=str(train), test_path=str(test), image_size=12)
    assert [CLASSES[i] for i in ds.test.y] == classes  # in path order
    files = [tuple(p.relative_to(test).parts) for p in sorted(test.rglob("*.png"))]
    assert predict._folder_labels(files, CLASSES, "test") == (ds.test.y.tolist(), [])


def test_notes_come_again_from_the_cache_and_before_a_data_error(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "cat" / "notes.txt").write_text("not an image")
    for _ in range(2):  # decoded, then read from the cache
        with pytest.warns(data.DataNote, match="skipped 1 file that is not an image"):
            load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    (tree / "yak").mkdir()  # an empty class folder: the load fails, the note still comes
    with pytest.warns(data.DataNote, match="skipped 1 file"), pytest.raises(DataError, match="yak' has no images"):
        load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)


def test_second_load_uses_the_cache_and_a_changed_file_does_not(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    first = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    (entry,) = (tmp_path / "cache").iterdir()
    assert {p.name for p in entry.iterdir()} == {"train_x.npy", "train_y.npy", "meta.json"}

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds this source")

    monkeypatch.setattr(data, "_decode_blobs", no_decoding)
    again = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    assert torch.equal(again.train.x, first.train.x) and again.fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="decoded"):  # another image_size is another cache entry
        load(tmp_path / "cache", source="folder", path=str(tree), image_size=6)
    touched = tree / "cat" / "00.png"
    os.utime(touched, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded"):
        load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)


def test_a_file_swapped_in_with_the_same_size_and_mtime_is_decoded_again(tmp_path):
    """Swapping two same-size images between classes (a relabelling) keeps every path, size and
    mtime; the inode and ctime still tell the cache that the files changed."""
    tree = make_tree(tmp_path / "tree", ext=".bmp")
    cat, dog = tree / "cat" / "00.bmp", tree / "dog" / "00.bmp"
    os.utime(cat, ns=(1, 1))
    os.utime(dog, ns=(1, 1))
    first = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    os.replace(cat, tmp_path / "swap.bmp")
    os.replace(dog, cat)
    os.replace(tmp_path / "swap.bmp", dog)
    again = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    assert torch.equal(again.train.x[0], first.train.x[3]) and torch.equal(again.train.x[3], first.train.x[0])
    assert again.fingerprint != first.fingerprint


def test_a_cache_that_cannot_be_written_is_a_note_and_the_images_load(tmp_path):
    (tmp_path / "file").write_bytes(b"x")  # the cache folder would have to be made under a file
    with pytest.warns(data.DataNote, match="could not be cached in .*; the next run decodes them again"):
        ds = load(tmp_path / "file" / "cache")
    assert len(ds.train.y) == len(load(tmp_path / "cache").train.y) > 0


def test_a_cache_that_cannot_be_written_is_said_once_for_training_and_test_images(tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    train, test = make_tree(tmp_path / "train"), make_tree(tmp_path / "test", seed=1)
    with data.notes_printed():
        load(tmp_path / "file" / "cache", source="folder", path=str(train), test_path=str(test), image_size=12)
    assert capsys.readouterr().err.count("could not be cached") == 1


def test_damaged_cache_is_rebuilt(tmp_path):
    first = load(tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "train_x.npy").write_bytes(b"garbage")
    again = load(tmp_path / "cache")
    assert torch.equal(again.train.x, first.train.x)


def test_decode_images_resizes_and_converts_channels(tmp_path):
    tree = make_tree(tmp_path / "new", classes=("x",), per_class=2, size=(20, 20))
    paths = sorted((tree / "x").iterdir())
    blobs, names = [p.read_bytes() for p in paths], [p.name for p in paths]
    assert decode_images(blobs, names, 10).shape == (2, 3, 10, 10)
    gray = decode_images(blobs[:1], names[:1], 20, channels=1)
    assert gray.shape == (1, 1, 20, 20)
    expected = np.asarray(Image.open(paths[0]).convert("L"), dtype=int)
    assert np.abs(gray[0, 0].numpy().astype(int) - expected).max() <= 1  # PIL's luma weights


def test_a_16_bit_gray_png_keeps_its_pixels_instead_of_turning_white(tmp_path):
    """PIL's convert("L") clips "I;16" pixels to 255; they are scaled to 8 bits instead."""
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "narrow.png")
    blobs = [(tmp_path / n).read_bytes() for n in ("wide.png", "narrow.png")]
    wide, narrow = decode_images(blobs, ["wide.png", "narrow.png"], 8)
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    assert wide.shape == (1, 8, 8) and wide.min() == 0 and wide.max() < 255
    assert (wide.int() - narrow.int()).abs().max() <= 1


def test_16_bit_gray_pngs_are_scaled_alike_whatever_their_brightest_pixel():
    """Two dim 16-bit images, one with a pixel at 255 and one at 256, decode on one scale."""
    out = []
    for top in (255, 256):
        png = io.BytesIO()
        Image.fromarray(np.full((4, 4), top, dtype=np.uint16)).save(png, "PNG")
        out.append(decode_images([png.getvalue()], ["dim.png"], 4))
    assert out[0].max() == out[1].max() == 1  # 255 and 256 of 65,535


def test_16_bit_pgms_are_scaled_alike_whatever_their_brightest_pixel():
    """PIL opens a 16-bit PGM as mode "I" (not "I;16"), already on 0..65535: scaled like a PNG."""
    out = [decode_images([b"P5 4 4 65535\n" + np.full((4, 4), top, ">u2").tobytes()], ["dim.pgm"], 4)
           for top in (200, 300)]
    assert out[0].max() == out[1].max() == 1  # 200 and 300 of 65,535


def test_an_image_over_pils_pixel_limit_is_a_note_naming_it_not_a_raw_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    png = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(png, "PNG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = decode_images([png.getvalue()], ["huge.png"], 8)
    assert x.shape == (1, 3, 8, 8)
    assert [w.category for w in caught] == [data.DataNote]
    assert "'huge.png' is 40x30 pixels" in str(caught[0].message)


def test_a_jpeg_over_pils_pixel_limit_is_noted_or_refused_like_any_image(monkeypatch):
    """JPEGs are decoded by torchvision, which has no such limit: their header is checked first."""
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(jpeg, "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(data.DataNote, match="'huge.jpg' is 40x30 pixels"):
        assert decode_images([jpeg.getvalue()], ["huge.jpg"], 8).shape == (1, 3, 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit
    with pytest.raises(DataError, match="huge.jpg"):
        decode_images([jpeg.getvalue()], ["huge.jpg"], 8)


def test_a_path_stored_twice_in_a_tar_is_one_image_its_last_copy(tmp_path):
    """`tar -r` appends a newer copy of a path; it is one image, as tar extracts it, not two
    copies that could land in two folds."""
    tree = make_tree(tmp_path / "tree")
    archive = make_tar(tree, tmp_path / "set.tar")
    Image.new("RGB", (12, 12), "blue").save(tree / "cat" / "00.png")
    with tarfile.open(archive, "a") as tf:
        tf.add(tree / "cat" / "00.png", arcname="cat/00.png")
    packed = load(tmp_path / "cache", source="folder", path=str(archive), image_size=12)
    folder = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    assert len(packed.train.y) == 9
    assert torch.equal(packed.train.x, folder.train.x) and torch.equal(packed.train.y, folder.train.y)


def test_a_palette_png_with_transparency_bytes_gives_no_raw_pil_warning():
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").convert("P").save(png, "PNG", transparency=b"\x00" * 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_images([png.getvalue()], ["p.png"], 8)
    assert [w.message for w in caught if w.category is not data.DataNote] == []


def test_a_link_loop_is_followed_once_and_links_inside_a_tar_are_the_images_they_name(tmp_path):
    """A tree with a link back to its root, and a second link to an image (as a hard link and as a
    symbolic one), loads as the tree without the loop; its tar archive, with the links as link
    members, loads the same images."""
    tree = make_tree(tmp_path / "tree")
    (tree / "cat" / "loop").symlink_to(tree)
    os.link(tree / "cat" / "00.png", tree / "dog" / "hard.png")
    (tree / "emu" / "soft.png").symlink_to("../cat/01.png")
    folder = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    assert folder.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    archive = tmp_path / "set.tar"
    with tarfile.open(archive, "w") as tf:  # tarfile stores the second name of a file as a hard link
        for c in CLASSES:
            tf.add(tree / c, arcname=c, filter=lambda m: None if m.name.endswith("loop") else m)
    with tarfile.open(archive) as tf:
        assert {m.name: m.type for m in tf.getmembers()}["dog/hard.png"] == tarfile.LNKTYPE
    packed = load(tmp_path / "cache", source="folder", path=str(archive), image_size=12)
    assert torch.equal(packed.train.x, folder.train.x) and torch.equal(packed.train.y, folder.train.y)


def test_a_folder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    locked = tree / "dog"
    scandir = os.scandir

    def refuse(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)  # chmod 000 stops no one running as root
    with pytest.raises(DataError, match="cannot list the folder '.*dog' .Permission denied"):
        load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)


def test_a_test_set_matches_class_names_in_either_unicode_form(tmp_path):
    """macOS writes 'café' decomposed (NFD); a test set written elsewhere composes it (NFC)."""
    nfd, nfc = "cafe\u0301", "caf\u00e9"
    train = make_tree(tmp_path / "a", classes=(nfd, "tea"))
    test = make_tree(tmp_path / "b", classes=(nfc,), seed=1)
    ds = load(tmp_path / "cache", source="folder", path=str(train), test_path=str(test), image_size=12)
    assert ds.train.classes == (nfd, "tea") and ds.test.y.tolist() == [0, 0, 0]


def test_classes_named_like_the_parts_of_a_split_are_noted(tmp_path):
    tree = tmp_path / "tree"
    for part in ("train", "val"):
        make_tree(tree / part, classes=("cat", "dog"))
    with pytest.warns(data.DataNote, match=f"set data.path to '{tree}/train'"):
        ds = load(tmp_path / "cache", source="folder", path=str(tree), image_size=12)
    assert ds.train.classes == ("train", "val")



def test_a_channel_that_never_changes_is_centred_not_divided_by_zero():
    x = torch.zeros((4, 3, 2, 2), dtype=torch.uint8)
    x[:, 0] = torch.arange(16, dtype=torch.uint8).view(4, 2, 2)  # red varies; green and blue are 0
    with pytest.warns(data.DataNote, match=r"channel 1 is the same value \(0\) in every training pixel"):
        mean, std = data.channel_stats(x)
    assert std[0] > 0 and std[1:] == (1.0, 1.0) and mean[1:] == (0.0, 0.0)


# --------------------------------------------------------------------------- errors


def _folder(**overrides):
    return lambda tmp: cfg(source="folder", image_size=12, **overrides)


def _tree_then(change):
    def setup(tmp):
        tree = make_tree(tmp / "tree")
        change(tree)
        return cfg(source="folder", path=str(tree), image_size=12)
    return setup


def _write(path: Path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _cut_at_a_header(tmp: Path) -> Path:
    """A .tar cut inside the header of its last member: Python's tarfile takes that for the end."""
    archive = make_tar(make_tree(tmp / "tree"), tmp / "whole.tar")
    with tarfile.open(archive) as tf:
        last = tf.getmembers()[-1].offset
    return _write(tmp / "cut.tar", archive.read_bytes()[: last + 100])


ERRORS = [
    ("unknown source", lambda tmp: cfg(source="imagenet"), "unknown; use one of: digits, cifar10"),
    ("empty path", _folder(path=""), "data.path is empty"),
    ("missing path", lambda tmp: cfg(source="folder", path=str(tmp / "nope")), "does not exist"),
    ("not an archive", lambda tmp: cfg(source="folder", path=str(_write(tmp / "a.txt", b"hello"))), "not a tar"),
    ("damaged archive", lambda tmp: cfg(source="folder", path=str(_write(tmp / "a.tar.gz", b"x" * 600))),
     "damaged"),
    ("tree without images", lambda tmp: cfg(source="folder", path=str(_write(tmp / "t/c/readme.txt", b"").parents[1])),
     "no images"),
    ("empty class folder", _tree_then(lambda t: (t / "yak").mkdir()), "yak' has no images"),
    ("corrupt image", _tree_then(lambda t: _write(t / "dog" / "bad.png", b"\x89PNG not really")), "bad.png"),
    ("corrupt jpeg", _tree_then(lambda t: _write(t / "dog" / "bad.jpg", b"\xff\xd8\xff garbage")), "bad.jpg"),
    ("images outside class folders", _tree_then(lambda t: shutil.copy(t / "cat" / "00.png", t / "loose.png")),
     "outside class folders"),
    ("one class", lambda tmp: cfg(source="folder", path=str(make_tree(tmp / "t", classes=("a",)))), "at least 2"),
    ("per_class too large", lambda tmp: cfg(per_class=200), "per_class = 200"),
    ("test_fraction too small", lambda tmp: cfg(test_fraction=0.001), "test_fraction = 0.001"),
    ("test_path and test_fraction", lambda tmp: cfg(test_path="x", test_fraction=0.2), "only one"),
    ("test classes differ", lambda tmp: cfg(source="folder", image_size=12, path=str(make_tree(tmp / "a")),
                                            test_path=str(make_tree(tmp / "b", classes=("cat", "dog", "gnu")))),
     "b' has class folders that the training data lacks: ['gnu']"),
    ("a link to nothing", _tree_then(lambda t: (t / "dog" / "gone.png").symlink_to(t / "nowhere.png")),
     "gone.png' (a link to nothing)"),
    ("a tar cut short at a header", lambda tmp: cfg(source="folder", path=str(_cut_at_a_header(tmp))),
     "cut short"),
    ("class name not UTF-8", _tree_then(lambda t: os.rename(t / "emu", os.fsencode(t) + b"/em\xfc")),
     "b'em\\xfc'"),
    ("cifar10 not downloaded", lambda tmp: cfg(source="cifar10", root=str(tmp / "vision")), "data.download = true"),
    ("mnist not downloaded", lambda tmp: cfg(source="mnist", root=str(tmp / "vision")), "vision'"),
]


@pytest.mark.filterwarnings("ignore::ensemble.data.DataNote")  # e.g. the note on a tree of text files
@pytest.mark.parametrize("setup, fragment", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_inputs_raise_data_error(tmp_path, setup, fragment):
    with pytest.raises(DataError) as info:
        load_dataset(setup(tmp_path), tmp_path / "cache", 0, progress=False)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- real CIFAR-10


def test_cifar10_archive_slice(cifar_archive, session_cache):
    ds = load(session_cache, source="folder", path=str(cifar_archive), per_class=20, image_size=32)
    assert ds.train.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                "ship", "truck")
    assert ds.train.x.shape == (200, 3, 32, 32) and ds.test is None
    assert torch.bincount(ds.train.y).tolist() == [20] * 10
    assert all(0.3 < m < 0.6 for m in ds.mean) and all(0.15 < s < 0.35 for s in ds.std)


def test_a_test_set_replacing_a_torchvision_sources_official_split_is_noted(tmp_path, monkeypatch):
    everything = load(tmp_path / "cache").train
    digits = data._subset(everything, np.arange(50, len(everything.y)))
    official = data._subset(everything, np.arange(50))  # stands in for torchvision's test split (no download here)
    monkeypatch.setattr(data, "_load_source", lambda cfg, cache, progress: (digits, official))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(load(tmp_path / "cache", source="cifar10").test.y) == 50
    assert not [w for w in caught if issubclass(w.category, data.DataNote)]
    with pytest.warns(data.DataNote, match="data.test_fraction = 0.2 replaces cifar10's official test split: the "
                                           "test set is held out of its training split"):
        assert len(load(tmp_path / "cache", source="cifar10", test_fraction=0.2).test.y) == 350
    tree = make_tree(tmp_path / "tree", classes=("0", "1"), size=(8, 8))
    with pytest.warns(data.DataNote, match="data.test_path replaces cifar10's official test split as the test set"):
        assert len(load(tmp_path / "cache", source="cifar10", test_path=str(tree)).test.y) == 6


def test_test_images_that_are_training_images_are_noted(tmp_path):
    tree = make_tree(tmp_path / "train", size=(8, 8))
    test = make_tree(tmp_path / "test", size=(8, 8), seed=1)
    shutil.copy(tree / "dog" / "01.png", test / "dog" / "copy.png")  # one training image in the test set
    with pytest.warns(data.DataNote, match=r"1 of the 10 test images is also a training image \(the same pixels\)"):
        load(tmp_path / "cache", source="folder", path=str(tree), test_path=str(test), image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataNote)  # none shared: no note
        load(tmp_path / "cache", source="folder", path=str(tree), test_path=str(make_tree(tmp_path / "t2", size=(8, 8),
                                                                                           seed=2)), image_size=8)


def test_a_hold_out_keeps_copies_of_an_image_on_one_side():
    """Two copies of one image split between train and test would score the test copy on memory."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(60, 1, 4, 4), dtype=np.uint8))
    y = torch.arange(60) % 3
    x[30:45] = x[0:15]  # 15 images stored twice, each copy in its original's class
    images = Images(x.contiguous(), y, ("a", "b", "c"))
    for seed in range(5):
        train, test = data.hold_out(images, 0.3, seed)
        assert not set(data.row_digests(train.x)) & set(data.row_digests(test.x))
        assert len(train.y) + len(test.y) == 60 and set(test.y.tolist()) == {0, 1, 2}
    from sklearn.model_selection import train_test_split

    x = x[torch.arange(45) + 15]  # no copies left: the plain stratified split, as before copies were grouped
    _, plain = train_test_split(np.arange(45), test_size=0.3, stratify=y[15:].numpy(), random_state=3)
    assert torch.equal(data.hold_out(Images(x, y[15:], ("a", "b", "c")), 0.3, 3)[1].x, x[np.sort(plain)])


def test_a_hold_out_counts_distinct_images_per_class():
    x = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([1, 2, 3, 4, 5, 5])
    with pytest.raises(DataError, match="at least 2 distinct images per class.*class 'b' has 1"):
        data.hold_out(Images(x, torch.tensor([0, 0, 0, 0, 1, 1]), ("a", "b")), 0.5, 0)
