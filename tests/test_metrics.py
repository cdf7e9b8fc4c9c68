"""Metrics from hand-made confusion matrices (rows: true label, columns: predicted label)."""
from __future__ import annotations

import pytest

from dist_finetune.metrics import format_table, from_confusion


def test_binary_by_hand():
    m = from_confusion([[50, 10],
                        [5, 35]])
    assert m.examples == 100 and m.accuracy == 0.85
    ham, spam = m.per_class
    assert (ham.precision, ham.recall, ham.support) == (50 / 55, 50 / 60, 60)
    assert (spam.precision, spam.recall, spam.support) == (35 / 45, 35 / 40, 40)
    assert ham.f1 == pytest.approx(2 * 50 / (2 * 50 + 10 + 5))  # F1 = 2TP / (2TP + FP + FN)
    assert spam.f1 == pytest.approx(2 * 35 / (2 * 35 + 5 + 10))
    assert m.macro.precision == pytest.approx((50 / 55 + 35 / 45) / 2)
    assert m.macro.f1 == pytest.approx((ham.f1 + spam.f1) / 2)
    assert m.weighted.recall == pytest.approx(0.85)  # support-weighted recall is accuracy
    assert m.weighted.f1 == pytest.approx((60 * ham.f1 + 40 * spam.f1) / 100)
    assert m.macro.support == m.weighted.support == 100


def test_unpredicted_and_absent_classes_score_zero():
    # class 1 is never predicted; class 2 never occurs
    m = from_confusion([[3, 0, 1],
                        [2, 0, 0],
                        [0, 0, 0]])
    assert m.accuracy == 3 / 6
    assert m.per_class[1].precision == 0.0 and m.per_class[1].recall == 0.0 and m.per_class[1].f1 == 0.0
    assert m.per_class[2].precision == 0.0 and m.per_class[2].recall == 0.0 and m.per_class[2].support == 0
    assert m.per_class[0].precision == 3 / 5 and m.per_class[0].recall == 3 / 4
    assert m.macro.recall == pytest.approx((3 / 4) / 3)  # absent classes count in the macro mean
    assert m.weighted.recall == pytest.approx(3 / 6)


def test_perfect_and_empty():
    perfect = from_confusion([[4, 0], [0, 6]])
    assert perfect.accuracy == 1.0 and perfect.macro.f1 == 1.0 and perfect.weighted.f1 == 1.0
    empty = from_confusion([[0, 0], [0, 0]])
    assert empty.examples == 0 and empty.accuracy == 0.0 and empty.macro.f1 == 0.0


def test_float_counts_from_an_all_reduce_are_integers():
    m = from_confusion([[2.0, 1.0], [0.0, 3.0]])
    assert m.confusion == ((2, 1), (0, 3)) and all(isinstance(v, int) for row in m.confusion for v in row)


def test_non_square_is_refused():
    with pytest.raises(ValueError, match="square"):
        from_confusion([[1, 2], [3]])


def test_to_dict_names_labels_and_table_shows_them():
    m = from_confusion([[50, 10], [5, 35]])
    d = {"loss": 0.25, **m.to_dict(["ham", "spam"])}
    assert [c["label"] for c in d["per_class"]] == ["ham", "spam"]
    assert d["confusion_matrix"] == [[50, 10], [5, 35]]
    assert set(d["macro"]) == {"precision", "recall", "f1", "support"}
    table = format_table(d, ["ham", "spam"])
    assert "accuracy 0.8500" in table and "macro avg" in table and "weighted avg" in table
    assert any(line.split() == ["ham", "50", "10"] for line in table.splitlines())
    with pytest.raises(ValueError):
        m.to_dict(["only-one"])
