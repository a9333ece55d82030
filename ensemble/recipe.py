"""The recipe: a TOML file loaded into frozen, fully validated dataclasses.

Layering follows timm's train.py: the file, then ``--set key=value`` overrides,
then the resolved recipe is saved in the run folder (``recipe.toml``). Every
user mistake raises :class:`RecipeError` with one line naming the file and the
dotted key: ``digits_5fold.toml: train.lr must be > 0, got -0.1``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import math
import os
import re
import shlex
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import is_utf8

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeError(ValueError):
    """A recipe that cannot be run; the message is one line, ready to print."""


SOURCES = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "folder")
META_LEARNERS = ("logistic", "random_forest", "extra_trees", "gradient_boosting", "knn")  # combiners.META_LEARNERS


def is_device(name: str) -> bool:
    """Whether ``name`` is a device fit and predict take: auto, cpu, cuda or cuda:N."""
    return re.fullmatch(r"auto|cpu|cuda(:(0|[1-9]\d?|1[01]\d|12[0-7]))?", name) is not None  # torch: index <= 127


NAME_RULE = "must be 1 to 100 letters, digits, '_', '-', '.', with a letter or digit among them"


def is_name(text: str) -> bool:
    """Whether ``text`` can name a run or a backbone (``alias``): it becomes a folder name, so
    ``.`` and ``..`` are not names, and a long one would not fit the report's file names."""
    return len(text) <= 100 and re.fullmatch(r"[A-Za-z0-9_.\-]*[A-Za-z0-9][A-Za-z0-9_.\-]*", text) is not None


def _check(test, expected: str) -> dict:
    """Field metadata: ``test(value)`` must hold; ``expected`` says what was expected."""
    return {"check": test, "expected": expected}


def _choice(*options) -> dict:
    return _check(lambda v: v in options, "one of " + " | ".join(map(str, options)))


_positive = _check(lambda v: v > 0, "> 0")
_non_negative = _check(lambda v: v >= 0, ">= 0")
_fraction = _check(lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="digits", metadata=_choice(*SOURCES))
    root: str = "data"  # download/cache folder of torchvision sources
    path: str = ""  # source = "folder": an ImageFolder tree, or a .tar/.tar.gz of one
    test_path: str = ""  # optional separate test set, same layout
    test_fraction: float = field(default=0.0, metadata=_fraction)
    per_class: int = field(default=0, metadata=_non_negative)
    image_size: int = field(default=32, metadata=_check(lambda v: 4 <= v <= 1024, "in [4, 1024]"))
    download: bool = True


@dataclass(frozen=True)
class CVConfig:
    folds: int = field(default=5, metadata=_check(lambda v: v >= 2, ">= 2"))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=10, metadata=_check(lambda v: v >= 1, ">= 1"))
    batch_size: int = field(default=128, metadata=_check(lambda v: v >= 1, ">= 1"))
    optimizer: str = field(default="sgd", metadata=_choice("sgd", "adamw"))
    lr: float = field(default=0.1, metadata=_positive)
    momentum: float = field(default=0.9, metadata=_fraction)
    weight_decay: float = field(default=5e-4, metadata=_non_negative)
    label_smoothing: float = field(default=0.1, metadata=_fraction)
    schedule: str = field(default="onecycle", metadata=_choice("onecycle", "cosine"))
    warmup: float = field(default=0.1, metadata=_fraction)  # share of the steps spent warming up
    augment: tuple[str, ...] = ("flip", "crop")
    snapshots: int = field(default=0, metadata=_check(lambda v: v == 0 or v >= 2, "0 or >= 2"))
    device: str = field(
        default="auto",
        metadata=_check(is_device, "auto | cpu | cuda | cuda:N"),
    )
    channels_last: bool = True
    compile: bool = False


# Keys of [train] that change speed, not results: a changed value never retrains a job.
PERFORMANCE_KEYS = ("device", "channels_last", "compile")


@dataclass(frozen=True)
class BackboneConfig:
    name: str  # timm:<name> | torchvision:<name>
    alias: str = ""  # member name; derived from `name` when empty
    stem: str = field(default="default", metadata=_choice("default", "cifar"))
    pretrained: str = ""  # "" or a local weights file (never a hub download)
    model_args: dict = field(default_factory=dict)  # extra constructor kwargs, e.g. { drop_rate = 0.1 }
    train: TrainConfig = TrainConfig()  # [train] with this backbone's overrides applied
    # the [train] keys the recipe sets on this backbone: recipe.toml keeps them even where they equal
    # [train]'s, so that --set train.<key> on a run's recipe.toml leaves them alone, as on the recipe file
    own: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})


@dataclass(frozen=True)
class WeightedConfig:
    method: str = field(default="greedy", metadata=_choice("greedy", "logloss"))
    rounds: int = field(default=25, metadata=_check(lambda v: v >= 1, ">= 1"))


@dataclass(frozen=True)
class EnsembleConfig:
    combiners: tuple[str, ...] = field(default=("vote", "mean", "weighted", "stacking"),
                                       metadata=_check(lambda v: 0 < len(v) == len(set(v)),
                                                       "a non-empty list, each combiner once"))
    members: str = field(default="final", metadata=_choice("final", "snapshots"))
    calibrate: bool = False
    weighted: WeightedConfig = WeightedConfig()
    meta_learner: str = field(default="logistic", metadata=_choice(*META_LEARNERS))
    meta_params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int = field(default=0, metadata=_check(lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"))
    data: DataConfig = DataConfig()
    cv: CVConfig = CVConfig()
    train: TrainConfig = TrainConfig()
    backbones: tuple[BackboneConfig, ...] = ()
    ensemble: EnsembleConfig = EnsembleConfig()
    source_file: str = field(default="", compare=False)  # where it was read from (for messages)

    def error(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{Path(self.source_file).name or 'recipe'}: {key} {message}")


# --------------------------------------------------------------------------- building


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}.get(
        tp, "a list" if typing.get_origin(tp) is tuple else getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp, key: str, fail_for) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form. ``fail_for(key)``
    makes the error for a key (a list item's is ``key[i]``)."""
    fail = fail_for(key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            dotted = re.sub(r"\[(\d+)\]", r".\1", key)
            hint = f"""; write ["{value}"] (with --set: --set "{dotted}=['{value}']")""" if isinstance(value, str) else ""
            raise fail(f"must be a list, got {value!r}{hint}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]", fail_for) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise fail(f"must be a table, got {value!r}")
        _check_plain(value, fail)
        return dict(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise fail(f"must be {_type_name(tp)}, got {value!r}{_spelling_hint(value, tp, key)}")
    if tp is float and not math.isfinite(value):
        raise fail(f"must be a finite number, got {value!r}")
    if tp is str and not is_utf8(value):
        raise fail(f"is not UTF-8 text (a file name in another encoding?), got {value!r}; rename it, or "
                   "give a link to it whose name is UTF-8")
    return value


def _check_plain(value: Any, fail) -> None:
    """A table's values must be what a run's recipe.toml can write back: numbers, text,
    true/false, and lists and tables of them (no TOML dates or times)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not is_utf8(k):
                raise fail(f"has a key that is not UTF-8 text: {k!r}")
            _check_plain(v, fail)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_plain(v, fail)
    elif not isinstance(value, bool | int | float | str) or isinstance(value, str) and not is_utf8(value):
        raise fail(f"may hold numbers, UTF-8 text, true/false, lists and tables; got {value!r}")


def _spelling_hint(value: Any, tp: type, key: str) -> str:
    """How to write ``value`` as a ``tp`` where TOML read it as another type (``--set data.path=2024``
    is a number, ``--set name=2024-01-01`` a date, ``--set train.lr=.05`` text)."""
    if tp is str and isinstance(value, bool | int | float | dt.date | dt.time):
        text = str(value).lower() if isinstance(value, bool) else \
            value.isoformat() if isinstance(value, dt.date | dt.time) else str(value)
        dotted = re.sub(r"\[(\d+)\]", r".\1", key)
        return f"""; with --set, quote it: --set '{dotted}="{text}"'"""
    if tp in (int, float) and isinstance(value, str):
        try:
            number = tp(value.strip())
        except ValueError:
            return ""
        return f"; TOML does not read {value!r} as a number: write {number!r}"
    return ""


def _build(cls, table: Any, prefix: str, where: str, extra: dict | None = None):
    """Build dataclass ``cls`` from a TOML table; unknown keys, bad types and ranges are errors."""

    def fail(key: str):
        return lambda msg: RecipeError(f"{where}: {key} {msg}")

    if not isinstance(table, dict):
        raise fail(prefix.rstrip("."))(f"must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source_file" and not f.metadata.get("internal")]
    unknown = [k for k in table if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
        raise fail(prefix + unknown[0])(f"is not a known key{hint}")
    values = dict(extra or {})
    for f in dataclasses.fields(cls):
        if f.name not in table:
            continue
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, table[f.name], key + ".", where)
            continue
        value = _convert(table[f.name], tp, key, fail)
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise fail(key)(f"must be {f.metadata['expected']}, got {value!r}")
        values[f.name] = value
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        missing = re.findall(r"'(\w+)'", str(exc))
        raise fail(prefix + (missing[0] if missing else ""))("is required") from None


def backbone_dict(b: BackboneConfig) -> dict:
    """A backbone's settings as a dict, without the recipe's internal bookkeeping (``own``)."""
    d = dataclasses.asdict(b)
    for f in dataclasses.fields(b):
        if f.metadata.get("internal"):
            del d[f.name]
    return d


def _derive_alias(name: str) -> str:
    return name.split(":", 1)[-1].replace("/", "_")


def _build_backbones(items: Any, train: TrainConfig, where: str) -> tuple[BackboneConfig, ...]:
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}: backbones must be a non-empty list of [[backbones]] tables, got {items!r}")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    result, seen = [], {}
    for i, item in enumerate(items):
        prefix = f"backbones[{i}]."
        if not isinstance(item, dict):
            raise RecipeError(f"{where}: backbones[{i}] must be a table, got {item!r}")
        own_keys = [f.name for f in dataclasses.fields(BackboneConfig)
                    if f.name != "train" and not f.metadata.get("internal")]
        unknown = [k for k in item if k not in train_keys and k not in own_keys]
        if unknown:
            close = difflib.get_close_matches(unknown[0], own_keys + sorted(train_keys), n=1)
            hint = (f"[train] keys go on the backbone itself, e.g. {prefix}lr" if unknown[0] == "train"
                    else f"did you mean '{close[0]}'?" if close
                    else f"valid keys: {', '.join(own_keys)}, or any [train] key")
            raise RecipeError(f"{where}: {prefix}{unknown[0]} is not a known key; {hint}")
        overrides = {k: v for k, v in item.items() if k in train_keys}
        rest = {k: v for k, v in item.items() if k not in train_keys}
        base = dataclasses.asdict(train)
        merged = _build(TrainConfig, {**base, **overrides}, prefix, where)
        b = _build(BackboneConfig, rest, prefix, where, extra={"train": merged})
        alias = b.alias or _derive_alias(b.name)
        if not is_name(alias):
            if b.alias:
                raise RecipeError(f"{where}: {prefix}alias {NAME_RULE}, got {alias!r}")
            raise RecipeError(f"{where}: {prefix}name {b.name!r} makes the alias {alias!r}, which is no run "
                              f"folder name: set {prefix}alias, which {NAME_RULE}")
        if alias.casefold() in seen:  # members/A and members/a are one folder on macOS and Windows
            raise RecipeError(
                f"{where}: {prefix}alias {alias!r} is already used by backbones[{seen[alias.casefold()]}]"
                f"{'' if alias in [r.alias for r in result] else ' (letter case aside)'}; "
                "set a distinct `alias` for one of them"
            )
        seen[alias.casefold()] = i
        result.append(dataclasses.replace(b, alias=alias, own=tuple(sorted(overrides))))
    return tuple(result)


def _check_cross_fields(r: Recipe, where: str) -> None:
    for i, b in enumerate(r.backbones):
        t = b.train
        if t.snapshots and t.epochs % t.snapshots:
            inherited = (t.snapshots, t.epochs) == (r.train.snapshots, r.train.epochs)
            key = "train" if inherited else f"backbones[{i}]"
            raise RecipeError(
                f"{where}: {key}.snapshots = {t.snapshots} must divide epochs = {t.epochs} "
                "(each snapshot is kept at the end of an epoch)"
            )
    if r.data.source == "folder" and not r.data.path:
        raise RecipeError(f"{where}: data.path is required when data.source = 'folder'")
    if r.data.source != "folder" and r.data.path:
        raise RecipeError(f"{where}: data.path is read only when data.source = 'folder' (source is "
                          f"{r.data.source!r}); add data.source = 'folder' to train on {r.data.path!r}")
    if r.ensemble.members == "snapshots" and not any(b.train.snapshots for b in r.backbones):
        raise RecipeError(f"{where}: ensemble.members = 'snapshots' needs a backbone with train.snapshots >= 2")


def from_dict(table: dict, where: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from a parsed TOML table."""
    table = dict(table)
    backbones = table.pop("backbones", None)
    recipe = _build(Recipe, table, "", where)
    recipe = dataclasses.replace(
        recipe, backbones=_build_backbones(backbones, recipe.train, where), source_file=where
    )
    if not is_name(recipe.name):
        raise RecipeError(f"{where}: name {NAME_RULE}, got {recipe.name!r}")
    _check_cross_fields(recipe, where)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.05"`` -> (["train", "lr"], 0.05); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise RecipeError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not all(part.strip() for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: the key {key.strip()!r} has an empty part; e.g. --set train.epochs=10")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if raw.strip()[:1] + raw.strip()[-1:] in ("[]", "{}"):  # meant as a list or table: quote its text
            quoted = re.sub(r"(?<!['\"\w])([A-Za-z_][\w.+:/-]*)(?!['\"\w])(?!\s*=)", r"'\1'", raw.strip())
            try:
                tomllib.loads(f"v = {quoted}")
                arg = f"{key.strip()}={quoted}"
                example = f'--set "{arg}"' if '"' not in arg else f"--set {shlex.quote(arg)}"
            except tomllib.TOMLDecodeError:
                example = '''--set "ensemble.combiners=['mean', 'stacking']"'''
            raise RecipeError(f"--set {text!r}: the value is no TOML list or table; quote the text in it, "
                              f"e.g. {example}") from None
        value = raw
    return key.strip().split("."), value


def apply_override(table: dict, path: list[str], value: Any) -> None:
    """Set ``value`` at a dotted path; ``backbones.1.epochs`` addresses the second backbone."""
    key = ".".join(path)
    node: Any = table
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                how = "" if part.isdigit() else "; address a list item by index, e.g. backbones.0.epochs"
                raise RecipeError(f"--set {key}: no list item {part!r} (there are {len(node)}){how}")
            part = int(part)
        elif not isinstance(node, dict):
            where = ".".join(path[:i])
            raise RecipeError(f"--set {key}: {where} is a value ({node!r}), not a table; set it with "
                              f"--set {where}=...")
        if last:
            node[part] = value
        elif isinstance(node, list):
            node = node[part]
        elif part not in node and path[i + 1].isdigit():
            where = ".".join(path[: i + 1])
            raise RecipeError(f"--set {key}: {where} is not written in the recipe (it inherits or defaults), so "
                              f"it has no item to address; set the whole list: --set {where}=[...]")
        else:
            node = node.setdefault(part, {})


def load(path: str | Path, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    where = path.name
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such recipe file: {str(path)!r}") from None
    except IsADirectoryError:
        raise RecipeError(f"{where}: is a folder; give a recipe file, e.g. recipes/digits_5fold.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{where}: cannot read the recipe file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: not valid TOML: {exc}") from None
    for text in overrides:
        apply_override(table, *parse_override(text))
    recipe = from_dict(table, where)
    return dataclasses.replace(recipe, source_file=str(path))


def check_paths(recipe: Recipe) -> None:
    """RecipeError when ``data.path`` or ``data.test_path`` does not exist (checked apart from the
    other rules: a finished run's combiners can be refitted without its images)."""
    for key in ("path", "test_path"):
        value = getattr(recipe.data, key)
        if value and not Path(value).expanduser().exists():
            here = "" if Path(value).expanduser().is_absolute() else f" (relative paths start from the current folder, {Path.cwd()})"
            raise recipe.error(f"data.{key}", f"does not exist: {value!r}{here}")


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with its relative data and pretrained-weights paths made absolute (relative paths
    start from the current folder), so that the ``recipe.toml`` fit writes into a run folder works
    from any folder."""
    data = recipe.data
    keys = ("path", "test_path") + (("root",) if data.source not in ("digits", "folder") else ())
    absolute = {k: _absolute(v) for k in keys if (v := getattr(data, k))}
    backbones = tuple(dataclasses.replace(b, pretrained=_absolute(b.pretrained)) if b.pretrained else b
                      for b in recipe.backbones)
    return dataclasses.replace(recipe, data=dataclasses.replace(data, **absolute), backbones=backbones)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# --------------------------------------------------------------------------- saving


def to_dict(recipe: Recipe) -> dict:
    """The recipe as a TOML-shaped table (backbones list only their own keys and overrides)."""
    train = dataclasses.asdict(recipe.train)
    out = {
        "name": recipe.name,
        "seed": recipe.seed,
        "data": dataclasses.asdict(recipe.data),
        "cv": dataclasses.asdict(recipe.cv),
        "train": train,
        "ensemble": dataclasses.asdict(recipe.ensemble),
        "backbones": [],
    }
    for b in recipe.backbones:
        item = {k: v for k, v in backbone_dict(b).items() if k != "train"}
        item.update({k: v for k, v in dataclasses.asdict(b.train).items() if train[k] != v or k in b.own})
        out["backbones"].append(item)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):  # a JSON string is a TOML basic string, once DEL is escaped too
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def dumps(recipe: Recipe) -> str:
    """Serialise a recipe to TOML text that :func:`load` reads back to an equal recipe."""
    d = to_dict(recipe)
    lines = [f"name = {_toml_value(d['name'])}", f"seed = {_toml_value(d['seed'])}", ""]
    for section in ("data", "cv", "train", "ensemble"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d[section].items()]
        lines.append("")
    for item in d["backbones"]:
        lines.append("[[backbones]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        lines.append("")
    return "\n".join(lines)


def check_backbone_names(recipe: Recipe, aliases: typing.Collection[str] | None = None) -> None:
    """Check that backbones (all, or those in ``aliases``) name real timm/torchvision models.

    Separate from :func:`check_names` because listing timm's models imports it (seconds):
    ``fit`` checks only the backbones it is about to train.
    """
    from . import backbones

    for i, b in enumerate(recipe.backbones):
        if aliases is not None and b.alias not in aliases:
            continue
        try:
            backbones.check_name(b.name)
        except backbones.BackboneError as exc:
            raise recipe.error(f"backbones[{i}].name", str(exc)) from None


def check_names(recipe: Recipe) -> None:
    """Check names that live in cheap registries: augmentations and combiners."""
    from . import augment, backbones, combiners

    where = Path(recipe.source_file).name or "recipe"
    for i, b in enumerate(recipe.backbones):
        try:
            backbones.split_name(b.name)
        except backbones.BackboneError as exc:
            raise recipe.error(f"backbones[{i}].name", str(exc)) from None
        key = "train.augment" if b.train.augment == recipe.train.augment else f"backbones[{i}].augment"
        for j, name in enumerate(b.train.augment):
            if name not in augment.AUGMENTATIONS:
                raise RecipeError(
                    f"{where}: {key}[{j}] must be one of "
                    f"{' | '.join(augment.AUGMENTATIONS)}, got {name!r}"
                )
    for j, name in enumerate(recipe.ensemble.combiners):
        if name not in combiners.available():
            close = difflib.get_close_matches(name, combiners.available(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(
                f"{where}: ensemble.combiners[{j}] must be one of {' | '.join(combiners.available())}, "
                f"got {name!r}{hint}"
            )
    if "snapshot" in recipe.ensemble.combiners and not any(b.train.snapshots for b in recipe.backbones):
        raise RecipeError(
            f"{where}: ensemble.combiners lists 'snapshot' but no backbone sets snapshots >= 2; "
            "set snapshots on a backbone or drop the combiner"
        )
