"""`python -m ensemble.predict`: reproduces fit's test metrics, reports bad inputs one by one,
refuses tampered runs without executing anything, and a fitted run holds no pickle.

One tiny real run (digits 8x8, two timm test backbones, one with 2 snapshots, 2 folds,
4 epochs) is trained once per module with `ensemble.fit` and copied where a test damages it.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ensemble import fit, predict, store
from ensemble.data import load_dataset
from ensemble.recipe import load as load_recipe
from ensemble.store import RunError

RECIPE = """
name = "tiny"
seed = 0
[data]
source = "digits"
test_fraction = 0.25
per_class = 30
image_size = 8
[cv]
folds = 2
[train]
epochs = 4
batch_size = 32
lr = 0.05
augment = ["flip"]
[[backbones]]
name = "timm:test_resnet"
alias = "res"
snapshots = 2
[[backbones]]
name = "timm:test_efficientnet"
alias = "eff"
optimizer = "adamw"
lr = 0.01
[ensemble]
combiners = ["mean", "weighted", "stacking", "snapshot"]
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The tiny run, its test hold-out written as an ImageFolder of PNGs, and the cache."""
    root = tmp_path_factory.mktemp("predict")
    (root / "tiny.toml").write_text(RECIPE)
    cache = root / "cache"
    rc = fit.main([str(root / "tiny.toml"), "--out", str(root / "run"), "--quiet", "--no-report",
                   "--cache", str(cache)])
    assert rc == 0
    folder = write_test_folder(root / "run", root / "test_images", cache)
    return {"run": root / "run", "test": folder, "cache": cache}


def write_test_folder(run: Path, out: Path, cache: Path) -> Path:
    """The run's stratified test hold-out (as fit carved it) as lossless PNGs in class folders."""
    recipe = load_recipe(run / "recipe.toml")
    test = load_dataset(recipe.data, cache, recipe.seed, progress=False).test
    assert np.array_equal(test.y.numpy(), np.load(run / "test_labels.npy"))
    for i, (x, y) in enumerate(zip(test.x, test.y)):
        folder = out / test.classes[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).squeeze(-1).numpy()).save(folder / f"{i:04d}.png")
    return out


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    """A private copy of the run, free to damage."""
    return Path(shutil.copytree(base["run"], tmp_path / "run"))


@pytest.fixture
def good_image(base) -> Path:
    return sorted(base["test"].rglob("*.png"))[0]


def call(argv, capsys) -> tuple[int, str, str]:
    rc = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- acceptance 1: reproduces fit


def check_reproduces(run: Path, images: Path, method: str | None, out: Path, capsys) -> dict:
    argv = [run, images, "--out", out, "--quiet"] + (["--method", method] if method else [])
    rc, stdout, err = call(argv, capsys)
    assert rc == 0, err
    saved = json.loads(predict.metrics_path(out).read_text())
    recorded = json.loads((run / "metrics.json").read_text())
    name = method or recorded["best"]
    assert saved["method"] == name
    want = recorded["combiners"][name]["test"]
    got = saved["metrics"]
    assert saved["n_labelled"] == len(np.load(run / "test_labels.npy"))
    assert abs(got["accuracy"] - want["accuracy"]) <= 0.005, (got["accuracy"], want["accuracy"])
    assert got["nll"] == pytest.approx(want["nll"], abs=1e-3)
    assert got["confusion"] == want["confusion"]
    assert "images/s" in stdout and "accuracy" in stdout
    return got


@pytest.mark.parametrize("method", [None, "stacking", "snapshot"])
def test_reproduces_fit_test_metrics(base, tmp_path, capsys, method):
    check_reproduces(base["run"], base["test"], method, tmp_path / "preds.csv", capsys)


def test_a_kill_after_the_csv_never_leaves_an_earlier_csvs_metrics_beside_it(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.csv"
    assert call([base["run"], base["test"], "--out", out, "--quiet"], capsys)[0] == 0
    assert predict.metrics_path(out).is_file()  # labelled images: metrics beside the CSV
    real = predict.write_csv

    def then_killed(*args):
        real(*args)
        raise KeyboardInterrupt  # Ctrl-C (or a kill) between the CSV and its metrics

    monkeypatch.setattr(predict, "write_csv", then_killed)
    assert call([base["run"], base["test"], "--out", out, "--quiet"], capsys)[0] == 130
    assert out.is_file() and not predict.metrics_path(out).exists()


@pytest.mark.parametrize("damaged", ["data.json", "combiners/index.json"])
def test_a_damaged_run_file_says_how_fit_rewrites_it(base, tmp_path, capsys, damaged):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    (run / damaged).write_text("{not json")
    rc, _, err = call([run, base["test"], "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 2 and f"{damaged}: not valid JSON (" in err
    assert f"); rewrite it with `python -m ensemble.fit {run / 'recipe.toml'} --out {run}" in err


def test_csv_layout(base, tmp_path, capsys):
    out = tmp_path / "sub" / "p.csv"
    rc, _, _ = call([base["run"], base["test"], "--out", out, "--quiet"], capsys)
    assert rc == 0
    rows = read_csv(out)
    classes = json.loads((base["run"] / "data.json").read_text())["classes"]
    assert list(rows[0]) == ["path", "pred", *(f"prob_{c}" for c in classes), "label"]
    proba = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert [r["pred"] for r in rows] == [classes[i] for i in proba.argmax(1)]
    assert all(r["label"] == Path(r["path"]).parent.name for r in rows)
    assert len(rows) == len(list(base["test"].rglob("*.png")))


def test_csv_probabilities_keep_a_tied_votes_tie_break(tmp_path):
    """A 2-2 vote gives the winner 1e-6 more; the prob columns must still pick the `pred` class."""
    from ensemble.combiners import make_combiner

    logits = np.zeros((4, 1, 3))
    logits[[0, 1], 0, 0] = 5.0
    logits[[2, 3], 0, 2] = [5.0, 6.0]  # class 2 has the larger summed probability: it wins the tie
    proba = make_combiner("vote").fit(logits, np.array([0])).predict_proba(logits)
    predict.write_csv(tmp_path / "p.csv", ["x.png"], proba, ["a", "b", "c"], None)
    (row,) = read_csv(tmp_path / "p.csv")
    columns = [float(row[f"prob_{c}"]) for c in "abc"]
    assert row["pred"] == "c" and "abc"[int(np.argmax(columns))] == "c" and columns[2] > columns[0]


def test_ctrl_c_is_one_line_and_leaves_no_csv(base, tmp_path, capsys, monkeypatch):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "member_logits", interrupted)
    rc, _, err = call([base["run"], base["test"], "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 130 and err.strip() == "interrupted" and not (tmp_path / "p.csv").exists()


def test_an_out_ending_in_a_slash_is_a_folder_not_a_file_name(base, tmp_path, capsys):
    rc, _, err = call([base["run"], base["test"], "--out", f"{tmp_path / 'results'}/"], capsys)
    assert rc == 2 and "names a folder; give a CSV file name" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("members", [False, True])
def test_a_reader_that_goes_away_is_exit_141_not_a_traceback(base, tmp_path, members):
    """`predict ... | head -c 1`: the closed pipe is no failed input (1) and no traceback, also where
    stdout is block-buffered (no PYTHONUNBUFFERED) and the lines would only be written at exit."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before predict writes a line
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        args = ["--members"] if members else [str(base["test"]), "--out", str(tmp_path / "p.csv"), "--quiet"]
        done = subprocess.run([sys.executable, "-m", "ensemble.predict", str(base["run"]), *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_tar_of_imagefolder_and_unlabelled_inputs(base, tmp_path, capsys, good_image):
    archive = tmp_path / "test.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(base["test"], arcname="test")  # one top folder holding the class folders
    rc, _, err = call([base["run"], archive, good_image, "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 0, err
    rows = read_csv(tmp_path / "p.csv")
    assert rows[0]["path"].startswith(f"{archive}:test/")
    assert all(r["label"] for r in rows[:-1]) and rows[-1]["label"] == ""  # the loose file has no label
    saved = json.loads(predict.metrics_path(tmp_path / "p.csv").read_text())
    assert saved["n_images"] == len(rows) and saved["n_labelled"] == len(rows) - 1


def test_folders_that_are_not_classes_give_no_labels(base, tmp_path, capsys, good_image):
    (tmp_path / "imgs" / "cats").mkdir(parents=True)
    shutil.copy(good_image, tmp_path / "imgs" / "cats" / "a.png")
    (tmp_path / "imgs" / "cats" / "README.txt").write_text("not an image")
    rc, _, err = call([base["run"], tmp_path / "imgs", "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 0, err
    assert "not classes of the run" in err and "skipped 1 file that is not an image" in err
    assert "label" not in read_csv(tmp_path / "p.csv")[0]
    assert not predict.metrics_path(tmp_path / "p.csv").exists()


def test_images_in_subfolders_of_a_class_folder_get_its_label(base, tmp_path, capsys):
    """fit labels <class>/<any subfolders>/<image> with <class>: predict reads the same tree the same way."""
    pngs = sorted(base["test"].rglob("*.png"))
    first, last = pngs[0], pngs[-1]
    tree = tmp_path / "wrap" / "imgs"
    for png, sub in ((first, "a/b"), (last, "")):
        folder = tree / png.parent.name / sub
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, folder / png.name)
    rc, _, err = call([base["run"], tmp_path / "wrap", "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 0, err
    rows = read_csv(tmp_path / "p.csv")
    assert [r["label"] for r in rows] == [first.parent.name, last.parent.name]
    assert json.loads(predict.metrics_path(tmp_path / "p.csv").read_text())["n_labelled"] == 2

    shutil.copy(first, tree / "loose.png")  # an image beside the class folders: no labels, and a note why
    rc, _, err = call([base["run"], tmp_path / "wrap", "--out", tmp_path / "q.csv", "--quiet"], capsys)
    assert rc == 0 and "1 image lies outside the class folders (e.g. 'imgs/loose.png')" in err
    assert "label" not in read_csv(tmp_path / "q.csv")[0]


def test_rgb_input_to_grayscale_run_and_tta(base, tmp_path, capsys, good_image):
    rgb = tmp_path / "rgb.jpg"
    Image.open(good_image).convert("RGB").resize((32, 32)).save(rgb, quality=95)
    out = tmp_path / "p.csv"
    assert call([base["run"], rgb, good_image, "--out", out, "--quiet"], capsys)[0] == 0
    plain = read_csv(out)
    assert call([base["run"], rgb, good_image, "--out", out, "--quiet", "--tta", "flip"], capsys)[0] == 0
    flipped = read_csv(out)
    assert [r["path"] for r in plain] == [str(rgb), str(good_image)]
    assert any(a["prob_0"] != b["prob_0"] for a, b in zip(plain, flipped))


def test_tta_flip_is_refused_for_a_member_never_trained_on_mirrored_images(base, tmp_path, capsys, good_image):
    run = Path(shutil.copytree(base["run"], tmp_path / "run"))
    recipe = (run / "recipe.toml").read_text()
    assert 'augment = ["flip"]' in recipe
    (run / "recipe.toml").write_text(recipe.replace('augment = ["flip"]', "augment = []", 1))  # as trained on digits
    out = tmp_path / "p.csv"
    rc, _, err = call([run, good_image, "--out", out, "--quiet", "--tta", "flip", "--method", "mean"], capsys)
    assert rc == 2 and "--tta flip: mean's member 'res' never trained on mirrored images (its augment is [])" in err
    assert not out.exists()


def test_members_lists_run(base, capsys):
    rc, out, _ = call([base["run"], "--members"], capsys)
    assert rc == 0
    assert "res@s1, res@s2" in out and "2/2 folds done" in out
    best = json.loads((base["run"] / "combiners" / "index.json").read_text())["best"]
    assert f"{best} (best)" in out and "stacking" in out


def test_a_loaded_run_holds_its_recipe_as_run(base, run_copy):
    assert predict.load_run(base["run"]).recipe.data.test_fraction == 0.25
    text = (run_copy / "recipe.toml").read_text()  # a [data] key this version does not know
    (run_copy / "recipe.toml").write_text(text.replace("[data]\n", "[data]\nold_key = 1\n"))
    assert predict.load_run(run_copy).recipe.data.test_fraction == 0.0  # left at the defaults: predict needs none


def test_snapshot_members_map_to_files(base):
    run = predict.load_run(base["run"])
    assert predict.resolve_member(run, "res@s1").weights == "snapshot0.safetensors"
    assert predict.resolve_member(run, "res@s2").weights == "weights.safetensors"
    assert predict.resolve_member(run, "eff").weights == "weights.safetensors"
    for bad in ("res@s3", "res@s0", "eff@s1", "../res", "nope"):
        with pytest.raises(RunError, match="is not in this run"):
            predict.resolve_member(run, bad)


# --------------------------------------------------------------------------- acceptance 2: bad inputs


def _corrupt_png(d: Path) -> Path:
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return d / "bad.png"


def _truncated_png(d: Path, good: Path) -> Path:
    img = Image.open(good).resize((64, 64))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return d / "cut.png"


def _transparent_png(d: Path, good: Path) -> Path:
    img = Image.open(good).convert("RGBA")
    img.putalpha(Image.new("L", img.size, 0))
    img.save(d / "alpha.png")
    return d / "alpha.png"


def _empty_dir(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _text_file(d: Path) -> Path:
    (d / "notes.txt").write_text("hello")
    return d / "notes.txt"


def _corrupt_tar(d: Path) -> Path:
    (d / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 50)
    return d / "broken.tar.gz"


def _tar_with_bad_member(d: Path, good: Path) -> Path:
    bad = _corrupt_png(d)
    with tarfile.open(d / "mixed.tar", "w") as tf:
        tf.add(bad, arcname="bad.png")
    bad.unlink()
    return d / "mixed.tar"


def _tar_cut_short(d: Path, good: Path) -> Path:
    """A tar cut inside its image's header, after a text file: Python's tarfile takes the cut for the end."""
    (d / "notes.txt").write_text("hello")
    with tarfile.open(d / "whole.tar", "w") as tf:
        tf.add(d / "notes.txt", arcname="notes.txt")
        tf.add(good, arcname="image.png")
    with tarfile.open(d / "whole.tar") as tf:
        cut = tf.getmember("image.png").offset + 100
    (d / "cut.tar").write_bytes((d / "whole.tar").read_bytes()[:cut])
    return d / "cut.tar"


BAD_INPUTS = [
    # (case, make(dir, good image) -> path, message fragment)
    ("missing path", lambda d, g: d / "nope.png", "does not exist"),
    ("empty directory", lambda d, g: _empty_dir(d), "no images"),
    ("non-image file", lambda d, g: _text_file(d), "not an image"),
    ("corrupt image", lambda d, g: _corrupt_png(d), "not a readable image"),
    ("truncated image", _truncated_png, "not a readable image"),
    ("transparent RGBA image", _transparent_png, "has transparent pixels: the colours under them are arbitrary"),
    ("corrupt tar.gz", lambda d, g: _corrupt_tar(d), "not a readable tar archive"),
    ("corrupt image inside a tar", _tar_with_bad_member, "not a readable image"),
    ("tar cut short", _tar_cut_short, "end-of-archive block: it was cut short"),
]


@pytest.mark.parametrize("case, make, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_reported_and_others_predicted(base, tmp_path, capsys, good_image, case, make, message):
    bad = make(tmp_path, good_image)
    out = tmp_path / "p.csv"
    rc, stdout, err = call([base["run"], bad, good_image, "--out", out, "--quiet"], capsys)
    assert rc == 1
    assert f"error: {bad}" in err and message in err and "BytesIO" not in err
    assert [r["path"] for r in read_csv(out)] == [str(good_image)]
    assert "1 input failed" in stdout


def test_a_file_name_that_is_not_utf8_is_written_escaped(base, tmp_path, capsys, good_image):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, as older systems write it
    shutil.copy(good_image, tmp_path / name)
    rc, _, err = call([base["run"], tmp_path / name, "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 0, err
    assert [r["path"] for r in read_csv(tmp_path / "p.csv")] == [f"{tmp_path}/caf\\udce9.png"]


def test_options_may_come_between_the_run_and_the_inputs(base, tmp_path, capsys, good_image):
    out = tmp_path / "p.csv"
    rc, _, err = call([base["run"], "--method", "mean", "--out", out, good_image, "--quiet"], capsys)
    assert rc == 0, err
    assert [r["path"] for r in read_csv(out)] == [str(good_image)]


def test_a_pipe_as_input_fails_without_hanging(base, tmp_path, capsys, good_image):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it to read would wait for a writer for ever
    rc, _, err = call([base["run"], fifo, good_image, "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 1 and f"error: {fifo}: not a regular file (a device or a pipe)" in err
    assert [r["path"] for r in read_csv(tmp_path / "p.csv")] == [str(good_image)]


def test_nothing_readable_exits_1_without_csv(base, tmp_path, capsys):
    rc, _, err = call([base["run"], tmp_path / "missing", "--out", tmp_path / "p.csv"], capsys)
    assert rc == 1 and "nothing predicted" in err
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------- acceptance 2: tampered runs


class Payload:
    """Unpickling this creates the file `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=4)


def _weights(run: Path, name: str = "weights.safetensors", alias: str = "res", fold: int = 0) -> Path:
    return run / "members" / alias / f"fold{fold}" / name


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _edit_npz(path: Path, **arrays) -> None:
    with np.load(path) as npz:
        current = {k: npz[k] for k in npz.files}
    np.savez(path, **{**current, **arrays})


def _swap_weights(run: Path, marker: Path) -> None:
    """eff's weights where res's belong: a valid safetensors file for another architecture."""
    shutil.copy(_weights(run, alias="eff"), _weights(run))


def _nan_weights(run: Path, marker: Path) -> None:
    state = load_file(str(_weights(run)))
    key = next(k for k, t in state.items() if t.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(_weights(run)))


TAMPERED = [
    # (case, tamper(run, marker), exit status, message fragments)
    ("weights replaced by a pickle",
     lambda r, m: _weights(r).write_bytes(_pickle_bytes(m)), 2,
     ["fold0/weights.safetensors", "not a readable safetensors"]),
    ("weights replaced by a torch checkpoint",
     lambda r, m: torch.save({"x": Payload(m)}, _weights(r)), 2,
     ["fold0/weights.safetensors", "not a readable safetensors"]),
    ("weights truncated", lambda r, m: _truncate(_weights(r)), 2,
     ["fold0/weights.safetensors", "not a readable safetensors"]),
    ("weights missing", lambda r, m: _weights(r).unlink(), 2, ["fold0/weights.safetensors", "missing"]),
    ("weights of another architecture", _swap_weights, 2, ["fold0/weights.safetensors", "do not fit"]),
    ("weights holding NaN", _nan_weights, 2, ["fold0/weights.safetensors", "NaN or inf"]),
    ("combiner json with wrong member count",
     lambda r, m: _edit_json(r / "combiners" / "weighted.json", lambda d: d["state"].update(n_members_=5)), 2,
     ["combiners/weighted.json"]),
    ("combiner npz with wrong shapes",
     lambda r, m: _edit_npz(r / "combiners" / "weighted.npz", weights_=np.ones(7) / 7), 2,
     ["combiners/weighted.json", "weights_", "shape"]),
    ("combiner npz holding a pickled object",
     lambda r, m: np.savez(r / "combiners" / "weighted.npz",
                           weights_=np.array([Payload(m), 1], dtype=object), allow_pickle=True), 2,
     ["combiners/weighted.npz", "pickle"]),
    ("combiner json not JSON",
     lambda r, m: (r / "combiners" / "weighted.json").write_bytes(_pickle_bytes(m)), 2,
     ["combiners/weighted.json", "not readable JSON"]),
    ("index.json names an unsafe file",
     lambda r, m: _edit_json(r / "combiners" / "index.json",
                             lambda d: d["combiners"]["weighted"].update(file="../../evil")), 2,
     ["combiners/index.json", "no path separators"]),
    ("index.json names an unknown member",
     lambda r, m: _edit_json(r / "combiners" / "index.json",
                             lambda d: d["combiners"]["weighted"]["members"].append("ghost")), 2,
     ["combiners/index.json", "'ghost' is not in this run"]),
    ("recipe.toml not TOML",
     lambda r, m: (r / "recipe.toml").write_bytes(_pickle_bytes(m)), 2, ["recipe.toml"]),
    ("data.json with 4 channels",
     lambda r, m: _edit_json(r / "data.json", lambda d: d.update(channels=4)), 2, ["data.json", "channels"]),
    ("a pickle dropped into the run",
     lambda r, m: (r / "combiners" / "weighted.pkl").write_bytes(_pickle_bytes(m)), 0,
     ["weighted.pkl", "never opened"]),
    ("combiners not fitted (fit stopped early)",
     lambda r, m: (r / "combiners" / "index.json").unlink(), 2,
     ["unfinished", "python -m ensemble.fit", "recipe.toml --out"]),
    ("a fold not finished",
     lambda r, m: (r / "members" / "eff" / "fold1" / "done.json").unlink(), 2,
     ["eff/fold1", "unfinished", "python -m ensemble.fit", "recipe.toml --out"]),
]


@pytest.mark.parametrize("case, tamper, status, fragments", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_tampered_run(run_copy, tmp_path, capsys, good_image, case, tamper, status, fragments):
    marker = tmp_path / "code_ran"
    tamper(run_copy, marker)
    assert not marker.exists()
    rc, _, err = call([run_copy, good_image, "--method", "weighted", "--out", tmp_path / "p.csv", "--quiet"],
                      capsys)
    assert rc == status, err
    for fragment in fragments:
        assert fragment in err
    assert not marker.exists(), "a file of the run was unpickled"
    assert "Traceback" not in err


def test_payload_is_live(tmp_path):
    """The pickles above do run code when unpickled, so the tampered-run tests mean something."""
    marker = tmp_path / "code_ran"
    pickle.loads(_pickle_bytes(marker))
    assert marker.exists()


USAGE = [
    # (case, argv after the run, message fragment)
    ("no input", [], "give at least one INPUT"),
    ("unknown tta", ["x.png", "--tta", "rotate"], "invalid choice"),
    ("bad batch size", ["x.png", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("out is a folder", ["x.png", "--out", "."], "--out . is a folder; give a CSV file name"),
    ("out is a device", ["x.png", "--out", "/dev/null"], "--out /dev/null is not a regular file"),
    ("unknown device", ["x.png", "--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    ("unknown method", ["x.png", "--method", "averaging"], "unknown combiner 'averaging'"),
    ("empty method", ["x.png", "--method", ""], "unknown combiner ''"),
    ("members with inputs", ["x.png", "--members"], "--members lists what the run holds and predicts nothing"),
    ("method not fitted", ["x.png", "--method", "vote"], "was not fitted for this run"),
]


@pytest.mark.parametrize("case, argv, message", USAGE, ids=[c[0] for c in USAGE])
def test_usage_errors_exit_2(base, capsys, case, argv, message):
    rc, _, err = call([base["run"], *argv], capsys)
    assert rc == 2 and message in err


@pytest.mark.parametrize("out, message", [
    (lambda run, image: run / "recipe.toml", "is inside the run folder"),
    (lambda run, image: image, "is one of the INPUTs"),
    (lambda run, image: image / "p.csv", "is a file, not a folder"),
    (lambda run, image: image.parent / "other.png", "is named like an image or an archive"),  # an input's sibling
])
def test_out_that_would_destroy_a_file_is_refused(base, capsys, good_image, out, message):
    before = {p: p.read_bytes() for p in (base["run"] / "recipe.toml", good_image)}
    rc, _, err = call([base["run"], good_image, "--out", out(base["run"], good_image)], capsys)
    assert rc == 2 and message in err
    assert {p: p.read_bytes() for p in before} == before


def test_an_unwritable_out_is_one_line(base, capsys, good_image, monkeypatch):
    def full_disk(path, text):
        raise OSError(28, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr(store, "write_text", full_disk)
    rc, _, err = call([base["run"], good_image, "--out", "/tmp/never/p.csv", "--quiet"], capsys)
    assert rc == 2 and err == "error: cannot write --out /tmp/never/p.csv: No space left on device\n"


def test_not_a_run_folder(tmp_path, capsys, good_image):
    rc, _, err = call([tmp_path, good_image], capsys)
    assert rc == 2 and "not a run folder" in err


def test_unfitted_method_message_gives_fit_command(base, capsys):
    _, _, err = call([base["run"], "x.png", "--method", "vote+ts"], capsys)
    assert f"python -m ensemble.fit {base['run'] / 'recipe.toml'} --out {base['run']}" in err
    assert "ensemble.combiners=[\"mean\",\"weighted\",\"stacking\",\"snapshot\",\"vote\"]" in err
    assert "ensemble.calibrate=true" in err


def test_snapshot_of_several_snapshot_backbones_names_each(run_copy, good_image, capsys):
    """With two snapshot backbones fit names the snapshot combiners snapshot:<alias>."""
    index = json.loads((run_copy / "combiners" / "index.json").read_text())
    index["combiners"]["snapshot:snap_a"] = index["combiners"].pop("snapshot")
    index["combiners"]["snapshot:snap_b"] = index["combiners"]["snapshot:snap_a"]
    (run_copy / "combiners" / "index.json").write_text(json.dumps(index))
    rc, _, err = call([run_copy, good_image, "--method", "snapshot"], capsys)
    assert rc == 2 and "give --method snapshot:snap_a or snapshot:snap_b" in err
    assert "ensemble.fit" not in err  # refitting would change nothing


def test_fit_command_quotes_paths_with_spaces(tmp_path):
    run = tmp_path / "my runs" / "digits"
    command = predict.fit_command(run)
    assert command == f"python -m ensemble.fit '{run / 'recipe.toml'}' --out '{run}'"


# --------------------------------------------------------------------------- acceptance 3: no pickle in a run


def test_run_folder_holds_no_pickle(base):
    """Every file of a fitted run is checked by content, not by name."""
    files = [p for p in base["run"].rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".npz" for p in files)
    for path in files:
        assert path.suffix not in (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt"), path
        head = path.read_bytes()[:4]
        assert head[:1] != b"\x80", f"{path} starts like a pickle"
        if head == b"PK\x03\x04":  # a zip: only numpy's npz (plain .npy members) is allowed
            assert path.suffix == ".npz", f"{path} is a zip (a torch checkpoint?)"
            with zipfile.ZipFile(path) as zf:
                assert all(n.endswith(".npy") for n in zf.namelist()), path
            with np.load(path, allow_pickle=False) as npz:
                assert all(not npz[k].dtype.hasobject for k in npz.files)
        elif path.suffix == ".npy":
            assert not np.load(path, allow_pickle=False).dtype.hasobject


def test_bad_files_among_many_keep_order(base, tmp_path, capsys):
    """Decoding is batched; a bad file in a batch is isolated and every good one kept, in path order."""
    folder = tmp_path / "mixed"
    shutil.copytree(base["test"], folder)
    bad = [folder / "3" / "zz_bad.png", folder / "0" / "00_bad.jpg"]
    for path in bad:
        path.write_bytes(b"not an image at all")
    rc, _, err = call([base["run"], folder, "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 1 and all(f"error: {p}: not a readable image" in err for p in bad)
    rows = read_csv(tmp_path / "p.csv")
    good = sorted(str(p) for p in folder.rglob("*.png") if p not in bad)
    assert [r["path"] for r in rows] == good


def test_opaque_alpha_is_accepted_transparent_palette_refused(base, tmp_path, capsys, good_image):
    opaque = tmp_path / "opaque.png"
    Image.open(good_image).convert("RGBA").save(opaque)  # alpha 255 everywhere: carries nothing
    palette = Image.open(good_image).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "keyed.png", transparency=0)
    rc, _, err = call([base["run"], opaque, tmp_path / "keyed.png", "--out", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 1 and "keyed.png: has transparent pixels: the colours under them are arbitrary" in err
    assert [r["path"] for r in read_csv(tmp_path / "p.csv")] == [str(opaque)]


def test_the_readme_python_snippet_reproduces_fits_stacking_scores(base, capsys):
    """README "From Python": the snippet, pointed at this module's run, prints fit's stacking row."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## From Python")[1]
    block = section.split("\nprints")[0].splitlines()
    code = "\n".join(line[4:] for line in block if line.startswith("    ") or not line.strip())
    assert "cross_val_proba" in code and "outputs/digits_5fold" in code
    exec(compile(code.replace("outputs/digits_5fold", str(base["run"])), "README.md", "exec"), {})
    scores = json.loads((base["run"] / "metrics.json").read_text())["combiners"]["stacking"]
    expected = f"nested OOF {scores['oof']['accuracy']:.4f}, test {scores['test']['accuracy']:.4f}"
    assert capsys.readouterr().out.strip() == expected
