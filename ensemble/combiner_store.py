"""Save and load fitted combiners as ``<name>.json`` + ``<name>.npz``; never pickle.

``<name>.json`` holds ``{"format": 1, "class": <combiner name>, "params": {...},
"state": {...}}`` and ``<name>.npz`` the arrays of ``Combiner.get_state()``. Both files are
written atomically (temporary file in the same directory, then ``os.replace``), the npz
first, so a readable json always has its arrays beside it.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from ensemble.combiners import Combiner, restore_combiner
from ensemble.store import atomic_write, write_text

FORMAT = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+@-]+$")


class CombinerStateError(ValueError):
    """A saved combiner cannot be read back; the message names the file and the problem."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name.startswith("."):
        raise ValueError(
            f"combiner file name must be letters, digits and _ . + @ - (no path separators); "
            f"got {name!r}"
        )
    return name


def save_combiner(
    combiner: Combiner, directory: str | os.PathLike, name: str | None = None
) -> Path:
    """Write a fitted ``combiner`` to ``directory/<name>.json`` and ``.npz``.

    ``name`` defaults to ``combiner.name``. Returns the json path.
    """
    name = _check_name(combiner.name if name is None else name)
    directory = Path(directory)
    text, arrays = saved_form(combiner)
    atomic_write(directory / f"{name}.npz", lambda f: np.savez(f, allow_pickle=False, **arrays))
    write_text(directory / f"{name}.json", text)
    return directory / f"{name}.json"


def saved_form(combiner: Combiner) -> tuple[str, dict[str, np.ndarray]]:
    """The json text and arrays :func:`save_combiner` writes; ValueError if they cannot be saved."""
    state, arrays = combiner.get_state()
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for key, arr in arrays.items():
        if arr.dtype.hasobject:
            raise ValueError(
                f"{combiner.name}: array {key!r} has object dtype; it would need pickle"
            )
    key = _non_text_key(state["params"])
    if key is not None:
        raise ValueError(f"{combiner.name}: parameter {key} is a table whose keys are not text; JSON would "
                         "save them as text and the loaded combiner would differ (for class_weight, use 'balanced')")
    doc = {"format": FORMAT, "class": combiner.name, **state}
    try:
        return json.dumps(doc, indent=1, allow_nan=False, default=_plain), arrays  # fails early if not JSON-able
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{combiner.name}: its parameters cannot be saved as JSON ({exc})") from None


def _non_text_key(value, path: str = "") -> str | None:
    """The path of the first table (dict) in ``value`` with a key that is not a str, else None."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return path.lstrip(".") or "?"
        found = (_non_text_key(v, f"{path}.{k}") for k, v in value.items())
    elif isinstance(value, list | tuple):
        found = (_non_text_key(v, f"{path}[{i}]") for i, v in enumerate(value))
    else:
        return None
    return next((f for f in found if f is not None), None)


def _plain(value):
    """A numpy scalar (``np.int64(10)`` from a notebook) as the Python number it holds."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CombinerStateError(f"{path}: file not found; was the combiner saved?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CombinerStateError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CombinerStateError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    missing = [k for k in ("class", "params", "state") if k not in doc]
    if missing:
        raise CombinerStateError(f"{path}: missing key(s) {missing}")
    if not isinstance(doc["class"], str):
        raise CombinerStateError(f"{path}: 'class' must be a combiner name, got {doc['class']!r}")
    if doc.get("format", FORMAT) != FORMAT:
        raise CombinerStateError(f"{path}: format {doc.get('format')!r}, this code reads {FORMAT}")
    return doc


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise CombinerStateError(f"{path}: file not found (it is saved beside the .json)") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CombinerStateError(f"{path}: not a readable pickle-free .npz ({exc})") from None


def load_combiner(directory: str | os.PathLike, name: str) -> Combiner:
    """Load ``directory/<name>.json`` + ``.npz`` into a fitted combiner.

    Raises CombinerStateError (a ValueError) naming the file and what is wrong.
    """
    directory = Path(directory)
    json_path = directory / f"{_check_name(name)}.json"
    doc = _read_json(json_path)
    arrays = _read_npz(directory / f"{name}.npz")
    try:
        return restore_combiner(
            doc["class"], {"params": doc["params"], "state": doc["state"]}, arrays
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise CombinerStateError(f"{json_path}: {exc}") from None
