"""`python -m ensemble.bench unseen`: a finished run scored on its source's images it never used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ensemble import fit, predict
from ensemble.bench import unseen
from ensemble.data import Images, keep_per_class, load_dataset
from ensemble.recipe import load as load_recipe
from ensemble.store import read_json

PER_CLASS, EXTRA = 20, 10  # the run keeps 20 images of each class; 10 more of each are unseen

RECIPE = """
name = "unseen"
seed = 0
[data]
source = "folder"
path = "{tree}"
per_class = 20
test_fraction = 0.25
image_size = 8
[cv]
folds = 2
[train]
epochs = 2
batch_size = 16
lr = 0.05
[[backbones]]
name = "timm:test_resnet"
[[backbones]]
name = "timm:test_efficientnet"
[ensemble]
combiners = ["mean", "weighted"]
"""


def digits_tree(root: Path, first: int = 0, count: int = PER_CLASS + EXTRA) -> Path:
    """Digits 0-2 as 8x8 PNGs root/<digit>/<i>.png for i in first..first+count-1 (file order = source order)."""
    digits = load_digits()
    for c in range(3):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == c]
        for i in range(first, first + count):
            Image.fromarray((images[i] * 255 / 16).astype(np.uint8), mode="L").save(root / str(c) / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("unseen")
    tree = digits_tree(root / "digits")
    (root / "unseen.toml").write_text(RECIPE.format(tree=tree))
    cache = root / "cache"
    rc = fit.main([str(root / "unseen.toml"), "--out", str(root / "run"), "--quiet", "--no-report",
                   "--cache", str(cache)])
    assert rc == 0
    return {"root": root, "tree": tree, "run": root / "run", "cache": cache}


def test_unseen_indices_never_touch_the_kept_images():
    y = torch.tensor([0, 1, 0, 0, 1, 2, 1, 0, 2, 2, 1, 0])
    kept = keep_per_class(Images(torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8), y, ("a", "b", "c")), 2)
    idx = unseen.unseen_indices(y.numpy(), per_class=2, n=2)
    assert idx.tolist() == [3, 6, 7, 9, 10]  # images 3-4 of each class, as many as exist
    assert len(kept.y) == 6 and not set(idx) & {0, 1, 2, 4, 5, 8}


def test_copies_of_the_runs_images_are_passed_over(finished, tmp_path, capsys):
    """An image after the kept ones with the same pixels as a kept one is not unseen: skipped, the next taken."""
    tree = tmp_path / "digits"
    shutil.copytree(finished["tree"], tree)
    shutil.copy(tree / "0" / "00.png", tree / "0" / f"{PER_CLASS:02d}_copy.png")  # right after the kept images
    run = predict.load_run(finished["run"])
    before = unseen.load_unseen(run, *unseen.data_config(run, None), finished["cache"], 5)
    capsys.readouterr()
    after = unseen.load_unseen(run, *unseen.data_config(run, str(tree)), tmp_path / "cache", 5)
    assert "note: 1 image is a copy of images the run used (the same pixels); passed over" in capsys.readouterr().err
    assert torch.equal(after.x, before.x) and torch.equal(after.y, before.y)
    skip = np.zeros(12, dtype=bool)
    skip[[3, 6]] = True
    y = np.array([0, 1, 0, 0, 1, 2, 1, 0, 2, 2, 1, 0])
    assert unseen.unseen_indices(y, per_class=2, n=2, skip=skip).tolist() == [7, 9, 10, 11]


def test_scores_agree_with_predict_on_the_same_files(finished, tmp_path, capsys):
    rc = unseen.main([str(finished["run"]), "--images-per-class", "5", "--cache", str(finished["cache"])])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "on 15 unseen images the best combiner" in out
    for name in ("test_resnet", "test_efficientnet", "mean", "weighted"):
        assert f" {name} " in out

    # The same images as files 20-24 of each class, scored by predict with each combiner.
    run = predict.load_run(finished["run"])
    cfg, seed = unseen.data_config(run, None)
    images = unseen.load_unseen(run, cfg, seed, finished["cache"], 5)
    result = unseen.evaluate(run, images, torch.device("cpu"))
    subset = digits_tree(tmp_path / "subset", first=PER_CLASS, count=5)
    for method in ("mean", "weighted"):
        csv = tmp_path / f"{method}.csv"
        assert predict.main([str(finished["run"]), str(subset), "--method", method, "--out", str(csv),
                             "--quiet"]) == 0
        got = read_json(predict.metrics_path(csv))["metrics"]
        assert got["accuracy"] == pytest.approx(result["combiners"][method]["accuracy"])
        assert got["nll"] == pytest.approx(result["combiners"][method]["nll"], rel=1e-5)


def test_refuses_images_that_are_not_the_runs(finished, tmp_path, capsys):
    other = Path(shutil.copytree(finished["tree"], tmp_path / "other"))
    Image.new("L", (8, 8), 255).save(other / "1" / "03.png")  # one kept image differs
    rc = unseen.main([str(finished["run"]), "--path", str(other), "--cache", str(tmp_path / "cache")])
    assert rc == 2
    assert "are not the ones the run used" in capsys.readouterr().err


def test_a_run_from_before_the_test_set_left_the_fingerprint_is_scored(finished, tmp_path, capsys):
    """Runs written before 2026-11 record one fingerprint of training and test images together."""
    run = Path(shutil.copytree(finished["run"], tmp_path / "run"))
    info = read_json(run / "data.json")
    recipe = load_recipe(run / "recipe.toml")
    used = load_dataset(recipe.data, finished["cache"], recipe.seed, progress=False)
    assert info["fingerprint"] == used.fingerprint != used.legacy_fingerprint
    info["fingerprint"] = used.legacy_fingerprint
    del info["test_fingerprint"]
    (run / "data.json").write_text(json.dumps(info))
    rc = unseen.main([str(run), "--images-per-class", "5", "--cache", str(finished["cache"])])
    assert rc == 0 and "on 15 unseen images the best combiner" in capsys.readouterr().out


def test_refuses_a_run_without_a_per_class_subset(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished["run"], tmp_path / "run"))
    recipe = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(recipe.replace("per_class = 20", "per_class = 0"))
    assert unseen.main([str(run)]) == 2
    assert "only a folder-source run that kept the first data.per_class images" in capsys.readouterr().err


def test_moved_images_are_found_with_path(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished["run"], tmp_path / "run"))
    recipe = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(recipe.replace(str(finished["tree"]), str(tmp_path / "gone")))
    assert unseen.main([str(run), "--cache", str(finished["cache"])]) == 2
    assert "does not exist" in (err := capsys.readouterr().err) and "give the run's images with --path" in err
    moved = shutil.copytree(finished["tree"], tmp_path / "moved")
    rc = unseen.main([str(run), "--path", str(moved), "--images-per-class", "5", "--cache", str(finished["cache"])])
    assert rc == 0 and "on 15 unseen images the best combiner" in capsys.readouterr().out


def test_summary_picks_combiner_and_member_on_oof_rows_not_on_the_unseen_images():
    """The unseen images score the choice; choosing by their accuracy would select on them."""
    def entry(acc, nll=1.0):
        return {"accuracy": acc, "f1": acc, "nll": nll}

    def right(n_right):
        return np.arange(10) < n_right

    result = {"members": {"a": entry(0.70), "b": entry(0.60)},
              "combiners": {"mean": entry(0.65), "stacking": entry(0.90)},
              "right": {"members": {"a": right(7), "b": right(6)},
                        "combiners": {"mean": right(6) | (np.arange(10) == 9), "stacking": right(9)}}}
    recorded = {"members": {"a": {"oof": entry(0.50)}, "b": {"oof": entry(0.55)}},
                "combiners": {"mean": {"oof": entry(0.58)}, "stacking": {"oof": entry(0.58, nll=2.0)}}}
    *_, gain, paired = unseen.table(result, recorded, 10).splitlines()
    assert gain == ("on 10 unseen images the best combiner by nested OOF accuracy (mean) is +5.00 points "
                    "against the best member by OOF accuracy (b)")
    assert paired.startswith("paired standard error of that gain: ") and paired.endswith(
        " points (1 images only the combiner gets right, 0 only the member)")


def test_the_gain_comes_with_its_paired_standard_error():
    """Scored on the same images, only those the two disagree on make noise."""
    combiner = np.array([True] * 60 + [False] * 40)
    member = np.array([True] * 50 + [False] * 10 + [True] * 5 + [False] * 35)  # 10 only c, 5 only m
    gain, se, only_c, only_m = unseen.paired_gain(combiner, member)
    assert (only_c, only_m) == (10, 5) and gain == pytest.approx(5.0)
    assert se == pytest.approx(100 * np.sqrt(15 - 25 / 100) / 100)  # sqrt(b + c - (b - c)^2 / n) / n


# --------------------------------------------------------------------------- unfinished runs, channels, notes


def _no_decoding(monkeypatch):
    def decoded(*_, **__):
        raise AssertionError("the run's images were decoded before the cheap checks")

    monkeypatch.setattr(unseen, "load_unseen", decoded)


@pytest.mark.parametrize("remove", ["metrics.json", "members/test_efficientnet/fold1/done.json",
                                    "combiners/index.json"])
def test_an_unfinished_run_is_refused_before_any_image_is_decoded(remove, finished, tmp_path, capsys, monkeypatch):
    run = Path(shutil.copytree(finished["run"], tmp_path / "run"))
    (run / remove).unlink()
    _no_decoding(monkeypatch)
    assert unseen.main([str(run), "--cache", str(finished["cache"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"complete it with `{predict.fit_command(run)}`" in err


def test_a_grayscale_run_made_rgb_by_its_colour_test_images_scores_its_grayscale_source(finished, tmp_path, capsys):
    """fit makes both parts RGB when data.test_path is colour; the unseen images must be RGB too."""
    digits = load_digits()
    colour = tmp_path / "colour"
    for c in range(3):
        (colour / str(c)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == c][40:44]):
            a = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(np.stack([a, a // 2, 255 - a], -1), mode="RGB").save(colour / str(c) / f"{i}.png")
    recipe = (RECIPE.format(tree=finished["tree"])
              .replace("test_fraction = 0.25", f'test_fraction = 0\ntest_path = "{colour}"')
              .replace("epochs = 2", "epochs = 1")
              .replace('[[backbones]]\nname = "timm:test_efficientnet"\n', ""))
    (tmp_path / "gray.toml").write_text(recipe)
    rc = fit.main([str(tmp_path / "gray.toml"), "--out", str(tmp_path / "run"), "--quiet", "--no-report",
                   "--cache", str(finished["cache"])])
    assert rc == 0 and read_json(tmp_path / "run" / "data.json")["channels"] == 3
    rc = unseen.main([str(tmp_path / "run"), "--images-per-class", "5", "--cache", str(finished["cache"])])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "on 15 unseen images the best combiner" in captured.out


def test_a_run_whose_members_are_snapshots_scores_them_under_fits_names(finished, tmp_path, capsys):
    """With ensemble.members = "snapshots", fit's members are `alias@s1` .. `alias@sS`, not the alias."""
    recipe = (RECIPE.format(tree=finished["tree"])
              .replace("epochs = 2", "epochs = 2\nsnapshots = 2")
              .replace('[[backbones]]\nname = "timm:test_efficientnet"\n', "")
              .replace('combiners = ["mean", "weighted"]', 'combiners = ["mean"]\nmembers = "snapshots"'))
    (tmp_path / "snap.toml").write_text(recipe)
    rc = fit.main([str(tmp_path / "snap.toml"), "--out", str(tmp_path / "run"), "--quiet", "--no-report",
                   "--cache", str(finished["cache"])])
    assert rc == 0 and set(read_json(tmp_path / "run" / "metrics.json")["members"]) == {
        "test_resnet@s1", "test_resnet@s2"}
    rc = unseen.main([str(tmp_path / "run"), "--images-per-class", "5", "--cache", str(finished["cache"])])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert " test_resnet@s1 " in captured.out and " test_resnet@s2 " in captured.out


def test_a_note_names_the_classes_short_of_unseen_images(finished, tmp_path, capsys):
    tree = Path(shutil.copytree(finished["tree"], tmp_path / "tree"))
    for i in range(PER_CLASS, PER_CLASS + EXTRA):  # class 2 keeps only the run's own 20 images
        (tree / "2" / f"{i:02d}.png").unlink()
    rc = unseen.main([str(finished["run"]), "--path", str(tree), "--images-per-class", "12",
                      "--cache", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert notes == [("note: 1 of 3 classes have no unseen images: 2; 2 have fewer than 12: 0 (10), 1 (10): "
                      "the unseen accuracies weigh the classes unlike the run's test part")]
    assert "on 20 unseen images" in captured.out


def test_predicting_shows_progress_unless_quiet(finished, capsys):
    argv = [str(finished["run"]), "--images-per-class", "2", "--cache", str(finished["cache"])]
    assert unseen.main(argv) == 0
    err = capsys.readouterr().err
    assert "predicting test_resnet (1/2): 2 fold models" in err and "predicting test_efficientnet (2/2)" in err
    assert "predicting: 100%" in err  # predict's own bar
    assert unseen.main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_unseen_ctrl_c_is_one_line(finished, capsys, monkeypatch):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(unseen, "evaluate", interrupted)
    assert unseen.main([str(finished["run"]), "--images-per-class", "2", "--cache", str(finished["cache"]),
                        "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
