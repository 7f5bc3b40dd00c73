"""SER metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from p2pser.learn.metrics import (
    classification_report,
    concordance_cc,
    confusion_matrix,
    macro_f1,
    unweighted_average_recall,
    weighted_accuracy,
)

# 3 classes, imbalanced: class 0 has 6 examples, class 1 has 3, class 2 has 1.
Y_TRUE = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
Y_PRED = [0, 0, 0, 0, 1, 2, 1, 1, 0, 0]


def test_confusion_rows_are_true_columns_predicted():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[4, 1, 1], [1, 2, 0], [1, 0, 0]]
    assert cm.sum() == len(Y_TRUE)


def test_ua_is_mean_recall_over_present_classes():
    # recalls: 4/6, 2/3, 0/1 -> mean 4/9
    assert unweighted_average_recall(Y_TRUE, Y_PRED) == pytest.approx((4 / 6 + 2 / 3 + 0) / 3)


def test_ua_ignores_classes_absent_from_truth_but_wa_counts_everything():
    # class 2 is predicted once but never true: UA averages recalls of classes 0 and 1 only
    assert unweighted_average_recall([0, 0, 1, 1], [0, 2, 1, 1]) == pytest.approx((0.5 + 1.0) / 2)
    assert weighted_accuracy(Y_TRUE, Y_PRED) == pytest.approx(6 / 10)


def test_ua_differs_from_wa_under_imbalance():
    always_majority = [0] * len(Y_TRUE)
    assert weighted_accuracy(Y_TRUE, always_majority) == pytest.approx(0.6)
    assert unweighted_average_recall(Y_TRUE, always_majority) == pytest.approx(1 / 3)


def test_macro_f1_by_hand():
    # class 0: tp 4, support 6, predicted 6 -> 8/12; class 1: tp 2, support 3, predicted 3 -> 4/6;
    # class 2: tp 0 -> 0
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((8 / 12 + 4 / 6 + 0) / 3)


def test_perfect_and_empty():
    assert unweighted_average_recall([1, 0, 2], [1, 0, 2]) == 1.0
    assert macro_f1([1, 0, 2], [1, 0, 2]) == 1.0
    assert unweighted_average_recall([], []) == 0.0
    assert weighted_accuracy([], []) == 0.0


def test_mismatched_lengths_and_out_of_range_labels_raise():
    with pytest.raises(ValueError):
        unweighted_average_recall([0, 1], [0])
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_ccc():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    assert concordance_cc(t, t) == pytest.approx(1.0)
    assert concordance_cc(t, -t) == pytest.approx(-2 * t.var() / (2 * t.var() + (2 * t.mean()) ** 2))
    # a constant offset lowers CCC although Pearson's r stays 1
    assert concordance_cc(t, t + 1) == pytest.approx(2 * t.var() / (2 * t.var() + 1))


def test_classification_report_is_json_ready():
    rep = classification_report(Y_TRUE, Y_PRED, ["neutral", "sad", "angry"])
    assert rep["ua"] == pytest.approx(4 / 9)
    assert rep["wa"] == pytest.approx(0.6)
    assert rep["confusion"] == [[4, 1, 1], [1, 2, 0], [1, 0, 0]]
    assert rep["recall"]["sad"] == pytest.approx(2 / 3)
    assert isinstance(rep["confusion"][0][0], int)
