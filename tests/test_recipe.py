"""Recipe loading, overrides, round-trip, and the table of bad recipes (exit status 2, one line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble import fit, recipe

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits_5fold.toml"

BAD_OVERRIDES = [
    (["foo=1"], "digits_5fold.toml: foo is not a known key"),
    (["train.lrr=0.1"], "train.lrr is not a known key; did you mean 'lr'?"),
    (["train.epochs='ten'"], "train.epochs must be an integer, got 'ten'"),
    (["train.lr=-0.1"], "digits_5fold.toml: train.lr must be > 0, got -0.1"),
    (["train.optimizer='adam'"], "train.optimizer must be one of sgd | adamw, got 'adam'"),
    (["train.device='gpu'"], "train.device must be auto | cpu | cuda | cuda:N, got 'gpu'"),
    (["train.device='cuda:01'"], "train.device must be auto | cpu | cuda | cuda:N, got 'cuda:01'"),
    (["train.device='cuda:128'"], "train.device must be auto | cpu | cuda | cuda:N, got 'cuda:128'"),
    (["data.source='imagenet'"], "data.source must be one of digits | cifar10"),
    (["data.test_fraction=1.5"], "data.test_fraction must be in [0, 1), got 1.5"),
    (["data.source='folder'", "data.path='no/such/dir'"], "data.path does not exist: 'no/such/dir'"),
    (["data.source='folder'"], "data.path is required when data.source = 'folder'"),
    (["cv.folds=1"], "cv.folds must be >= 2, got 1"),
    (["data.per_class=3", "data.test_fraction=0.0"], "cv.folds = 5 needs at least that many training images per class, but class '0' has 3"),
    (["backbones.0.name='timm:resnet181'"], "backbones[0].name names no timm model: 'timm:resnet181'; close matches"),
    (["backbones.0.name='resnet18'"], "backbones[0].name must be timm:<model> | torchvision:<model>"),
    (["backbones.1.lr=0"], "backbones[1].lr must be > 0, got 0"),
    (["backbones.0.augment=['flip','blur']"], "backbones[0].augment[1] must be one of"),
    (["train.augment=['flip','blur']"], "digits_5fold.toml: train.augment[1] must be one of"),
    (["backbones.2.snapshot=2"], "backbones[2].snapshot is not a known key; did you mean 'snapshots'?"),
    (["backbones.0.zzz=1"], "backbones[0].zzz is not a known key; valid keys: name, alias, stem, pretrained, "
                            "model_args, or any [train] key"),
    (["backbones.0.pretrained='/no/such.pt'"],
     "backbones[0] (timm:test_resnet) cannot be built: pretrained weights file not found: '/no/such.pt'"),
    (["backbones.1.model_args={bogus_arg=1}"], "backbones[1] (timm:test_efficientnet) cannot be built: TypeError"),
    (["backbones.2.snapshots=3"], "backbones[2].snapshots = 3 must divide epochs = 16"),
    (["train.snapshots=3"], "digits_5fold.toml: train.snapshots = 3 must divide epochs = 16"),
    (["backbones.1.alias='test_resnet'"], "backbones[1].alias 'test_resnet' is already used by backbones[0]"),
    # members/Test_ResNet and members/test_resnet are one folder on macOS and Windows
    (["backbones.1.alias='Test_ResNet'"],
     "backbones[1].alias 'Test_ResNet' is already used by backbones[0] (letter case aside)"),
    (["backbones.0.name='timm:hf-hub:timm/resnet18.a1_in1k'"],
     "backbones[0].name 'timm:hf-hub:timm/resnet18.a1_in1k' makes the alias 'hf-hub:timm_resnet18.a1_in1k', which "
     "is no run folder name: set backbones[0].alias, which must be 1 to 100 letters"),
    # a list item's error names the item; a list of bare words says how to quote them
    (["ensemble.combiners=[1]"], "ensemble.combiners[0] must be a string, got 1"),
    (["ensemble.combiners=[mean, vote]"], "--set 'ensemble.combiners=[mean, vote]': the value is no TOML list or "
                                          "table; quote the text in it, e.g. --set \"ensemble.combiners=['mean', 'vote']\""),
    (["backbones.0.augment=flip"], """backbones[0].augment must be a list, got 'flip'; write ["flip"] (with --set: """
                                   """--set "backbones.0.augment=['flip']")"""),
    (["ensemble.combiners=['vote','stack']"], "ensemble.combiners[1] must be one of"),
    (["ensemble.meta_learner='svm'"],
     "ensemble.meta_learner must be one of logistic | random_forest | extra_trees | gradient_boosting | knn, got 'svm'"),
    (["ensemble.meta_params={C=-1.0}"], "The 'C' parameter of LogisticRegression must be a float in the range"),
    (["ensemble.meta_params={class_weight={cat=2.0}}"],  # refused by LogisticRegression.fit only
     "ensemble combiner 'stacking' cannot be fitted: The classes, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], are not in class_weight"),
    (["ensemble.meta_params={C=inf}"], "stacking: meta_params C = inf cannot be saved"),
    (["ensemble.meta_learner='knn'", "ensemble.meta_params={n_neighbors=5000}"],
     "combiner 'stacking' cannot be fitted: stacking: meta_params n_neighbors = 5000 is more than the 1149 rows"),
    (["ensemble.combiners=[]"], "ensemble.combiners must be a non-empty list"),
    (["data.path='digits_tree'"], "data.path is read only when data.source = 'folder' (source is 'digits')"),
    (["seed=-1"], "digits_5fold.toml: seed must be in [0, 2**32 - 1], got -1"),
    (["data.source='folder'", "data.path=2024"], '''data.path must be a string, got 2024; with --set, quote it: --set 'data.path="2024"'''),
    (["backbones.0.name='timm:vit_tiny_patch16_224'"],
     "backbones[0] (timm:vit_tiny_patch16_224) cannot train on 16x16 images in batches of 64: AssertionError: "
     "Input height (16) doesn't match model (224)"),
    (["train.batch_size=1"], "backbones[0] (timm:test_resnet) cannot train on 16x16 images in batches of 1: "
                             "ValueError: Expected more than 1 value per channel when training"),
    (["train.lr=inf"], "digits_5fold.toml: train.lr must be a finite number, got inf"),
    (["seed.x=1"], "--set seed.x: seed is a value (0), not a table; set it with --set seed=..."),
    (["backbones.1.alias='..'"], "backbones[1].alias must be 1 to 100 letters, digits, '_', '-', '.', with a letter "
                                 "or digit among them, got '..'"),
    (["backbones.1.alias='" + "b" * 101 + "'"], "backbones[1].alias must be 1 to 100 letters"),
    (["data.source='folder'", "data.path='/tmp/caf\udce9'"],
     "data.path is not UTF-8 text (a file name in another encoding?), got '/tmp/caf\\udce9'"),
    (["ensemble.meta_params={C=1979-05-27}"],
     "ensemble.meta_params may hold numbers, UTF-8 text, true/false, lists and tables; got datetime.date(1979, 5, 27)"),
    (["backbones.3.lr=0.1"], "--set backbones.3.lr: no list item '3' (there are 3)"),
    (["backbones.0.augment.0='flip'"], "--set backbones.0.augment.0: backbones.0.augment is not written in the recipe"),
    (["ensemble.members='all'"], "ensemble.members must be one of final | snapshots, got 'all'"),
    (["backbones=[]"], "backbones must be a non-empty list"),
    (["ensemble.combiners=['mean','mean']"], "ensemble.combiners must be a non-empty list, each combiner once, got ('mean', 'mean')"),
    (["train.epochs"], "--set expects key=value, got 'train.epochs'"),
    # the quoting hint spells the value as it was typed, in TOML
    (["data.source='folder'", "data.path=true"], """data.path must be a string, got True; with --set, quote it: --set 'data.path="true"'"""),
    (["name=2024-01-01"], """name must be a string, got datetime.date(2024, 1, 1); with --set, quote it: --set 'name="2024-01-01"'"""),
    (["train.lr=.05"], "train.lr must be a number, got '.05'; TOML does not read '.05' as a number: write 0.05"),
    (["train.epochs=010"], "train.epochs must be an integer, got '010'; TOML does not read '010' as a number: write 10"),
    ([".train.epochs=1"], "--set '.train.epochs=1': the key '.train.epochs' has an empty part"),
    (["backbones.0.train.lr=0.1"], "backbones[0].train is not a known key; [train] keys go on the backbone itself, e.g. backbones[0].lr"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_recipe_exits_2_with_one_line(overrides, message, capsys, tmp_path):
    args = [str(DIGITS), "--out", str(tmp_path / "run"), "--quiet", "--cache", str(tmp_path / "cache")]
    for o in overrides:
        args += ["--set", o]
    assert fit.main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert not (tmp_path / "run").exists()  # every check comes before the first write


@pytest.mark.parametrize(
    "text, message",
    [
        ("name = 'x'\n[train\n", "x.toml: not valid TOML"),
        ("name = 'x'\nseed = 0\n", "x.toml: backbones must be a non-empty list"),
        ("seed = 0\n[[backbones]]\nname = 'timm:test_resnet'\n", "x.toml: name is required"),
        ("name = 'a b'\n[[backbones]]\nname = 'timm:test_resnet'\n", "x.toml: name must be 1 to 100 letters"),
        ("name = '.'\n[[backbones]]\nname = 'timm:test_resnet'\n", "x.toml: name must be 1 to 100 letters"),
        ("name = 'x'\n[[backbones]]\nname = 'timm:test_resnet'\nstem = 'tiny'\n", "backbones[0].stem must be one of"),
    ],
)
def test_bad_recipe_files(text, message, tmp_path, capsys):
    path = tmp_path / "x.toml"
    path.write_text(text)
    assert fit.main([str(path), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_missing_recipe_file(tmp_path, capsys):
    assert fit.main([str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such recipe file" in capsys.readouterr().err
    assert fit.main([str(tmp_path)]) == 2
    assert "is a folder; give a recipe file" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--out", "FILE"], "--out FILE is a file; give a folder"),
    (["--cache", "FILE"], "--cache FILE is a file; give a folder"),
    (["--scheduler", "tcp://x:1"], "--scheduler names a Dask scheduler: add --backend dask"),
    (["--address", "x:1", "--backend", "dask"], "--address names a Ray cluster: add --backend ray"),
])
def test_bad_flags_exit_2(flags, message, tmp_path, capsys):
    file = tmp_path / "file.csv"
    file.write_text("x")
    flags = [str(file) if f == "FILE" else f for f in flags]
    with pytest.raises(SystemExit) as info:
        fit.main([str(DIGITS), *flags])
    assert info.value.code == 2
    assert message.replace("FILE", str(file)) in capsys.readouterr().err


def test_out_holding_another_run_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.toml").write_text('name = "cifar10_cpu"\n')
    assert fit.main([str(DIGITS), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "holds the run 'cifar10_cpu', not 'digits_5fold'" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.toml"]


def test_out_holding_other_files_is_refused_and_left_alone(tmp_path, capsys):
    """fit removes an old run's metrics.json, report/ and combiners/: never a folder that holds no run."""
    folder = tmp_path / "thesis"
    (folder / "report").mkdir(parents=True)
    (folder / "report" / "chapter1.txt").write_text("mine")
    (folder / "metrics.json").write_text("{}")
    assert fit.main([str(DIGITS), "--out", str(folder), "--quiet"]) == 2
    assert f"--out {folder} is not empty (metrics.json, report) and holds no run" in capsys.readouterr().err
    assert (folder / "report" / "chapter1.txt").read_text() == "mine" and (folder / "metrics.json").read_text() == "{}"


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "data.tar.gz").write_bytes(b"x")
    assert fit.main([str(DIGITS), "--out", str(tmp_path / "data.tar.gz" / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data.tar.gz'} is a file, not a folder" in err and err.count("\n") == 1


def test_out_inside_the_training_images_is_refused(tmp_path, capsys):
    """The run's own files (report PNGs, a class folder per member) would be read as images next time."""
    (tmp_path / "images" / "cat").mkdir(parents=True)
    args = [str(DIGITS), "--set", "data.source='folder'", "--set", f"data.path='{tmp_path / 'images'}'",
            "--out", str(tmp_path / "images" / "run"), "--quiet"]
    assert fit.main(args) == 2
    assert "is inside data.path" in capsys.readouterr().err
    assert not (tmp_path / "images" / "run").exists()


def test_a_cache_inside_the_training_images_is_refused(tmp_path, capsys):
    """Its decoded arrays would make a class folder of their own on the next run."""
    (tmp_path / "images" / "cat").mkdir(parents=True)
    args = [str(DIGITS), "--set", "data.source='folder'", "--set", f"data.path='{tmp_path / 'images'}'",
            "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "images" / "cache"), "--quiet"]
    assert fit.main(args) == 2
    assert f"the decoded-image cache {tmp_path / 'images' / 'cache'} is inside data.path" in capsys.readouterr().err
    assert not (tmp_path / "images" / "cache").exists()


def test_the_recipe_names_every_meta_learner_the_combiners_know():
    from ensemble import combiners

    assert recipe.META_LEARNERS == tuple(combiners.META_LEARNERS)


def test_a_list_item_can_be_set_by_index():
    r = recipe.load(DIGITS, ["train.augment.0='flip'"])
    assert r.train.augment == ("flip",)


def test_overrides_and_backbone_inheritance():
    r = recipe.load(DIGITS, ["train.epochs=4", "cv.folds=3", "backbones.0.lr=0.2"])
    assert r.cv.folds == 3
    assert [b.train.epochs for b in r.backbones] == [4, 4, 4]
    assert r.backbones[0].train.lr == 0.2
    assert r.backbones[1].train.optimizer == "adamw"  # its own override survives
    assert r.backbones[0].alias == "test_resnet"
    assert r.backbones[2].alias == "test_byobnet_snap"


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe.load(DIGITS, ["train.epochs=4"])
    path = tmp_path / "resolved.toml"
    path.write_text(recipe.dumps(r))
    again = recipe.load(path)
    assert again == r


def test_a_backbone_value_equal_to_trains_stays_pinned_in_the_written_recipe(tmp_path):
    """backbones.0.lr = train.lr in the recipe: a --set train.lr on the run's recipe.toml must leave
    backbone 0 alone, as it does on the recipe file itself."""
    r = recipe.load(DIGITS, ["backbones.0.lr=0.05"])
    assert r.backbones[0].train.lr == r.train.lr == 0.05
    path = tmp_path / "resolved.toml"
    path.write_text(recipe.dumps(r))
    assert recipe.load(path) == r
    assert recipe.load(path, ["train.lr=0.1"]).backbones[0].train.lr == 0.05
    assert recipe.load(DIGITS, ["backbones.0.lr=0.05", "train.lr=0.1"]).backbones[0].train.lr == 0.05


def test_odd_keys_and_text_round_trip(tmp_path):
    """Keys that are not bare TOML keys, and text with quotes, newlines and DEL, read back as written."""
    r = recipe.load(DIGITS, ["""ensemble.meta_params={"a b"=1, "café"=2, ""=3, "x.y"={"z"="q\\"\\n\\u007f"}}"""])
    assert r.ensemble.meta_params == {"a b": 1, "café": 2, "": 3, "x.y": {"z": 'q"\n\x7f'}}
    path = tmp_path / "resolved.toml"
    path.write_text(recipe.dumps(r), encoding="utf-8")
    assert recipe.load(path) == r


def test_timm_names_with_a_pretrained_tag_are_models():
    r = recipe.load(DIGITS, ["backbones.0.name='timm:resnet18.a1_in1k'"])
    recipe.check_backbone_names(r)  # no BackboneError: the tag names weights of timm:resnet18


def test_pretrained_weights_load_but_the_head_and_another_architectures_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ensemble import backbones

    def saved(name: str) -> tuple[dict, str]:
        state = {k: v.contiguous() for k, v in backbones.create(name, num_classes=5).state_dict().items()}
        save_file(state, tmp_path / f"{name[5:]}.safetensors")
        return state, str(tmp_path / f"{name[5:]}.safetensors")

    state, path = saved("timm:test_resnet")
    got = backbones.create("timm:test_resnet", num_classes=10, pretrained=path).state_dict()
    same = [k for k, v in state.items() if got[k].shape == v.shape]
    assert len(same) == len(state) - 2 and all(torch.equal(got[k], state[k]) for k in same)  # all but the head
    _, other = saved("timm:test_efficientnet")
    with pytest.raises(backbones.BackboneError, match=r"are not ResNet's: \d+ tensors missing \(e\.g\. 'conv1"):
        backbones.create("timm:test_resnet", num_classes=10, pretrained=other)
    _, resnet18 = saved("timm:resnet18")  # the same family at another depth: 60 of resnet34's 110 tensors
    with pytest.raises(backbones.BackboneError, match=r"are not ResNet's: \d+ tensors missing \(e\.g\. 'layer1\.2"):
        backbones.create("timm:resnet34", num_classes=10, pretrained=resnet18)
    gray = backbones.create("timm:test_resnet", num_classes=10, in_chans=1, pretrained=path).state_dict()
    stem = next(k for k, v in state.items() if v.ndim == 4)  # RGB kernels summed, as timm adapts them
    assert torch.allclose(gray[stem], state[stem].sum(dim=1, keepdim=True))
    (tmp_path / "notes.pt").write_text('{"not": "weights"}')
    with pytest.raises(backbones.BackboneError) as info:  # torch's own text would suggest unpickling it
        backbones.create("timm:test_resnet", num_classes=10, pretrained=str(tmp_path / "notes.pt"))
    assert str(info.value).endswith("not a safetensors file nor a weights-only torch state dict; it is never unpickled")


def test_a_pretrained_file_counts_in_the_job_key_by_its_content(tmp_path):
    import dataclasses

    from ensemble import jobs

    first = recipe.load(DIGITS).backbones[0]
    (tmp_path / "a.pt").write_bytes(b"weights")
    (tmp_path / "moved.pt").write_bytes(b"weights")

    def key(name: str) -> dict:
        return jobs._shaping(dataclasses.replace(first, pretrained=str(tmp_path / name)))

    assert key("a.pt") == key("moved.pt")  # the same weights elsewhere: cached jobs stay valid
    (tmp_path / "a.pt").write_bytes(b"other weights")
    assert key("a.pt") != key("moved.pt")  # replaced in place: its jobs retrain


def test_the_readme_recipe_block_is_a_valid_recipe_of_defaults(tmp_path):
    """The README's annotated recipe loads as it stands, and it shows each default value."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```toml\n") + len("```toml\n")
    (tmp_path / "readme.toml").write_text(text[start:text.index("```", start)])
    shown = recipe.load(tmp_path / "readme.toml")
    assert shown.name == "digits_5fold" and shown.backbones[0].name == "timm:resnet18"
    assert (shown.data, shown.cv, shown.train, shown.ensemble) == (
        recipe.DataConfig(), recipe.CVConfig(), recipe.TrainConfig(), recipe.EnsembleConfig())


def test_recipe_is_frozen():
    r = recipe.load(DIGITS)
    with pytest.raises(AttributeError):
        r.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_build_every_backbone(path, tmp_path):
    """Every recipe in recipes/ validates and each backbone (stem, model_args) runs a 32x32 batch."""
    import torch

    from ensemble import backbones

    r = recipe.load(path, [f"data.path='{tmp_path}'"] if 'source = "folder"' in path.read_text() else [])
    assert r.backbones and len({b.alias for b in r.backbones}) == len(r.backbones)
    recipe.check_backbone_names(r)
    for b in r.backbones:
        model = backbones.create(b.name, num_classes=10, stem=b.stem, model_args=b.model_args).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10), b.alias


def test_plain_text_starting_with_a_bracket_is_still_text():
    assert recipe.parse_override("data.path=[2024] photos/train") == (["data", "path"], "[2024] photos/train")


def test_the_quoting_hint_survives_the_shell_when_the_value_holds_double_quotes():
    import shlex
    import tomllib

    with pytest.raises(recipe.RecipeError) as caught:
        recipe.parse_override('train.augment=["flip", crop]')
    hint = str(caught.value).split("e.g. ", 1)[1]
    (arg,) = shlex.split(hint.removeprefix("--set "))  # as the shell hands it to fit
    key, value = arg.split("=", 1)
    assert key == "train.augment" and tomllib.loads(f"v = {value}")["v"] == ["flip", "crop"]
