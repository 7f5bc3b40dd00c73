"""Tasks name their metrics and build every metric key; classification and regression score alike."""

from __future__ import annotations

import numpy as np
import pytest

from p2pser.learn.tasks import CLASSIFICATION, Regression, task_named


def test_classification_keys_and_scores():
    assert (CLASSIFICATION.val_key(), CLASSIFICATION.test_key(), CLASSIFICATION.summary_key("mean")) == \
        ("val_ua", "test_ua", "ua_mean")
    scores = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    report = CLASSIFICATION.score(np.array([0, 1, 2, 2]), scores, ["a", "b", "c"])
    assert report["ua"] == pytest.approx((1 + 1 + 0.5) / 3) and report["wa"] == pytest.approx(0.75)
    assert CLASSIFICATION.test_row(report) == {"test_ua": report["ua"], "test_wa": 0.75,
                                               "test_macro_f1": report["macro_f1"]}


def test_regression_ccc_of_a_perfect_a_constant_and_a_biased_predictor():
    task = task_named("dimensional")
    assert isinstance(task, Regression) and task.val_key() == "val_ccc" and task.summary_key("min") == "ccc_min"
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 3))
    assert task.score(y, y)["ccc"] == pytest.approx(1.0)
    constant = task.score(y, np.zeros_like(y))
    assert constant["ccc_arousal"] == pytest.approx(0.0) and constant["ccc"] == pytest.approx(0.0)
    biased = task.score(y, y + 1.0)  # perfectly correlated but shifted: Pearson 1, CCC well below
    assert biased["pearson_valence"] == pytest.approx(1.0) and biased["ccc_valence"] < 0.8
    assert biased["mae_dominance"] == pytest.approx(1.0)


def test_regression_skips_unlabelled_dimensions():
    y = np.column_stack([np.linspace(-1, 1, 20), np.full(20, np.nan), np.linspace(0, 1, 20)])
    report = Regression().score(y, np.nan_to_num(y))
    assert "ccc_valence" not in report and report["ccc"] == pytest.approx(1.0)
