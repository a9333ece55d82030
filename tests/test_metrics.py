"""ensemble.metrics against hand-computed values on tiny arrays."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from ensemble import metrics


def onehot(y, c):
    return np.eye(c)[np.asarray(y)]


Y = np.array([0, 1, 2, 2, 1, 0])


def test_softmax_is_stable_and_matches_definition():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    p = metrics.softmax(logits)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[0], e / e.sum())
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0])
    log_p = metrics.log_softmax(logits)
    np.testing.assert_allclose(log_p[0], np.log(p[0]))
    np.testing.assert_allclose(log_p[1], [-math.log(2), -math.log(2), -2000 - math.log(2)])
    assert p.dtype == np.float64
    assert metrics.log_softmax(logits.astype(np.float32)).dtype == np.float64


def test_softmax_axis():
    logits = np.random.default_rng(0).normal(size=(3, 4, 5))
    np.testing.assert_allclose(metrics.softmax(logits, axis=0).sum(axis=0), 1.0)
    np.testing.assert_allclose(metrics.softmax(logits, axis=1),
                               metrics.softmax(logits.swapaxes(1, 2), axis=2).swapaxes(1, 2))


def test_perfect_predictions():
    s = metrics.score(onehot(Y, 3), Y, 3)
    assert s["accuracy"] == s["precision"] == s["recall"] == s["f1"] == s["f1_weighted"] == 1.0
    assert s["ece"] == 0.0 and s["brier"] == 0.0
    assert s["nll"] == pytest.approx(0.0, abs=1e-12)
    assert set(s) == {"accuracy", "precision", "recall", "f1", "f1_weighted", "nll", "brier", "ece"}


def test_uniform_probabilities():
    c = 4
    s = metrics.score(np.full((6, c), 1 / c), np.array([0, 1, 2, 3, 0, 1]), c)
    assert s["nll"] == pytest.approx(math.log(c))
    # squared error: (1 - 1/4)^2 + 3 * (1/4)^2 = 0.75 per row
    assert s["brier"] == pytest.approx(0.75)
    # argmax is always class 0: accuracy 2/6; ece = |0.25 - 2/6|
    assert s["accuracy"] == pytest.approx(2 / 6)
    assert s["ece"] == pytest.approx(abs(0.25 - 2 / 6))


def test_confidently_wrong():
    y = np.array([0, 1, 2])
    wrong = onehot([1, 2, 0], 3)
    s = metrics.score(wrong, y, 3)
    assert s["brier"] == pytest.approx(2.0)
    assert s["accuracy"] == 0.0 and s["f1"] == 0.0
    assert s["nll"] == pytest.approx(-math.log(1e-12))  # clipped at 1e-12
    assert s["ece"] == pytest.approx(1.0)


def test_hand_computed_macro_and_ece():
    # rows: (true, predicted, confidence)
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    s = metrics.score(proba, y, 2)
    # class 0: predicted at rows 0,1 -> precision 1/2; true rows 0,3 -> recall 1/2
    # class 1: predicted at rows 2,3 -> precision 1/2; true rows 1,2 -> recall 1/2
    assert s["accuracy"] == 0.5
    assert s["precision"] == s["recall"] == s["f1"] == pytest.approx(0.5)
    assert s["nll"] == pytest.approx(log_loss(y, proba))
    assert s["brier"] == pytest.approx(np.mean([0.02, 0.72, 0.18, 1.28]))
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.6 -> bin 8, 0.7 -> bin 10, 0.8 -> bin 11
    # each bin has one row: ece = mean |conf - correct|
    assert s["ece"] == pytest.approx(np.mean([0.1, 0.6, 0.3, 0.8]))


def test_macro_skips_classes_neither_labelled_nor_predicted():
    # class 2 never occurs and is never predicted: it does not drag the macro mean down
    s = metrics.score(onehot([0, 1], 3), np.array([0, 1]), 3)
    assert s["f1"] == s["precision"] == s["recall"] == 1.0
    # predicted but never labelled, class 2 is a miss of class 1, not a third class of precision 0
    s = metrics.score(onehot([0, 2], 3), np.array([0, 1]), 3)
    assert s["precision"] == pytest.approx(1 / 2) and s["recall"] == pytest.approx(1 / 2)
    # one error among 90 rows of 3 labelled classes: the macro scores barely move, wherever it goes
    y = np.repeat([0, 1, 2], 30)
    pred = y.copy()
    for wrong in (1, 3):  # into a labelled class, then into one absent from y
        pred[0] = wrong
        s = metrics.score(onehot(pred, 4), y, 4)
        assert s["recall"] == pytest.approx((29 / 30 + 1 + 1) / 3) and s["f1"] > 0.98


def test_details():
    proba = onehot([0, 0, 1, 2], 3)
    y = np.array([0, 1, 1, 2])
    d = metrics.details(proba, y, ["cat", "dog", "eel"])
    assert d["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert all(isinstance(v, int) for row in d["confusion"] for v in row)
    assert d["per_class"]["cat"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                     "support": 1}
    assert d["per_class"]["dog"]["recall"] == 0.5 and d["per_class"]["dog"]["support"] == 2
    # a class that never occurs still gets a row and a column
    d = metrics.details(onehot([0, 1], 3), np.array([0, 1]), ["a", "b", "c"])
    assert d["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert d["per_class"]["c"]["support"] == 0


def test_reliability_bins():
    proba = np.array([[0.9, 0.1], [0.95, 0.05], [0.55, 0.45], [0.5, 0.5]])
    y = np.array([0, 1, 0, 1])
    r = metrics.reliability(proba, y, n_bins=2)
    assert r["edges"] == [0.0, 0.5, 1.0]
    assert r["count"] == [1, 3]
    assert r["confidence"][0] == 0.5 and r["accuracy"][0] == 0.0  # argmax of a tie is 0
    assert r["confidence"][1] == pytest.approx((0.9 + 0.95 + 0.55) / 3)
    assert r["accuracy"][1] == pytest.approx(2 / 3)
    empty = metrics.reliability(proba, y, n_bins=15)
    assert empty["confidence"][0] is None and sum(empty["count"]) == 4


def test_ece_equals_weighted_reliability_gap():
    rng = np.random.default_rng(1)
    proba = metrics.softmax(rng.normal(size=(500, 5)) * 2)
    y = rng.integers(0, 5, 500)
    r = metrics.reliability(proba, y)
    gap = sum(n * abs(c - a) for c, a, n in zip(r["confidence"], r["accuracy"], r["count"]) if n)
    assert metrics.ece(proba, y) == pytest.approx(gap / 500)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_known_t(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(20000, 6))
    y = np.array([rng.choice(6, p=p) for p in metrics.softmax(z)])
    # the labels follow softmax(z); the model reports z * true_t, so T = true_t undoes it
    t = metrics.fit_temperature(z * true_t, y)
    assert t == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_finds_the_lowest_nll_when_a_few_rows_are_confidently_wrong():
    """Capping each row's log-probability (as nll does) gave the NLL a false minimum at a small T."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 10, 500)
    z = rng.normal(size=(500, 10)) * 2
    z[np.arange(500), y] += rng.uniform(3, 8, 500)
    wrong = rng.random(500) < 0.01  # mislabelled rows: the model is sure of another class
    z[wrong, (y[wrong] + 1) % 10] += 40

    def exact_nll(t: float) -> float:
        return float(-np.mean(metrics.log_softmax(z / t)[np.arange(500), y]))

    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 2001))
    best = grid[np.argmin([exact_nll(t) for t in grid])]
    t = metrics.fit_temperature(z, y)
    assert t == pytest.approx(best, rel=0.01) and exact_nll(t) <= exact_nll(best) + 1e-9


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: metrics.score(np.ones(3), np.zeros(3, int), 3), "2-D"),
        (lambda: metrics.score(np.ones((3, 2)) / 2, np.zeros(4, int), 2), "one label per row"),
        (lambda: metrics.score(np.ones((3, 2)) / 2, np.zeros(3, int), 3), "n_classes=3"),
        (lambda: metrics.score(np.ones((2, 2)) / 2, np.array([0, 2]), 2), "labels must be in 0..1"),
        (lambda: metrics.details(np.ones((2, 2)) / 2, np.array([0, 1]), ["a"]), "n_classes=1"),
        (lambda: metrics.score(np.array([[3.0, -1.0], [0.5, 2.0]]), np.array([0, 1]), 2),
         r"proba must hold probabilities.*pass softmax\(logits\)"),  # logits passed by mistake
        (lambda: metrics.score(np.full((2, 2), np.nan), np.array([0, 1]), 2), "must hold probabilities"),
        (lambda: metrics.score(np.ones((2, 2)) / 2, np.array([0.7, 1.0]), 2), "integer class indices"),
        (lambda: metrics.score(np.ones((2, 2)) / 2, np.array(["a", "b"]), 2), "integer class indices"),
        (lambda: metrics.fit_temperature(np.array([[np.inf, 0.0]]), np.array([0])), "logits must be finite"),
    ],
)
def test_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_a_perfect_score_has_an_nll_of_zero_not_minus_zero():
    nll = metrics.nll(np.eye(3), np.arange(3))
    assert nll == 0.0 and math.copysign(1.0, nll) == 1.0  # printed "0.0000", not "-0.0000"
