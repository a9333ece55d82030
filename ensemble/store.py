"""The run folder on disk: atomic writes, job keys, done-markers, and reading logits back.

Layout (see README, "Run folder")::

    outputs/<run>/recipe.toml, data.json, labels.npy, test_labels.npy, folds.npy
    outputs/<run>/members/<alias>/fold<k>/oof_logits.npy   (S, n_k, C)
                                          test_logits.npy  (S, n_test, C)
                                          history.json, weights.safetensors,
                                          snapshot<i>.safetensors, meta.json, done.json

Every file is written to a temporary name and renamed into place, and a job's
``done.json`` is written last: a job is either complete or absent, whenever the
process is killed. ``done.json`` also names the test images the job's test logits
are of; while they are replaced (the test set changed) it names none, and
:func:`load_logits` refuses test logits of another test set than the run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import tempfile
from collections.abc import Callable
from functools import partial
from typing import IO, BinaryIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RunError(ValueError):
    """A run folder that is missing files or holds files of the wrong shape."""


# --------------------------------------------------------------------------- atomic writes


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: once, at import, set straight back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a binary temp file beside ``path``, then rename it into place.

    A reader (or a process restarted after a kill) sees the old file or the new one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a run folder is shared like any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a write error (a full disk) names no file
            exc.filename = str(path)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def fit_command(run_dir: Path) -> str:
    """The command that completes (or rewrites) the run in ``run_dir``; cached jobs are reused, and
    so is the decoded-image cache that fit was given with ``--cache`` (recorded in data.json) where
    that folder is there and writable (a run folder may come from another machine or user)."""
    recipe = shlex.quote(str(Path(run_dir) / "recipe.toml"))
    command = f"python -m ensemble.fit {recipe} --out {shlex.quote(str(run_dir))}"
    try:
        cache = json.loads((Path(run_dir) / "data.json").read_text()).get("cache")
    except (OSError, ValueError, AttributeError):
        cache = None
    usable = isinstance(cache, str) and os.path.isdir(cache) and os.access(cache, os.W_OK)  # not another machine's
    return f"{command} --cache {shlex.quote(cache)}" if usable else command


def retrain_hint(run_dir: Path, job_folder: Path) -> str:
    """What to do about a damaged file of a finished job."""
    return f"delete {job_folder} and run `{fit_command(run_dir)}` to retrain that job"


def summary(doc: str) -> str:
    """A module docstring's first line for ``--help``, without reST double backticks."""
    return doc.splitlines()[0].replace("``", "")


def class_list(classes, shown: int = 10) -> str:
    """The class names as fit and the report print them: the first ``shown`` of a long list."""
    more = len(classes) - shown
    return ", ".join(classes[:shown]) + (f", ... ({more} more)" if more > 0 else "")


def require_run_folder(run_dir: Path) -> None:
    """RunError unless ``run_dir`` holds the ``recipe.toml`` that ``fit`` writes first."""
    if not (Path(run_dir) / "recipe.toml").is_file():
        raise RunError(f"{run_dir}: not a run folder (no recipe.toml); give the folder `python -m ensemble.fit` "
                       "wrote, e.g. outputs/<recipe name>")


COMPLETE = "run `python -m ensemble.fit` to complete the run"


def is_utf8(text: str) -> bool:
    """False for text holding bytes that were not UTF-8 (Python keeps such file names as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def try_lock(path: Path) -> IO | None:
    """Open ``path`` and take an exclusive ``flock`` on it without waiting: the open file (closing it,
    or the process dying, releases the lock), or None when another process holds it. Where there is
    no ``fcntl`` (Windows) the file is opened and nothing is locked."""
    handle = open(path, "a")  # noqa: SIM115 - the caller holds it
    try:
        import fcntl
    except ImportError:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def unwritable(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (made first if missing), or None where they can."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def inside_images(folder: Path, data: dict) -> str | None:
    """'data.path (...)' or 'data.test_path (...)' when ``folder`` lies in the images that a recipe's
    ``data`` section (``path``, ``test_path``) names: files written there would be read as images."""
    for key in ("path", "test_path"):
        images = data.get(key)
        if isinstance(images, str) and images and \
                Path(folder).resolve().is_relative_to(Path(images).expanduser().resolve()):
            return f"data.{key} ({images})"
    return None


def read_npy(path: Path, hint: Callable[[], str] | None = None) -> np.ndarray:
    """The array at ``path``; a RunError ending with ``hint()`` (what to do, built only on failure)
    when it is missing (default: complete the run) or unreadable."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RunError(f"{path}: missing; {hint() if hint else COMPLETE}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise RunError(f"{path}: not a readable numpy array ({exc})" + (f"; {hint()}" if hint else "")) from None


def read_json(path: Path, run_dir: Path | None = None):
    """A JSON file's content; a RunError where it is missing or damaged (saying how ``run_dir``'s fit
    rewrites it, where given)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; {COMPLETE}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        fix = f"; rewrite it with `{fit_command(run_dir)}` (cached jobs are reused)" if run_dir else ""
        raise RunError(f"{path}: not valid JSON ({exc}){fix}") from None


# --------------------------------------------------------------------------- jobs


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts and numpy arrays."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def job_dir(run_dir: Path, alias: str, fold: int) -> Path:
    return Path(run_dir) / "members" / alias / f"fold{fold}"


def _done(directory: Path) -> dict:
    try:
        done = json.loads((Path(directory) / "done.json").read_text())
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}


def is_done(directory: Path, key: str) -> bool:
    """True when the job in ``directory`` finished with exactly this ``key``."""
    return _done(directory).get("key") == key


def test_key_of(directory: Path) -> str | None:
    """The fingerprint of the test images a finished job's test logits are of ("" for none;
    None when unknown)."""
    return _done(directory).get("test")


def write_test_logits(directory: Path, test_logits: np.ndarray | None, test_key: str) -> None:
    """Replace a finished job's test logits (None: the run has no test set now). ``done.json``
    names no test set while they change and the new one only once they are written, so a kill in
    between predicts again, whichever test set the next run has."""
    directory = Path(directory)
    done = _done(directory)
    write_json(directory / "done.json", done | {"test": None})
    if test_logits is None:
        (directory / "test_logits.npy").unlink(missing_ok=True)
    else:
        write_npy(directory / "test_logits.npy", test_logits)
    write_json(directory / "done.json", done | {"test": test_key})


def weight_files(n_models: int) -> list[str]:
    """The weights files of a job that kept ``n_models`` models, in training order: its
    snapshots, then its final weights."""
    return [f"snapshot{i}.safetensors" for i in range(n_models - 1)] + ["weights.safetensors"]


def unreadable_weights(directory: Path, n_models: int) -> Path | None:
    """The first of a job's weights files that is missing or not whole safetensors (a truncated
    copy, a disk error), else None. Reads only the files' headers."""
    from safetensors import safe_open

    for name in weight_files(n_models):
        try:
            with safe_open(str(Path(directory) / name), "pt"):
                pass
        except Exception:  # noqa: BLE001 - missing, truncated, not safetensors: all the same here
            return Path(directory) / name
    return None


def require_weights_file(path: Path, hint: str) -> None:
    """RunError when a finished job's weights file is gone; ``hint`` says what to do."""
    if not Path(path).is_file():
        raise RunError(f"{path}: missing, although its job is marked done; {hint}")


def write_job(directory: Path, output, meta: dict, test_key: str) -> None:
    """Write one job's files atomically; ``done.json`` goes last, naming the job's ``meta["key"]``
    and ``test_key``, the fingerprint of the test images its test logits are of ("" for none)."""
    from safetensors.torch import save

    directory = Path(directory)
    (directory / "done.json").unlink(missing_ok=True)
    write_npy(directory / "oof_logits.npy", output.oof_logits)
    if output.test_logits is not None:
        write_npy(directory / "test_logits.npy", output.test_logits)
    else:
        (directory / "test_logits.npy").unlink(missing_ok=True)  # of an earlier run's test set
    write_json(directory / "history.json", output.history)
    names = weight_files(len(output.states))
    for name, state in zip(names, output.states):
        atomic_write(directory / name, lambda f, s=state: f.write(save(s)))
    for old in directory.glob("snapshot*.safetensors"):  # of an earlier recipe with more snapshots
        if old.name not in names:
            old.unlink()
    write_json(directory / "meta.json", meta)
    (directory / "error.txt").unlink(missing_ok=True)  # of an earlier attempt that failed
    write_json(directory / "done.json", {"key": meta["key"], "test": test_key})


# --------------------------------------------------------------------------- reading logits back


@dataclass
class Logits:
    """Member logits of a finished run, ready for the combiners.

    ``oof`` (n_members, N, C): each row from the fold model that never trained on it.
    ``test`` (n_members, n_test, C): the mean of the k fold models' test logits.
    """

    names: list[str]
    oof: np.ndarray
    test: np.ndarray | None
    y: np.ndarray
    y_test: np.ndarray | None
    folds: np.ndarray


def load_logits(run_dir: Path, aliases: list[str], with_test: bool = True) -> Logits:
    """Assemble the OOF matrix and the fold-averaged test logits of every model of ``aliases``.

    A backbone trained with S > 1 snapshots gives members ``alias@s1`` .. ``alias@sS``; one
    without gives ``alias``. :func:`select` picks members by name from the result.
    """
    run_dir = Path(run_dir)
    folds = read_npy(run_dir / "folds.npy")
    y = read_npy(run_dir / "labels.npy")
    test_path = run_dir / "test_labels.npy"
    y_test = read_npy(test_path) if with_test and test_path.exists() else None
    test_key = read_json(run_dir / "data.json").get("test_fingerprint") if y_test is not None else None
    k = int(folds.max()) + 1
    names, oof, test = [], [], []
    for alias in aliases:
        fold_oof, fold_test = [], []
        for fold in range(k):
            d = job_dir(run_dir, alias, fold)
            if not (d / "done.json").exists():
                raise RunError(f"{d}: job not finished; complete the run with `{fit_command(run_dir)}`")
            if y_test is not None and test_key is not None and test_key_of(d) != test_key:  # None: before 2026-11
                raise RunError(f"{d}: its test logits are not of the run's test images; complete the run with "
                               f"`{fit_command(run_dir)}`")
            hint = partial(retrain_hint, run_dir, d)  # damaged or deleted after the job finished (writes are atomic)
            fold_oof.append(read_npy(d / "oof_logits.npy", hint))
            if y_test is not None:
                fold_test.append(read_npy(d / "test_logits.npy", hint))
        first = fold_oof[0].shape
        if len(first) != 3:
            _check_shape(job_dir(run_dir, alias, 0) / "oof_logits.npy", first, "3 dimensions", "rows of fold 0",
                         run_dir)
        s, c = first[0], first[-1]
        full = np.empty((s, len(y), c), dtype=np.float32)
        for fold, part in enumerate(fold_oof):
            rows = np.flatnonzero(folds == fold)
            _check_shape(job_dir(run_dir, alias, fold) / "oof_logits.npy", part.shape, (s, len(rows), c),
                         f"rows of fold {fold}", run_dir)
            full[:, rows] = part
        for fold, part in enumerate(fold_test):
            _check_shape(job_dir(run_dir, alias, fold) / "test_logits.npy", part.shape, (s, len(y_test), c),
                         "test images", run_dir)
        bagged = np.mean(fold_test, axis=0) if fold_test else None
        names += [f"{alias}@s{i + 1}" for i in range(s)] if s > 1 else [alias]
        oof += list(full)
        test += [] if bagged is None else list(bagged)
    return Logits(
        names=names,
        oof=np.stack(oof),
        test=np.stack(test) if test else None,
        y=y,
        y_test=y_test,
        folds=folds,
    )


def _check_shape(path: Path, shape: tuple, expected: tuple | str, rows: str, run_dir: Path) -> None:
    if shape != expected:
        raise RunError(f"{path}: shape {shape}, expected {expected} (snapshots, {rows}, classes); delete that "
                       f"job folder and run `{fit_command(run_dir)}`")


def base_alias(name: str) -> str:
    """The backbone alias of a member name: ``alias@s3`` -> ``alias``."""
    return re.sub(r"@s\d+$", "", name)


def select(logits: Logits, names: list[str]) -> Logits:
    """The members ``names`` of ``logits``; a snapshot backbone's bare alias is its final (last) model."""
    index = {}
    for i, name in enumerate(logits.names):
        index[name] = i
        index[base_alias(name)] = i  # the last snapshot wins
    missing = [n for n in names if n not in index]
    if missing:
        raise RunError(f"no member named {missing[0]!r} in this run (members: {', '.join(logits.names)})")
    rows = [index[n] for n in names]
    return dataclasses.replace(
        logits, names=list(names), oof=logits.oof[rows], test=None if logits.test is None else logits.test[rows]
    )
