"""Combiners: the contract every registered combiner keeps, real signal on digits, honesty
under shuffled labels, state round-trips through combiner_store, and error tables."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_val_predict
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from ensemble import combiners as comb
from ensemble.combiner_store import CombinerStateError, load_combiner, save_combiner
from ensemble.metrics import log_softmax, nll, softmax

N_CLASSES = 10

# Every registered combiner with its defaults, the temperature-scaled wrapper, and the
# other options (cheap settings so the whole file stays fast).
CASES = {name: (name, {}) for name in comb.available()}
CASES.update({
    "mean+ts": ("mean+ts", {}),
    "stacking+ts": ("stacking+ts", {}),
    "weighted-logloss": ("weighted", {"method": "logloss"}),
    "stacking-random_forest": ("stacking", {"meta_learner": "random_forest",
                                            "meta_params": {"n_estimators": 20}}),
    "stacking-extra_trees": ("stacking", {"meta_learner": "extra_trees",
                                          "meta_params": {"n_estimators": 20}}),
    "stacking-gradient_boosting": ("stacking", {"meta_learner": "gradient_boosting",
                                                "meta_params": {"max_iter": 10,
                                                                "max_leaf_nodes": 8}}),
    "stacking-knn": ("stacking", {"meta_learner": "knn"}),
})


def make(case: str) -> comb.Combiner:
    name, params = CASES[case]
    return comb.make_combiner(name, **params)


@pytest.fixture(scope="module")
def digits():
    """OOF member logits (3, 1797, 10) of three cheap classifiers on digits, labels, folds.

    Members: logistic regression, Gaussian naive Bayes, 10-NN, each scored by
    cross_val_predict over one shared stratified 5-fold split; log of the probabilities
    floored at 0.01 (k-NN has exact zeros; NB is wildly overconfident).
    """
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    folds = np.empty(len(y), dtype=np.int64)
    for k, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y)):
        folds[test] = k
    models = [LogisticRegression(max_iter=1000), GaussianNB(), KNeighborsClassifier(n_neighbors=10)]
    with threadpool_limits(1):  # 2-core machine: multi-threaded BLAS/OpenMP spin against each other
        probas = [cross_val_predict(m, x, y, cv=PredefinedSplit(folds), method="predict_proba")
                  for m in models]
    logits = np.log(np.maximum(np.stack(probas), 0.01))
    return logits, y, folds


@pytest.fixture(scope="module")
def random_problem():
    """Random logits (5, 2000, 10) and random labels: nothing to learn."""
    rng = np.random.default_rng(0)
    return rng.normal(scale=2.0, size=(5, 2000, N_CLASSES)), rng.integers(0, N_CLASSES, 2000), \
        np.arange(2000) % 5


def accuracy(proba, y):
    return float(np.mean(proba.argmax(axis=1) == y))


# --------------------------------------------------------------------------- contract


def test_registry_names():
    assert comb.available()[:5] == ["vote", "mean", "snapshot", "weighted", "stacking"]
    assert comb.make_combiner("snapshot").name == "snapshot"
    assert comb.make_combiner("stacking+ts").name == "stacking+ts"
    assert comb.make_combiner("weighted", rounds=None).rounds == 25  # None -> default


@pytest.mark.parametrize("case", CASES)
def test_fit_then_predict_unseen_rows(case, digits):
    logits, y, folds = digits
    train, test = folds != 0, folds == 0
    combiner = make(case)
    assert combiner.fit(logits[:, train], y[train]) is combiner
    assert (combiner.n_members_, combiner.n_classes_) == (3, N_CLASSES)
    proba = combiner.predict_proba(logits[:, test])
    assert proba.shape == (test.sum(), N_CLASSES)
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(combiner.predict(logits[:, test]), proba.argmax(axis=1))
    assert accuracy(proba, y[test]) > 0.9


@pytest.mark.parametrize("case", CASES)
def test_deterministic(case, digits):
    logits, y, folds = digits
    train = folds != 1
    a = make(case).fit(logits[:, train], y[train]).predict_proba(logits)
    b = make(case).fit(logits[:, train], y[train]).predict_proba(logits)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_state_round_trip(case, digits, tmp_path):
    logits, y, folds = digits
    train = folds != 2
    fitted = make(case).fit(logits[:, train], y[train])
    expected = fitted.predict_proba(logits)
    path = save_combiner(fitted, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{fitted.name}.json", f"{fitted.name}.npz"]
    doc = json.loads(path.read_text())
    assert doc["class"] == fitted.name and {"params", "state"} <= set(doc)
    loaded = load_combiner(tmp_path, fitted.name)
    assert type(loaded) is type(fitted) and loaded.name == fitted.name
    np.testing.assert_array_equal(loaded.predict_proba(logits), expected)
    state, arrays = fitted.get_state()  # without files too
    np.testing.assert_array_equal(
        comb.restore_combiner(fitted.name, state, arrays).predict_proba(logits), expected)


@pytest.mark.parametrize("case", CASES)
def test_not_fitted(case, digits):
    combiner = make(case)
    with pytest.raises(NotFittedError, match="not fitted"):
        combiner.predict_proba(digits[0])
    with pytest.raises(NotFittedError, match="not fitted"):
        combiner.get_state()


@pytest.mark.parametrize("case", [c for c in CASES if not make(c).learns])
def test_non_learning_combiners_ignore_labels(case, digits):
    logits, y, _ = digits
    a = make(case).fit(logits, y).predict_proba(logits)
    b = make(case).fit(logits, np.roll(y, 1)).predict_proba(logits)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- real signal


@pytest.fixture(scope="module")
def nested(digits):
    logits, y, folds = digits
    return {c: comb.cross_val_proba(make(c), logits, y, folds)
            for c in ("mean", "weighted", "weighted-logloss", "stacking", "mean+ts")}


def test_learned_combiners_match_best_member_and_beat_mean(digits, nested):
    logits, y, _ = digits
    members = [accuracy(softmax(m), y) for m in logits]
    best, mean = max(members), accuracy(nested["mean"], y)
    assert mean < best  # the overconfident NB member drags the plain mean down
    for case in ("weighted", "weighted-logloss", "stacking"):
        acc = accuracy(nested[case], y)
        assert acc >= best - 0.01, (case, acc, best)
        assert acc >= mean + 0.005, (case, acc, mean)
        assert nll(nested[case], y) < nll(nested["mean"], y)


def test_temperature_scaling_improves_nll(digits, nested):
    _, y, _ = digits
    np.testing.assert_array_equal(nested["mean+ts"].argmax(1), nested["mean"].argmax(1))
    assert nll(nested["mean+ts"], y) < nll(nested["mean"], y) - 0.02


def test_greedy_selection_path(digits):
    logits, y, _ = digits
    w = comb.make_combiner("weighted", rounds=10).fit(logits, y)
    assert len(w.order_) == len(w.scores_) == 10
    member_nll = [nll(softmax(m), y) for m in logits]
    assert w.order_[0] == int(np.argmin(member_nll))  # round 1 = best single member
    assert w.scores_[0] == pytest.approx(min(member_nll))
    assert w.best_size_ == int(np.argmin(w.scores_)) + 1
    counts = np.bincount(w.order_[: w.best_size_], minlength=3)
    np.testing.assert_allclose(w.weights_, counts / w.best_size_)
    proba = np.tensordot(w.weights_, softmax(logits), axes=1)
    assert nll(proba, y) == pytest.approx(w.scores_[w.best_size_ - 1])


def test_logloss_weights_match_a_grid_search():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 600)
    good = np.eye(3)[y] * 3 + rng.normal(size=(600, 3))
    logits = np.stack([good, rng.normal(size=(600, 3)) + np.eye(3)[y]])
    w = comb.make_combiner("weighted", method="logloss").fit(logits, y).weights_
    p = softmax(logits)
    grid = np.linspace(0, 1, 2001)
    losses = [nll(a * p[0] + (1 - a) * p[1], y) for a in grid]
    assert w[0] == pytest.approx(grid[int(np.argmin(losses))], abs=2e-3)
    assert w.sum() == pytest.approx(1.0)


def test_vote_tie_break_and_fractions():
    # member 0 votes class 0, member 1 votes class 1; class 1 has more summed probability
    p = np.array([[[0.5, 0.4, 0.1]], [[0.05, 0.9, 0.05]]])
    vote = comb.make_combiner("vote").fit(np.log(p), np.array([0]))
    proba = vote.predict_proba(np.log(p))
    assert vote.predict(np.log(p))[0] == 1
    np.testing.assert_allclose(proba[0], [0.5, 0.5, 0.0], atol=1e-5)
    # a clear majority beats more summed probability
    p3 = np.array([[[0.6, 0.4]], [[0.6, 0.4]], [[0.0001, 0.9999]]])
    assert comb.make_combiner("vote").fit(np.log(p3), np.array([0])).predict(np.log(p3))[0] == 0


@pytest.mark.parametrize("meta", ["logistic", "random_forest"])
def test_stacking_class_missing_from_fit_rows(meta, digits, tmp_path):
    logits, y, _ = digits
    keep = y != 9
    s = comb.make_combiner("stacking", meta_learner=meta).fit(logits[:, keep], y[keep])
    proba = s.predict_proba(logits)
    assert proba.shape == (len(y), N_CLASSES)
    assert np.all(proba[:, 9] == 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    save_combiner(s, tmp_path)
    np.testing.assert_array_equal(load_combiner(tmp_path, "stacking").predict_proba(logits), proba)


def test_stacking_features_are_member_log_softmax():
    logits = np.random.default_rng(0).normal(size=(2, 4, 3))
    x = comb.stacking_features(logits)
    assert x.shape == (4, 6)
    np.testing.assert_allclose(x[:, 3:], log_softmax(logits[1]))


def test_cross_val_proba_is_out_of_fold():
    # random labels: extra trees fitted on a row memorise it; out-of-fold they cannot.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 600, 3))
    y = rng.integers(0, 3, 600)
    folds = np.arange(600) % 3
    combiner = comb.make_combiner("stacking", meta_learner="extra_trees")
    in_sample = combiner.clone().fit(logits, y).predict_proba(logits)
    assert accuracy(in_sample, y) > 0.9  # memorised
    assert abs(accuracy(comb.cross_val_proba(combiner, logits, y, folds), y) - 1 / 3) < 0.06


# --------------------------------------------------------------------------- honesty


@pytest.mark.parametrize("case", CASES)
def test_shuffled_labels_score_at_chance(case, random_problem, digits):
    logits, y, folds = random_problem
    acc = accuracy(comb.cross_val_proba(make(case), logits, y, folds), y)
    assert abs(acc - 1 / N_CLASSES) < 0.03, acc
    # digits members, labels permuted: the members' knowledge is useless
    d_logits, d_y, d_folds = digits
    shuffled = np.random.default_rng(0).permutation(d_y)
    acc = accuracy(comb.cross_val_proba(make(case), d_logits, shuffled, d_folds), shuffled)
    assert abs(acc - 1 / N_CLASSES) < 0.035, acc


@pytest.mark.parametrize("name, params", [("weighted", {}), ("weighted", {"method": "logloss"}),
                                          ("weighted+ts", {})], ids=["greedy", "logloss", "greedy+ts"])
def test_many_random_members_leave_the_weights_no_room_to_fit_the_rows_they_are_scored_on(name, params):
    """40 random members give greedy selection room to fit noise: scored on the rows it was fitted
    on, it reaches 0.117 where chance is 0.100 (averaged over draws). Nested, it must stay at chance;
    one draw of 5 members (above) cannot tell the two apart."""
    n_members, n_rows, draws = 40, 1000, 12
    accs, leaky = [], []
    for seed in range(draws):
        rng = np.random.default_rng(100 + seed)
        logits = rng.normal(scale=2.0, size=(n_members, n_rows, N_CLASSES))
        y = rng.integers(0, N_CLASSES, n_rows)
        folds = rng.permutation(np.arange(n_rows) % 5)
        combiner = comb.make_combiner(name, **params)
        accs.append(accuracy(comb.cross_val_proba(combiner, logits, y, folds), y))
        if seed < 3:
            leaky.append(accuracy(combiner.clone().fit(logits, y).predict_proba(logits), y))
    assert abs(np.mean(accs) - 1 / N_CLASSES) < 0.008, np.mean(accs)
    if name == "weighted" and not params:
        assert np.mean(leaky) > 1 / N_CLASSES + 0.01  # the test would see a leak of this size


# --------------------------------------------------------------------------- errors

RNG = np.random.default_rng(0)
L = RNG.normal(size=(3, 20, 4))
Y = np.arange(20) % 4
F = np.arange(20) % 2


def fitted_mean():
    return comb.make_combiner("mean").fit(L, Y)


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: comb.make_combiner("meen"), ValueError, "Did you mean 'mean'"),
        (lambda: comb.make_combiner("nope"), ValueError, "Valid names: vote, mean"),
        (lambda: comb.make_combiner("nope+ts"), ValueError, "unknown combiner 'nope'"),
        (lambda: comb.make_combiner("weighted", foo=1), ValueError, "unexpected parameter"),
        (lambda: comb.make_combiner("weighted", method="bogus").fit(L, Y), ValueError,
         "method must be one of"),
        (lambda: comb.make_combiner("weighted", rounds=0).fit(L, Y), ValueError, "rounds must be"),
        (lambda: comb.make_combiner("stacking", meta_learner="svm").fit(L, Y), ValueError,
         "valid: logistic, random_forest"),
        (lambda: comb.make_combiner("stacking", meta_params={"bogus": 1}).fit(L, Y), ValueError,
         "not accepted by LogisticRegression"),
        (lambda: comb.make_combiner("stacking").fit(L, np.zeros(20, int)), ValueError,
         "at least 2 distinct classes"),
        (lambda: comb.TemperatureScaled("mean").fit(L, Y), ValueError, "base must be a Combiner"),
        (lambda: comb.make_combiner("mean").fit(L[0], Y), ValueError,
         r"logits must be 3-D \(n_members, n_samples, n_classes\); got shape \(20, 4\)"),
        (lambda: comb.make_combiner("mean").fit(L, Y[:-1]), ValueError, "n_samples=20"),
        (lambda: comb.make_combiner("mean").fit(L, Y + 1), ValueError, r"labels must be in 0\.\.3"),
        (lambda: comb.make_combiner("mean").fit(L, Y.astype(float)), ValueError,
         "integer class indices"),
        (lambda: comb.make_combiner("mean").fit(np.where(L > 2, np.nan, L), Y), ValueError,
         "non-finite"),
        (lambda: fitted_mean().predict_proba(L[:2]), ValueError,
         "fitted on n_members=3, n_classes=4; got logits with n_members=2"),
        (lambda: fitted_mean().predict_proba(L[:, :, :3]), ValueError, "n_classes=3"),
        (lambda: comb.make_combiner("vote").predict(L), NotFittedError, "not fitted"),
        (lambda: comb.make_combiner("stacking", meta_params={"C": float("inf")}).fit(L, Y), ValueError,
         "meta_params C = inf cannot be saved"),
        (lambda: comb.make_combiner("stacking", meta_learner="random_forest",
                                    meta_params={"random_state": None}).fit(L, Y), ValueError,
         "random_state must be an integer, got None: a saved random_forest is refitted"),
        (lambda: comb.cross_val_proba(comb.make_combiner("weighted"), L, Y, F[:-1]), ValueError,
         "one fold index per sample"),
        (lambda: comb.cross_val_proba(comb.make_combiner("weighted"), L, Y, F * 0), ValueError,
         "at least 2 distinct fold"),
        (lambda: comb.cross_val_proba("stacking", L, Y, F), ValueError,
         r"combiner must be a Combiner, e.g. make_combiner\('stacking'\)"),
        (lambda: comb.make_combiner("stacking", meta_learner="knn").fit(L[:, :3], Y[:3]), ValueError,
         "meta_params n_neighbors = 5 is more than the 3 rows"),
        (lambda: comb.make_combiner("mean+ts", inner_folds=1), ValueError, "inner_folds must be an integer >= 2"),
        (lambda: comb.make_combiner("stacking+ts").fit(L[:, :2], np.array([0, 1])), ValueError,
         "stacking[+]ts: the temperature is fitted on stacking's predictions over 2 inner folds of the 2 rows"),
    ],
)
def test_errors(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def test_numpy_integers_are_integers_and_save_as_json(tmp_path):
    """Values computed with numpy, as in a notebook, are accepted and saved as plain numbers."""
    weighted = comb.make_combiner("weighted", rounds=np.int64(10)).fit(L, Y)
    stacking = comb.make_combiner("stacking", meta_learner="random_forest",
                                  meta_params={"n_estimators": np.int64(10)}).fit(L, Y)
    calibrated = comb.make_combiner("mean+ts", inner_folds=np.int32(3)).fit(L, Y)
    assert calibrated.inner_folds == 3 and weighted.rounds == 10
    for c in (weighted, stacking, calibrated):
        save_combiner(c, tmp_path, c.name.replace("+", "_"))
        again = load_combiner(tmp_path, c.name.replace("+", "_"))
        assert np.array_equal(again.predict_proba(L), c.predict_proba(L))


def test_combiners_can_be_cloned_by_scikit_learn():
    from sklearn.base import clone

    original = comb.make_combiner("stacking+ts", meta_params={"C": 0.5}, inner_folds=3)
    copy = clone(original)
    assert copy is not original and copy.get_params()["inner_folds"] == 3
    assert copy.base.meta_params == {"C": 0.5}


def test_a_failed_fit_leaves_the_combiner_unfitted():
    stacking = comb.make_combiner("stacking", meta_params={"class_weight": {"cat": 2.0}})  # refused in fit
    with pytest.raises(ValueError, match="not in class_weight"):
        stacking.fit(L, Y)
    with pytest.raises(NotFittedError):
        stacking.predict_proba(L)


def test_a_table_parameter_with_keys_that_are_not_text_is_refused_at_save(tmp_path):
    """JSON keeps only text keys: class_weight {0: 2.0} would load back as {"0": 2.0}, which the refit
    of a non-logistic meta-learner refuses."""
    weights = {c: 1.0 + (c == 0) for c in range(int(Y.max()) + 1)}
    stacking = comb.make_combiner("stacking", meta_learner="random_forest",
                                  meta_params={"class_weight": weights, "n_estimators": 5}).fit(L, Y)
    with pytest.raises(ValueError, match="parameter meta_params.class_weight is a table whose keys are not text"):
        save_combiner(stacking, tmp_path, "s")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- store errors


def _saved(tmp_path, name="weighted", **params):
    save_combiner(comb.make_combiner(name, **params).fit(L, Y), tmp_path, "c")
    return tmp_path


def _edit_json(tmp_path, edit):
    path = tmp_path / "c.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _edit_npz(tmp_path, edit):
    with np.load(tmp_path / "c.npz") as npz:
        arrays = dict(npz)
    edit(arrays)
    np.savez(tmp_path / "c.npz", **arrays)


@pytest.mark.parametrize(
    "corrupt, file, fragment",
    [
        (lambda d: (d / "c.json").unlink(), "c.json", "file not found"),
        (lambda d: (d / "c.npz").unlink(), "c.npz", "file not found"),
        (lambda d: (d / "c.json").write_text("{"), "c.json", "not readable JSON"),
        (lambda d: (d / "c.npz").write_bytes(b"junk"), "c.npz", "not a readable"),
        (lambda d: np.savez(d / "c.npz", weights_=np.array([{"a": 1}], dtype=object)), "c.npz",
         "pickle-free"),
        (lambda d: _edit_json(d, lambda j: j.pop("state")), "c.json", "missing key"),
        (lambda d: _edit_json(d, lambda j: j.update({"class": "wieghted"})), "c.json",
         "unknown combiner 'wieghted'"),
        (lambda d: _edit_json(d, lambda j: j["params"].update({"alpha": 1})), "c.json",
         "unexpected parameter"),
        (lambda d: _edit_json(d, lambda j: j["state"].update({"n_members_": -1})), "c.json",
         "n_members_"),
        (lambda d: _edit_json(d, lambda j: j["state"].update({"order_": [7] * 25})), "c.json",
         "order_"),
        (lambda d: _edit_npz(d, lambda a: a.pop("weights_")), "c.json", "missing array 'weights_'"),
        (lambda d: _edit_npz(d, lambda a: a.update(weights_=np.ones(2) / 2)), "c.json",
         r"must have shape \(3,\)"),
        (lambda d: _edit_npz(d, lambda a: a.update(weights_=np.array(["a", "b", "c"]))), "c.json",
         "dtype kind"),
        (lambda d: _edit_npz(d, lambda a: a.update(weights_=np.ones(3))), "c.json", "sum to 1"),
        (lambda d: _edit_json(d, lambda j: j["state"].update({"best_size_": 26})), "c.json",
         "best_size_ 26 must be at most rounds"),
        (lambda d: _edit_npz(d, lambda a: a.update(weights_=a["weights_"][[1, 2, 0]])), "c.json",
         "weights_ must be the member counts"),
    ],
)
def test_load_errors_name_file_and_problem(corrupt, file, fragment, tmp_path):
    corrupt(_saved(tmp_path))
    with pytest.raises(CombinerStateError, match=fragment) as info:
        load_combiner(tmp_path, "c")
    assert file in str(info.value)


@pytest.mark.parametrize(
    "name, edit, fragment",
    [
        ("stacking", lambda a: a.update(coef_=np.zeros((4, 5))),
         r"'coef_' must have shape \(4, 12\)"),
        ("stacking", lambda a: a.update(classes_=np.array([0, 0, 1, 2])), "increasing labels"),
        ("mean+ts", lambda a: None, None),  # control: unedited loads
    ],
)
def test_load_errors_in_nested_state(name, edit, fragment, tmp_path):
    _saved(tmp_path, name)
    _edit_npz(tmp_path, edit)
    if fragment is None:
        assert load_combiner(tmp_path, "c").name == name
        return
    with pytest.raises(CombinerStateError, match=fragment):
        load_combiner(tmp_path, "c")


@pytest.mark.parametrize("temperature", [-1.0, 0.0, 1e-320, 1e999, True, 10**400, "1.0"],
                         ids=["negative", "zero", "subnormal", "inf", "bool", "huge-int", "text"])
def test_bad_temperature_in_state(tmp_path, temperature):
    """Outside fit_temperature's range a temperature gives NaN or uniform probabilities (10**400 overflowed)."""
    _saved(tmp_path, "mean+ts")
    _edit_json(tmp_path, lambda j: j["state"].update({"temperature_": temperature}))
    with pytest.raises(CombinerStateError, match=r"temperature_'\] must be a number in \[0.01, 100\]"):
        load_combiner(tmp_path, "c")


def test_a_saved_combiner_is_the_fitted_one_whatever_the_caller_changes_after_the_fit(tmp_path):
    """A refitted-on-load meta-learner keeps its own copy of the labels and the parameters it was fitted with."""
    y, params = Y.copy(), {"n_estimators": 5, "max_depth": 3}
    stacking = comb.make_combiner("stacking", meta_learner="random_forest", meta_params=params).fit(L, y)
    ts = comb.make_combiner("stacking+ts", meta_learner="random_forest", meta_params=params).fit(L, y)
    before = stacking.predict_proba(L), ts.predict_proba(L)
    np.random.default_rng(1).shuffle(y)  # a permutation test reusing the array
    params["max_depth"] = 1
    for c, proba in zip((stacking, ts), before):
        save_combiner(c, tmp_path, "c")
        np.testing.assert_array_equal(load_combiner(tmp_path, "c").predict_proba(L), proba)


def test_a_numpy_integer_random_state_is_an_integer():
    c = comb.make_combiner("stacking", meta_learner="random_forest",
                           meta_params={"random_state": np.int64(3), "n_estimators": 5})
    assert c.fit(L, Y).predict_proba(L).shape == (20, 4)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ""])
def test_save_rejects_unsafe_names(name, tmp_path):
    with pytest.raises(ValueError, match="no path separators"):
        save_combiner(fitted_mean(), tmp_path, name)


def test_save_unfitted_raises(tmp_path):
    with pytest.raises(NotFittedError):
        save_combiner(comb.make_combiner("mean"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_overwrites_atomically(tmp_path):
    save_combiner(comb.make_combiner("weighted").fit(L, Y), tmp_path, "w")
    w2 = comb.make_combiner("weighted").fit(L, (Y + 1) % 4)
    save_combiner(w2, tmp_path, "w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.npz"]  # no temp files left
    np.testing.assert_array_equal(load_combiner(tmp_path, "w").weights_, w2.weights_)
