import numpy as np
import pytest

from hmlstm.boundary_scores import score

TRUTH = np.array([0, 0, 1, 0, 1, 0, 0, 1], bool)


def test_perfect_detector():
    s = score(TRUTH, TRUTH)
    assert (s.precision, s.recall, s.f1, s.rate, s.true_rate) == (1.0, 1.0, 1.0, 3 / 8, 3 / 8)


def test_shifted_by_one_scores_zero():
    s = score(np.roll(TRUTH, 1), TRUTH)
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_empty_detector():
    s = score(np.zeros(8, bool), TRUTH)
    assert (s.precision, s.recall, s.f1, s.rate, s.random_f1) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_all_firing_detector():
    s = score(np.ones(8, bool), TRUTH)
    assert s.precision == 3 / 8 and s.recall == 1.0
    assert s.f1 == pytest.approx(2 * (3 / 8) / (1 + 3 / 8))
    assert s.random_f1 == pytest.approx(s.f1)  # firing everywhere is as good as random


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score(np.ones(3, bool), np.ones(4, bool))


def test_a_score_is_a_frozen_value_and_its_dict_keeps_four_decimals():
    import dataclasses

    s = score(np.array([1, 0, 0], bool), np.array([1, 1, 1], bool))  # precision 1, recall 1/3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.f1 = 1.0  # reports and cards hold these: nothing may change one after the fact
    d = s.to_dict()
    assert d["recall"] == 0.3333 and d["rate"] == 0.3333 and d["f1"] == 0.5
