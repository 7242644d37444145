"""AP/mAP/top-1, the linear probe and kNN against hand-computed cases and scikit-learn."""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from hvpmtl.eval.knn import knn_eval, knn_scores
from hvpmtl.eval.linear_probe import fit_linear, linear_probe
from hvpmtl.metrics import average_precision, mean_average_precision, top1_accuracy


def test_average_precision_hand_case():
    # ranks of the positives: 1, 3, 5 -> precisions 1, 2/3, 3/5
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 1]))
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-12)


def test_average_precision_ties_count_together():
    # thresholds 0.9 (P=1, R=1/2) and 0.5 (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3
    ap = average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0]))
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    # order of tied items must not matter
    ap2 = average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 0, 1, 0]))
    assert ap2 == pytest.approx(ap, abs=1e-12)


def test_average_precision_matches_sklearn_random():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = rng.random(50) < 0.3
        t[0] = True
        s = np.round(rng.random(50), 1)  # many ties
        assert average_precision(s, t) == pytest.approx(average_precision_score(t, s), abs=1e-12)


def test_mean_average_precision_matches_sklearn():
    """mAP = scikit-learn's macro average of per-class AP, classes without a positive left out (sklearn would
    count them as 0 with a warning, so they are dropped before asking it)."""
    rng = np.random.default_rng(4)
    for trial in range(10):
        n, c = 40, 7
        targets = rng.random((n, c)) < 0.25
        targets[trial % n, :] = True  # every class has a positive...
        if trial % 2:
            targets[:, 3] = False  # ...except class 3 in odd trials
        scores = np.round(rng.normal(size=(n, c)), 1)  # ties
        has_pos = targets.any(axis=0)
        ref = average_precision_score(targets[:, has_pos], scores[:, has_pos], average="macro")
        assert mean_average_precision(scores, targets) == pytest.approx(ref, abs=1e-12)
        assert mean_average_precision(scores, targets) != pytest.approx(
            average_precision_score(targets[:, has_pos], scores[:, has_pos], average="micro"), abs=1e-6)


def test_map_skips_classes_without_positives_and_top1():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.4, 0.3, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert math.isnan(average_precision(scores[:, 2], targets[:, 2]))
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)
    assert top1_accuracy(scores, np.array([0, 1, 2])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, np.zeros_like(targets))


def test_fit_linear_equals_sklearn_logistic_regression():
    rng = np.random.default_rng(1)
    n, d = 120, 6
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    wd = 0.05
    probe = fit_linear(x, y[:, None], multilabel=True, num_classes=1, weight_decay=wd, max_iter=1000,
                       dtype=torch.float64, tolerance_grad=1e-11)
    xs = (x - x.mean(0)) / x.std(0)
    # sklearn minimises 1/2 ||w||^2 + C sum_i logloss_i; ours mean_i logloss_i + wd/2 ||w||^2
    ref = LogisticRegression(C=1.0 / (n * wd), tol=1e-12, max_iter=10000).fit(xs, y)
    np.testing.assert_allclose(probe.weight[:, 0].numpy(), ref.coef_[0], atol=1e-5)
    np.testing.assert_allclose(probe.bias.numpy(), ref.intercept_, atol=1e-5)


def test_linear_probe_separable_vs_shuffled():
    rng = np.random.default_rng(2)
    c, d = 4, 16
    centres = rng.normal(size=(c, d)) * 3
    def make(n):
        y = rng.integers(0, c, n)
        return centres[y] + rng.normal(size=(n, d)), y
    xtr, ytr = make(200)
    xte, yte = make(100)
    r = linear_probe(xtr, ytr, xte, yte, multilabel=False, num_classes=c)
    assert r["top1"] > 95
    multi_tr, multi_te = np.eye(c)[ytr], np.eye(c)[yte]
    assert linear_probe(xtr, multi_tr, xte, multi_te, multilabel=True, num_classes=c)["map"] > 95
    shuffled = linear_probe(xtr, rng.permutation(multi_tr), xte, multi_te, multilabel=True, num_classes=c)["map"]
    assert shuffled < 50


def test_knn_hand_case():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    test = np.array([[2.0, 0.0]])
    t = 0.5
    # standardised by the train split (mean 2/3, std sqrt(2)/3 per dimension): train (1/sqrt2, -sqrt2),
    # (-sqrt2, 1/sqrt2), (1/sqrt2, 1/sqrt2), test (2 sqrt2, -sqrt2); cosines 0.8, -1, 1/sqrt10; k=2 keeps 0 and 2
    s = knn_scores(train, np.array([0, 1, 1]), test, k=2, temperature=t, multilabel=False, num_classes=2)
    w0, w2 = math.exp(0.8 / t), math.exp((1 / math.sqrt(10)) / t)
    np.testing.assert_allclose(s[0], [w0 / (w0 + w2), w2 / (w0 + w2)], rtol=1e-6)
    multi = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    s = knn_scores(train, multi, test, k=2, temperature=t, multilabel=True, num_classes=3)
    np.testing.assert_allclose(s[0], [1.0, w2 / (w0 + w2), w0 / (w0 + w2)], rtol=1e-6)


def test_knn_clusters():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 8)) * 4
    ytr, yte = rng.integers(0, 3, 90), rng.integers(0, 3, 30)
    xtr, xte = centres[ytr] + rng.normal(size=(90, 8)), centres[yte] + rng.normal(size=(30, 8))
    assert knn_eval(xtr, ytr, xte, yte, multilabel=False, num_classes=3, k=5)["top1"] > 95
    with pytest.raises(ValueError, match="k must be"):
        knn_scores(xtr, ytr, xte, k=0, multilabel=False, num_classes=3)
