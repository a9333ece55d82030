"""Combiners: turn member logits (n_members, n_samples, n_classes) into one probability matrix.

They mirror scikit-learn: ``__init__`` only stores parameters, ``fit(logits, y)`` validates
and returns ``self``, fitted state ends in ``_``, and ``predict_proba`` / ``predict`` refuse to
run before ``fit``. Everything here is plain numpy / scikit-learn array math: no torch and no
file I/O (saving lives in :mod:`ensemble.combiner_store`, through ``get_state`` /
``from_state``, never pickle).

Registered names: ``vote``, ``mean``, ``snapshot``, ``weighted``, ``stacking``; any of them
with a ``+ts`` suffix (``make_combiner("stacking+ts")``) is wrapped in
:class:`TemperatureScaled`. Use :func:`cross_val_proba` for an honest (nested) estimate of a
combiner that learns from data.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import numbers
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from ensemble.metrics import EPS, TEMPERATURE_RANGE, fit_temperature, log_softmax, softmax

TS_SUFFIX = "+ts"
COMBINERS: dict[str, type["Combiner"]] = {}

# Added to the winning column's vote fraction so that argmax(predict_proba) is the
# tie-broken vote; small against the 1/n_members step between vote fractions.
_VOTE_TIE_EPS = 1e-6


def _one_thread() -> threadpool_limits:
    """Scope BLAS and OpenMP to one thread around L-BFGS fits and meta-learner calls.

    numpy and scipy ship separate OpenBLAS copies and scikit-learn its own OpenMP runtime;
    on a 2-core machine their idle threads spin against each other. Measured on the
    benchmark's stacking fit (40,000 x 150 features): 62 s with default threads, 5.8 s
    with BLAS limited to one thread, 3.0 s with BLAS and OpenMP limited to one.
    """
    return threadpool_limits(limits=1)


# Meta-learners for stacking: estimator class and the defaults that meta_params override.
META_LEARNERS: dict[str, tuple[type, dict[str, Any]]] = {
    "logistic": (LogisticRegression, {"C": 1.0, "max_iter": 1000, "random_state": 0}),
    "random_forest": (RandomForestClassifier, {"random_state": 0}),
    "extra_trees": (ExtraTreesClassifier, {"random_state": 0}),
    "gradient_boosting": (HistGradientBoostingClassifier, {"random_state": 0}),
    "knn": (KNeighborsClassifier, {}),
}


# --------------------------------------------------------------------------- registry


def register(cls: type["Combiner"]) -> type["Combiner"]:
    """Class decorator: add ``cls`` to :data:`COMBINERS` under ``cls.name``."""
    if cls.name in COMBINERS:
        raise ValueError(f"combiner name {cls.name!r} is already registered")
    COMBINERS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered combiner names, in registration order (each also exists with ``+ts``)."""
    return list(COMBINERS)


def combiner_class(name: str) -> type["Combiner"]:
    """The class behind a combiner name; ``<name>+ts`` gives :class:`TemperatureScaled`."""
    if name.endswith(TS_SUFFIX):
        combiner_class(name[: -len(TS_SUFFIX)])  # the base must exist
        return TemperatureScaled
    if name not in COMBINERS:
        close = difflib.get_close_matches(name, list(COMBINERS), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown combiner {name!r}.{hint} Valid names: {', '.join(available())} "
            f"(each optionally with '{TS_SUFFIX}' for temperature scaling)"
        )
    return COMBINERS[name]


def make_combiner(name: str, **params: Any) -> "Combiner":
    """Build an unfitted combiner by name; ``None`` params are dropped so defaults win.

    ``make_combiner("weighted", method="logloss")``; ``make_combiner("mean+ts")`` wraps the
    base combiner (built with ``params``) in :class:`TemperatureScaled`.
    """
    if name.endswith(TS_SUFFIX):
        wrapper = {"inner_folds": params.pop("inner_folds")} if params.get("inner_folds") is not None else {}
        combiner = TemperatureScaled(make_combiner(name[: -len(TS_SUFFIX)], **params), **wrapper)
        combiner._validate_params()
        return combiner
    cls = combiner_class(name)
    params = {k: v for k, v in params.items() if v is not None}
    _check_param_names(cls, params)
    combiner = cls(**params)
    combiner._validate_params()  # a bad value fails here, not after training
    return combiner


def restore_combiner(class_name: str, state: dict, arrays: dict[str, np.ndarray]) -> "Combiner":
    """Rebuild a fitted combiner from ``get_state()`` output saved under ``class_name``."""
    return combiner_class(class_name).from_state(state, arrays)


def _check_param_names(cls: type["Combiner"], params: dict) -> None:
    valid = cls.param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"combiner {cls.name!r} got unexpected parameter(s) {unknown}; "
            f"valid parameters: {list(valid) or 'none'}"
        )


# --------------------------------------------------------------------------- validation


def check_logits(logits: Any) -> np.ndarray:
    """Validate member logits and return them as float64 (n_members, n_samples, n_classes)."""
    arr = np.asarray(logits)
    if arr.ndim != 3:
        raise ValueError(
            f"logits must be 3-D (n_members, n_samples, n_classes); got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"logits must be a real numeric array; got dtype {arr.dtype}")
    m, n, c = arr.shape
    if m < 1 or n < 1 or c < 2:
        raise ValueError(
            "logits need n_members >= 1, n_samples >= 1 and n_classes >= 2; "
            f"got shape {arr.shape}"
        )
    arr = arr.astype(np.float64, copy=False)
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"logits contain {bad} non-finite values (NaN or inf); clip log-probabilities "
            "first, e.g. np.maximum(logits, -50.0)"
        )
    return arr


def _is_int(v: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def check_labels(y: Any, logits_shape: tuple[int, int, int]) -> np.ndarray:
    """Validate labels ``y`` (n_samples,) against ``logits_shape``; returns int64."""
    y = np.asarray(y)
    _, n, c = logits_shape
    if y.ndim != 1 or len(y) != n:
        raise ValueError(
            f"y must be 1-D with one label per sample: logits have n_samples={n}, "
            f"y has shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class indices; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(
            f"labels must be in 0..{c - 1} (n_classes={c}); got min {y.min()}, max {y.max()}"
        )
    return y.astype(np.int64, copy=False)


def check_folds(folds: Any, n_samples: int) -> np.ndarray:
    """Validate a fold-index array (n_samples,) with at least two distinct folds."""
    folds = np.asarray(folds)
    if folds.ndim != 1 or len(folds) != n_samples or not np.issubdtype(folds.dtype, np.integer):
        raise ValueError(
            f"folds must be a 1-D integer array with one fold index per sample "
            f"(n_samples={n_samples}); got shape {folds.shape}, dtype {folds.dtype}"
        )
    if len(np.unique(folds)) < 2:
        raise ValueError("folds must contain at least 2 distinct fold indices to cross-validate")
    return folds


def _array(arrays: dict, key: str, shape: tuple, kinds: str) -> np.ndarray:
    """Fetch ``arrays[key]`` checking dtype kind (e.g. "f", "iu") and shape (None = any)."""
    if key not in arrays:
        raise ValueError(f"missing array {key!r}; found {sorted(arrays)}")
    arr = np.asarray(arrays[key])
    if arr.dtype.kind not in kinds:
        raise ValueError(f"array {key!r} must have dtype kind {kinds!r}; got {arr.dtype}")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"array {key!r} must have shape {want}; got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"array {key!r} contains NaN or inf")
    return arr


def _int(state: dict, key: str, minimum: int) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"state[{key!r}] must be an integer >= {minimum}; got {value!r}")
    return value


# --------------------------------------------------------------------------- base class


class Combiner:
    """Base class. Subclasses set ``name``/``learns`` and implement ``_fit``/``_predict_proba``.

    Subclasses with fitted arrays also implement ``_get_state`` / ``_set_state``.
    """

    name: ClassVar[str]
    learns: ClassVar[bool]  # True when fit learns anything from the data

    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the ``__init__`` parameters."""
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters, as given (``deep`` is scikit-learn's: nested combiners are
        parameters like any other here)."""
        return {p: getattr(self, p) for p in self.param_names()}

    def clone(self) -> "Combiner":
        """An unfitted copy with the same parameters."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- public API

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Combiner":
        """Fit on member logits (n_members, n_samples, n_classes) and labels (n_samples,)."""
        logits = check_logits(logits)
        y = check_labels(y, logits.shape)
        self._validate_params()
        params = self._json_params()  # what this fit used: get_state saves these, whatever the caller changes later
        self.n_members_, _, self.n_classes_ = (int(s) for s in logits.shape)
        try:
            self._fit(logits, y)
        except BaseException:  # a failed fit leaves the combiner unfitted, not half-fitted
            del self.n_members_, self.n_classes_
            raise
        self._fitted_params = params
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), rows summing to 1."""
        self._check_fitted()
        logits = check_logits(logits)
        m, _, c = logits.shape
        if m != self.n_members_ or c != self.n_classes_:
            raise ValueError(
                f"{self.name} was fitted on n_members={self.n_members_}, "
                f"n_classes={self.n_classes_}; got logits with n_members={m}, n_classes={c}"
            )
        return self._predict_proba(logits)

    def predict(self, logits: np.ndarray) -> np.ndarray:
        """Predicted class index (n_samples,)."""
        return self.predict_proba(logits).argmax(axis=1)

    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """``({"params": JSON params, "state": JSON fitted scalars}, {name: array})``."""
        self._check_fitted()
        extra, arrays = self._get_state()
        state = {"n_members_": self.n_members_, "n_classes_": self.n_classes_, **extra}
        params = getattr(self, "_fitted_params", None)
        return {"params": self._json_params() if params is None else params, "state": state}, arrays

    @classmethod
    def from_state(cls, state: dict, arrays: dict[str, np.ndarray]) -> "Combiner":
        """Rebuild a fitted combiner from :meth:`get_state` output (no pickle).

        Raises ValueError naming what is missing or malformed.
        """
        params, fitted = _split_state(state)
        _check_param_names(cls, params)
        obj = cls(**params)
        obj._validate_params()
        obj.n_members_ = _int(fitted, "n_members_", 1)
        obj.n_classes_ = _int(fitted, "n_classes_", 2)
        obj._set_state(fitted, arrays)
        return obj

    # -- hooks for subclasses

    def _validate_params(self) -> None:
        """Raise ValueError for bad parameters (called by fit, as in scikit-learn)."""

    def _fit(self, logits: np.ndarray, y: np.ndarray) -> None:
        """Learn from validated float64 logits and int64 labels."""

    def _predict_proba(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _json_params(self) -> dict[str, Any]:
        return copy.deepcopy(self.get_params())

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    def _set_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore the subclass's fitted attributes (n_members_, n_classes_ already set)."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_classes_"):
            raise NotFittedError(
                f"this {self.name!r} combiner is not fitted yet; call fit(logits, y) first"
            )


def _split_state(state: Any) -> tuple[dict, dict]:
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict) \
            or not isinstance(state.get("state"), dict):
        raise ValueError(
            "state must be a dict with dict entries 'params' and 'state' (from get_state()); "
            f"got {type(state).__name__}"
        )
    return state["params"], state["state"]


# --------------------------------------------------------------------------- averaging


@register
class Vote(Combiner):
    """Hard majority vote of the members' argmax; ties go to the larger summed probability.

    ``predict_proba`` is the vote fraction per class, with ``_VOTE_TIE_EPS`` added to the
    winning class (then renormalised) so that its argmax is the tie-broken vote.
    """

    name = "vote"
    learns = False

    def __init__(self) -> None:
        pass

    def _predict_proba(self, logits: np.ndarray) -> np.ndarray:
        proba = softmax(logits)                                  # (M, N, C)
        n_members, n, c = proba.shape
        votes = proba.argmax(axis=2)                             # (M, N)
        counts = (votes[:, :, None] == np.arange(c)).sum(axis=0).astype(np.float64)
        summed = proba.sum(axis=0)                               # (N, C)
        is_top = counts == counts.max(axis=1, keepdims=True)
        winner = np.where(is_top, summed, -np.inf).argmax(axis=1)
        out = counts / n_members
        out[np.arange(n), winner] += _VOTE_TIE_EPS
        out /= out.sum(axis=1, keepdims=True)
        return out


@register
class Mean(Combiner):
    """Soft voting: the mean of the members' softmax probabilities."""

    name = "mean"
    learns = False

    def __init__(self) -> None:
        pass

    def _predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits).mean(axis=0)


@register
class Snapshot(Mean):
    """Snapshot ensemble: mean of probabilities over the snapshots of one backbone.

    Same math as ``mean``; a separate name so runs and reports keep the two apart (the
    caller feeds it the snapshot members).
    """

    name = "snapshot"
    learns = False


# --------------------------------------------------------------------------- weighted


def true_class_proba(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each member's softmax probability of the true class, (n_members, n_samples)."""
    rows = np.arange(len(y))
    z = logits - logits.max(axis=2, keepdims=True)               # (M, N, C), max 0
    z_true = z[:, rows, y].copy()
    np.exp(z, out=z)
    return np.exp(z_true) / z.sum(axis=2)


def greedy_selection(p_true: np.ndarray, rounds: int) -> tuple[list[int], list[float]]:
    """Caruana et al. (2004) ensemble selection with replacement, minimising NLL.

    ``p_true`` (n_members, n_samples) holds each member's true-class probability; the NLL
    of an average of members only needs these. Each round adds the member (repeats
    allowed) whose addition gives the lowest NLL of the running average; ties go to the
    lowest index. All candidates of a round are scored at once. Returns the selection
    order and the NLL after each round.
    """
    running = np.zeros(p_true.shape[1])                          # sum of the chosen members
    buf = np.empty_like(p_true)                                  # (M, N)
    order: list[int] = []
    scores: list[float] = []
    for k in range(1, rounds + 1):
        np.add(p_true, running, out=buf)                         # k * candidate averages
        np.maximum(buf, k * EPS, out=buf)
        np.log(buf, out=buf)
        losses = np.log(k) - buf.mean(axis=1)                    # NLL of each candidate
        best = int(np.argmin(losses))
        order.append(best)
        scores.append(float(losses[best]))
        running += p_true[best]
    return order, scores


def logloss_weights(p_true: np.ndarray) -> np.ndarray:
    """Convex weights (n_members,) minimising the NLL of the weighted mean probability.

    Weights are ``softmax(z)``; ``z`` is found by L-BFGS from 0 (equal weights).
    """
    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(z)
        mix = np.maximum(w @ p_true, EPS)                        # (N,)
        grad_w = -(p_true / mix).mean(axis=1)                    # (M,)
        return float(-np.log(mix).mean()), w * (grad_w - w @ grad_w)

    with _one_thread():
        result = minimize(objective, np.zeros(len(p_true)), jac=True, method="L-BFGS-B")
    return softmax(result.x)


@register
class Weighted(Combiner):
    """Weighted mean of member probabilities.

    ``method="greedy"``: ensemble selection with replacement over ``rounds`` rounds; the
    best-NLL prefix of the selection sets ``weights_ = counts / prefix length``
    (AutoGluon style). Fitted ``order_`` (all rounds, in order), ``scores_`` (NLL after
    each round) and ``best_size_`` (prefix length used).
    ``method="logloss"``: convex weights minimising NLL (L-BFGS on a softmax
    parameterisation). Both set ``weights_`` (n_members,), summing to 1.
    """

    name = "weighted"
    learns = True
    METHODS = ("greedy", "logloss")

    def __init__(self, method: str = "greedy", rounds: int = 25) -> None:
        self.method = method
        self.rounds = rounds

    def _validate_params(self) -> None:
        if self.method not in self.METHODS:
            raise ValueError(
                f"weighted: method must be one of {list(self.METHODS)}; got {self.method!r}"
            )
        if not _is_int(self.rounds) or self.rounds < 1:
            raise ValueError(f"weighted: rounds must be an integer >= 1; got {self.rounds!r}")
        self.rounds = int(self.rounds)  # a numpy integer saves as JSON

    def _fit(self, logits: np.ndarray, y: np.ndarray) -> None:
        p_true = true_class_proba(logits, y)
        if self.method == "logloss":
            self.weights_ = logloss_weights(p_true)
            return
        self.order_, self.scores_ = greedy_selection(p_true, self.rounds)
        self.best_size_ = int(np.argmin(self.scores_)) + 1
        counts = np.bincount(self.order_[: self.best_size_], minlength=self.n_members_)
        self.weights_ = counts / self.best_size_

    def _predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return np.tensordot(self.weights_, softmax(logits), axes=1)

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        state = {}
        if self.method == "greedy":
            state = {"order_": self.order_, "scores_": self.scores_, "best_size_": self.best_size_}
        return state, {"weights_": self.weights_}

    def _set_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        weights = _array(arrays, "weights_", (self.n_members_,), "f").astype(np.float64)
        if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
            raise ValueError(f"weights_ must be >= 0 and sum to 1; got {weights.tolist()}")
        self.weights_ = weights
        if self.method != "greedy":
            return
        order, scores = state.get("order_"), state.get("scores_")
        if not (isinstance(order, list) and isinstance(scores, list)
                and len(order) == len(scores) == self.rounds
                and all(isinstance(i, int) and 0 <= i < self.n_members_ for i in order)):
            raise ValueError(
                f"greedy state needs 'order_' ({self.rounds} member indices in "
                f"0..{self.n_members_ - 1}) and 'scores_' ({self.rounds} floats)"
            )
        size = _int(state, "best_size_", 1)
        counts = np.bincount(order[:size], minlength=self.n_members_)
        if size > self.rounds or not np.allclose(weights, counts / size):
            raise ValueError(
                f"greedy state: best_size_ {size} must be at most rounds ({self.rounds}) and weights_ must be "
                f"the member counts of the first best_size_ entries of order_ over best_size_"
            )
        self.order_ = order
        self.scores_ = [float(s) for s in scores]
        self.best_size_ = size


# --------------------------------------------------------------------------- stacking


def stacking_features(logits: np.ndarray) -> np.ndarray:
    """Meta-features (n_samples, n_members * n_classes): every member's log-softmax.

    Log-probabilities are clipped at log(EPS) so one over-confident member cannot put
    values of -1000 into the meta-learner's input.
    """
    logp = np.maximum(log_softmax(logits), np.log(EPS))          # (M, N, C)
    m, n, c = logp.shape
    return np.ascontiguousarray(logp.transpose(1, 0, 2)).reshape(n, m * c)


def make_meta_learner(name: str, params: dict[str, Any]):
    """An unfitted scikit-learn classifier by name, defaults overridden by ``params``."""
    if name not in META_LEARNERS:
        raise ValueError(
            f"stacking: unknown meta_learner {name!r}; valid: {', '.join(META_LEARNERS)}"
        )
    cls, defaults = META_LEARNERS[name]
    if not isinstance(params, dict):
        raise ValueError(f"stacking: meta_params must be a dict; got {type(params).__name__}")
    try:
        estimator = cls(**{**defaults, **params})
        # scikit-learn checks values only when fitting: check them now, not after hours of training
        getattr(estimator, "_validate_params", lambda: None)()
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"stacking: meta_params {params} not accepted by {cls.__name__} ({exc}); "
            f"see its scikit-learn documentation for valid arguments"
        ) from None
    return estimator


@register
class Stacking(Combiner):
    """A scikit-learn meta-learner on the concatenated member log-probabilities.

    ``meta_learner`` is one of :data:`META_LEARNERS`; ``meta_params`` are passed to it
    (``random_state=0`` is the default where the estimator has one). Fitted: ``meta_``
    (the estimator, fitted on features minus ``feature_mean_``) and ``classes_`` (the labels
    it saw; ``predict_proba`` always has all ``n_classes_`` columns, zero for classes absent
    from the fit rows).

    Saved state: for ``logistic`` the coefficients (``coef_``, ``intercept_``,
    ``classes_``), put back into a fresh LogisticRegression. For the other meta-learners
    the training features and labels are saved and the estimator is refitted,
    deterministically, in ``from_state`` (costs a refit, but needs no pickle).
    """

    name = "stacking"
    learns = True

    def __init__(self, meta_learner: str = "logistic", meta_params: dict | None = None) -> None:
        self.meta_learner = meta_learner
        self.meta_params = meta_params

    def _validate_params(self) -> None:
        meta = make_meta_learner(self.meta_learner, self.meta_params or {})
        for key, value in (self.meta_params or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"stacking: meta_params {key} = {value} cannot be saved (a saved combiner "
                                 f"holds finite numbers only); give a large finite value instead")
        state = meta.get_params().get("random_state", 0)
        if self.meta_learner != "logistic" and not _is_int(state):
            raise ValueError(f"stacking: meta_params random_state must be an integer, got {state!r}: a saved "
                             f"{self.meta_learner} is refitted when loaded and must give the same probabilities")

    def _fit(self, logits: np.ndarray, y: np.ndarray) -> None:
        self._fit_features(stacking_features(logits), y)

    def _fit_features(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fit the meta-learner on features ``x`` (n_samples, n_members * n_classes)."""
        if len(np.unique(y)) < 2:
            raise ValueError("stacking needs at least 2 distinct classes in y to fit")
        meta = make_meta_learner(self.meta_learner, self.meta_params or {})
        k = meta.get_params().get("n_neighbors") if self.meta_learner == "knn" else None
        if k is not None and k > len(y):
            raise ValueError(f"stacking: meta_params n_neighbors = {k} is more than the {len(y)} rows it is fitted on")
        # Centering leaves the L2-penalised logistic optimum unchanged (the unpenalised
        # intercept absorbs the shift) but conditions L-BFGS far better: 6 instead of 90
        # iterations on the benchmark. Trees and k-NN are shift-invariant.
        self.feature_mean_ = x.mean(axis=0)
        with _one_thread():
            self.meta_ = meta.fit(x - self.feature_mean_, y)
        self.classes_ = np.asarray(self.meta_.classes_, dtype=np.int64)
        if self.meta_learner != "logistic":
            self._train_x, self._train_y = x, y.copy()  # y may be the caller's array (check_labels copies no int64)

    def _predict_proba(self, logits: np.ndarray) -> np.ndarray:
        x = stacking_features(logits) - self.feature_mean_
        out = np.zeros((len(x), self.n_classes_))
        with _one_thread():
            out[:, self.classes_] = self.meta_.predict_proba(x)
        return out

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        if self.meta_learner == "logistic":
            return {"saved": "coefficients"}, {
                "coef_": self.meta_.coef_, "intercept_": self.meta_.intercept_,
                "classes_": self.classes_, "feature_mean_": self.feature_mean_,
            }
        return {"saved": "training_data"}, {"train_x": self._train_x, "train_y": self._train_y}

    def _set_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        n_features = self.n_members_ * self.n_classes_
        if self.meta_learner != "logistic":
            x = _array(arrays, "train_x", (None, n_features), "f").astype(np.float64)
            y = _array(arrays, "train_y", (len(x),), "iu").astype(np.int64)
            if len(y) == 0 or y.min() < 0 or y.max() >= self.n_classes_:
                raise ValueError(f"train_y must be non-empty labels in 0..{self.n_classes_ - 1}")
            self._fit_features(x, y)
            return
        classes = _array(arrays, "classes_", (None,), "iu").astype(np.int64)
        if len(classes) < 2 or np.any(np.diff(classes) <= 0) or classes[0] < 0 \
                or classes[-1] >= self.n_classes_:
            raise ValueError(
                f"classes_ must be >= 2 increasing labels in 0..{self.n_classes_ - 1}; "
                f"got {classes.tolist()}"
            )
        rows = 1 if len(classes) == 2 else len(classes)
        meta = make_meta_learner(self.meta_learner, self.meta_params or {})
        meta.coef_ = _array(arrays, "coef_", (rows, n_features), "f").astype(np.float64)
        meta.intercept_ = _array(arrays, "intercept_", (rows,), "f").astype(np.float64)
        meta.classes_ = classes
        meta.n_features_in_ = n_features
        self.feature_mean_ = _array(arrays, "feature_mean_", (n_features,), "f").astype(np.float64)
        self.meta_, self.classes_ = meta, classes


# --------------------------------------------------------------------------- calibration


def stratified_folds(y: np.ndarray, n_folds: int) -> np.ndarray:
    """Deterministic stratified fold indices (n_samples,): rows sorted by class (stable)
    are dealt to folds 0, 1, ..., n_folds-1 in turn, so every fold is used when
    n_samples >= n_folds."""
    folds = np.empty(len(y), dtype=np.int64)
    folds[np.argsort(y, kind="stable")] = np.arange(len(y)) % n_folds
    return folds


class TemperatureScaled(Combiner):
    """Temperature scaling on top of any combiner (named ``<base name>+ts``).

    ``fit`` fits a clone of ``base`` on all rows (as ``base_``) and a temperature
    ``temperature_`` on the log of the base's probabilities of the training rows;
    ``predict_proba`` returns ``softmax(log(p) / temperature_)``.

    For a base that learns (weighted, stacking) the probabilities the temperature sees are
    its ``inner_folds``-fold cross-validated ones over the training rows (stratified,
    deterministic): in-sample probabilities of a fitted stacker are overconfident (on
    digits a C=1 logistic stacker reaches NLL 0.005 in-sample, 0.17 held out), and a
    temperature fitted on them sharpens instead of calibrating (T = 0.02, held-out NLL
    0.90). A base that learns nothing is calibrated on its in-sample probabilities.
    """

    learns = True

    def __init__(self, base: Combiner, inner_folds: int = 5) -> None:
        self.base = base
        self.inner_folds = inner_folds

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}{TS_SUFFIX}"

    def clone(self) -> "TemperatureScaled":
        return TemperatureScaled(self.base.clone(), inner_folds=self.inner_folds)

    def _validate_params(self) -> None:
        if not isinstance(self.base, Combiner):
            raise ValueError(
                f"TemperatureScaled: base must be a Combiner; got {type(self.base).__name__}"
            )
        k = self.inner_folds
        if not _is_int(k) or k < 2:
            raise ValueError(f"TemperatureScaled: inner_folds must be an integer >= 2; got {k!r}")
        self.inner_folds = int(k)

    def _fit(self, logits: np.ndarray, y: np.ndarray) -> None:
        self.base_ = self.base.clone().fit(logits, y)
        if self.base.learns:
            n_folds = min(self.inner_folds, len(y))
            if n_folds < 2:
                raise ValueError("TemperatureScaled needs >= 2 rows to calibrate a learning base")
            try:
                proba = cross_val_proba(self.base, logits, y, stratified_folds(y, n_folds))
            except ValueError as exc:  # the base fitted on all rows, but not on a part of them
                raise ValueError(f"{self.name}: the temperature is fitted on {self.base.name}'s predictions "
                                 f"over {n_folds} inner folds of the {len(y)} rows, and one failed: {exc}") from None
        else:
            proba = self.base_.predict_proba(logits)
        self.temperature_ = fit_temperature(np.log(np.maximum(proba, EPS)), y)

    def _predict_proba(self, logits: np.ndarray) -> np.ndarray:
        log_p = np.log(np.maximum(self.base_.predict_proba(logits), EPS))
        return softmax(log_p / self.temperature_)

    def _json_params(self) -> dict[str, Any]:
        return {"base": self.base.name, "base_params": self.base._json_params(),
                "inner_folds": self.inner_folds}

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        base_state, base_arrays = self.base_.get_state()
        arrays = {f"base.{k}": v for k, v in base_arrays.items()}
        return {"temperature_": self.temperature_, "base": base_state["state"]}, arrays

    @classmethod
    def from_state(cls, state: dict, arrays: dict[str, np.ndarray]) -> "TemperatureScaled":
        params, fitted = _split_state(state)
        base_name, base_params = params.get("base"), params.get("base_params")
        if not isinstance(base_name, str) or not isinstance(base_params, dict):
            raise ValueError("TemperatureScaled params need 'base' (name) and 'base_params' (dict)")
        base_cls = combiner_class(base_name)
        base_arrays = {k[len("base."):]: v for k, v in arrays.items() if k.startswith("base.")}
        base_fitted = base_cls.from_state(
            {"params": base_params, "state": fitted.get("base", {})}, base_arrays
        )
        temperature = fitted.get("temperature_")
        low, high = TEMPERATURE_RANGE  # fit_temperature's: outside it (inf, 1e-320) predictions are junk
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not low * 0.999 <= temperature <= high * 1.001:
            raise ValueError(f"state['temperature_'] must be a number in [{low:g}, {high:g}]; got {temperature!r:.40}")
        obj = cls(base_fitted.clone(), inner_folds=params.get("inner_folds", 5))
        obj._validate_params()
        obj.base_, obj.temperature_ = base_fitted, float(temperature)
        obj.n_members_, obj.n_classes_ = base_fitted.n_members_, base_fitted.n_classes_
        return obj


# --------------------------------------------------------------------------- nested CV


def cross_val_proba(
    combiner: Combiner, logits: np.ndarray, y: np.ndarray, folds: np.ndarray
) -> np.ndarray:
    """Honest out-of-fold probabilities (n_samples, n_classes) of ``combiner``.

    For each fold k a fresh clone is fitted on the rows with ``folds != k`` and predicts
    the rows with ``folds == k``; a combiner with ``learns == False`` predicts all rows at
    once (fitting it learns nothing). ``folds`` (n_samples,) holds fold indices.
    """
    if not isinstance(combiner, Combiner):
        raise ValueError(f"combiner must be a Combiner, e.g. make_combiner({combiner!r}); got "
                         f"{type(combiner).__name__}")
    logits = check_logits(logits)
    y = check_labels(y, logits.shape)
    folds = check_folds(folds, logits.shape[1])
    if not combiner.learns:
        return combiner.clone().fit(logits, y).predict_proba(logits)
    out = np.empty(logits.shape[1:])
    for k in np.unique(folds):
        held_out = folds == k
        model = combiner.clone().fit(logits[:, ~held_out], y[~held_out])
        out[held_out] = model.predict_proba(logits[:, held_out])
    return out
