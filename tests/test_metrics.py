"""Metric checks against hand-computed counts."""

from __future__ import annotations

import pytest

from bert_ft.metrics import (
    classification_report_dict,
    confusion_matrix,
    format_classification_report,
    format_confusion,
    format_table,
    relation_type,
    semeval_official_score,
)

CE12, CE21 = "Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)"
CW12, CW21 = "Component-Whole(e1,e2)", "Component-Whole(e2,e1)"


def test_relation_type_strips_direction() -> None:
    assert relation_type(CE21) == "Cause-Effect"
    assert relation_type("Other") == "Other"


def test_semeval_official_score_hand_example() -> None:
    gold = [CE12, CE21, CE12, "Other", CW21, "Other", CW12]
    pred = [CE12, CE12, "Other", CW12, CW21, "Other", CE21]
    # row 1: exact hit for Cause-Effect
    # row 2: right type, wrong direction -> a Cause-Effect prediction and a Cause-Effect gold, no hit
    # row 3: gold Cause-Effect predicted Other -> lowers Cause-Effect recall only
    # row 4: gold Other predicted Component-Whole -> lowers Component-Whole precision only
    # row 5: exact hit for Component-Whole
    # row 6: Other/Other -> counts for accuracy only
    # row 7: gold Component-Whole predicted Cause-Effect
    #
    # Cause-Effect:    hits = 1 (row 1); predicted type CE = rows 1,2,7 = 3; gold type CE = rows 1,2,3 = 3
    #                  P = 1/3, R = 1/3, F1 = 2*(1/9)/(2/3) = 1/3
    # Component-Whole: hits = 1 (row 5); predicted type CW = rows 4,5 = 2;   gold type CW = rows 5,7 = 2
    #                  P = 1/2, R = 1/2, F1 = 1/2
    # macro F1 = (1/3 + 1/2) / 2 = 5/12
    # micro:  hits 2, predicted 3+2 = 5, gold 3+2 = 5 -> P = R = F1 = 2/5
    # accuracy: exact matches rows 1,5,6 = 3/7
    result = semeval_official_score(gold, pred)
    assert set(result["per_type"]) == {"Cause-Effect", "Component-Whole"}  # Other excluded
    cause_effect = result["per_type"]["Cause-Effect"]
    assert cause_effect["precision"] == pytest.approx(1 / 3)
    assert cause_effect["recall"] == pytest.approx(1 / 3)
    assert cause_effect["f1"] == pytest.approx(1 / 3)
    assert cause_effect["support"] == 3
    component_whole = result["per_type"]["Component-Whole"]
    assert component_whole["precision"] == pytest.approx(1 / 2)
    assert component_whole["recall"] == pytest.approx(1 / 2)
    assert component_whole["f1"] == pytest.approx(1 / 2)
    assert component_whole["support"] == 2
    assert result["macro_f1"] == pytest.approx(5 / 12)
    assert result["micro_precision"] == pytest.approx(2 / 5)
    assert result["micro_recall"] == pytest.approx(2 / 5)
    assert result["micro_f1"] == pytest.approx(2 / 5)
    assert result["accuracy"] == pytest.approx(3 / 7)


def test_semeval_wrong_direction_is_never_a_hit() -> None:
    gold = [CE12, CE12, CE21, CE21]
    pred = [CE21, CE21, CE12, CE12]
    # Every prediction has the right type but the wrong direction:
    # hits = 0, predicted type CE = 4, gold type CE = 4 -> P = R = F1 = 0.
    # (Ignoring direction would wrongly give 4/4 = 1.0.)
    result = semeval_official_score(gold, pred)
    assert result["per_type"]["Cause-Effect"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 4}
    assert result["macro_f1"] == 0.0
    assert result["micro_f1"] == 0.0
    assert result["accuracy"] == 0.0


def test_semeval_unequal_precision_and_recall() -> None:
    gold = [CE12, CE12, CE21, "Other", "Other"]
    pred = [CE12, CE12, CE12, CE12, "Other"]
    # Cause-Effect: hits = rows 1,2 = 2; predicted type CE = rows 1-4 = 4 (row 3 wrong direction,
    #               row 4 gold Other); gold type CE = rows 1-3 = 3
    #               P = 2/4 = 1/2, R = 2/3, F1 = 2*(1/3)/(7/6) = 4/7; macro = 4/7 (only one type)
    # accuracy: rows 1,2,5 = 3/5
    result = semeval_official_score(gold, pred)
    assert result["per_type"]["Cause-Effect"]["precision"] == pytest.approx(1 / 2)
    assert result["per_type"]["Cause-Effect"]["recall"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx(4 / 7)
    assert result["accuracy"] == pytest.approx(3 / 5)

    gold = [CE12, CE12, CE12, CW12]
    pred = [CE12, "Other", "Other", CE12]
    # Cause-Effect: hits 1; predicted CE = rows 1,4 = 2; gold CE = 3 -> P = 1/2, R = 1/3,
    #               F1 = 2*(1/6)/(5/6) = 2/5
    # Component-Whole: hits 0; predicted 0; gold 1 -> P = 0 (empty denominator), R = 0, F1 = 0
    # macro = (2/5 + 0) / 2 = 1/5; micro: hits 1, predicted 2, gold 4 -> P 1/2, R 1/4, F1 = 2*(1/8)/(3/4) = 1/3
    result = semeval_official_score(gold, pred)
    assert result["per_type"]["Cause-Effect"]["f1"] == pytest.approx(2 / 5)
    assert result["per_type"]["Component-Whole"]["f1"] == 0.0
    assert result["macro_f1"] == pytest.approx(1 / 5)
    assert result["micro_precision"] == pytest.approx(1 / 2)
    assert result["micro_recall"] == pytest.approx(1 / 4)
    assert result["micro_f1"] == pytest.approx(1 / 3)
    assert result["accuracy"] == pytest.approx(1 / 4)


def test_semeval_other_is_excluded_and_custom_other_label() -> None:
    # Only Other is ever right, so the relation macro F1 stays 0 even though accuracy is high.
    gold = ["Other", "Other", "Other", CE12]
    pred = ["Other", "Other", "Other", "Other"]
    result = semeval_official_score(gold, pred)
    assert "Other" not in result["per_type"]
    assert result["macro_f1"] == 0.0
    assert result["accuracy"] == pytest.approx(3 / 4)

    result = semeval_official_score(["no_relation", "A(e1,e2)"], ["no_relation", "A(e1,e2)"], other_label="no_relation")
    assert list(result["per_type"]) == ["A"]
    assert result["macro_f1"] == 1.0


def test_semeval_type_only_in_predictions_is_not_averaged() -> None:
    # The official Perl scorer averages over the relation types present in GOLD only.
    gold = [CE12, "Other"]
    pred = [CE12, CW12]
    # Cause-Effect: hits 1, predicted 1, gold 1 -> F1 1.
    # Component-Whole is only predicted (gold Other -> CW): not a gold type, so it is not in per_type, not in the
    # macro average (macro = 1/1 = 1, not (1 + 0)/2) and not pooled into micro (micro P = 1/1, not 1/2).
    # Accuracy still counts the row as wrong: 1/2.
    result = semeval_official_score(gold, pred)
    assert list(result["per_type"]) == ["Cause-Effect"]
    assert result["macro_f1"] == pytest.approx(1.0)
    assert result["micro_precision"] == pytest.approx(1.0)
    assert result["micro_recall"] == pytest.approx(1.0)
    assert result["micro_f1"] == pytest.approx(1.0)
    assert result["accuracy"] == pytest.approx(1 / 2)

    # A gold type's precision still counts every prediction of that type, even for gold Other rows.
    gold = [CE12, "Other", "Other"]
    pred = [CE12, CE21, CW12]
    # Cause-Effect: hits 1, predicted 2 (rows 1, 2), gold 1 -> P 1/2, R 1, F1 2/3; Component-Whole ignored.
    # micro: hits 1, predicted 2, gold 1 -> P 1/2, R 1, F1 2/3; accuracy 1/3.
    result = semeval_official_score(gold, pred)
    assert list(result["per_type"]) == ["Cause-Effect"]
    assert result["macro_f1"] == pytest.approx(2 / 3)
    assert result["micro_precision"] == pytest.approx(1 / 2)
    assert result["micro_f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(1 / 3)


def test_semeval_no_relation_in_gold_gives_zero_not_an_error() -> None:
    result = semeval_official_score(["Other", "Other"], [CE12, "Other"])
    assert result["per_type"] == {}
    assert result["macro_f1"] == 0.0
    assert result["micro_f1"] == 0.0
    assert result["accuracy"] == pytest.approx(1 / 2)


def test_semeval_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        semeval_official_score([CE12], [])


def test_classification_report_hand_counts() -> None:
    gold = ["a", "a", "b", "b", "b", "c"]
    pred = ["a", "b", "b", "c", "c", "c"]
    # a: hits 1, predicted 1, gold 2 -> P 1,   R 1/2, F1 2/3
    # b: hits 1, predicted 2, gold 3 -> P 1/2, R 1/3, F1 2*(1/6)/(5/6) = 2/5
    # c: hits 1, predicted 3, gold 1 -> P 1/3, R 1,   F1 2*(1/3)/(4/3) = 1/2
    # accuracy 3/6; macro P = (1 + 1/2 + 1/3)/3 = 11/18; macro R = (1/2 + 1/3 + 1)/3 = 11/18
    # macro F1 = (2/3 + 2/5 + 1/2)/3 = 47/90; weighted F1 = (2*2/3 + 3*2/5 + 1*1/2)/6 = 91/180
    report = classification_report_dict(gold, pred, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 2 / 5, "support": 3})
    assert report["per_class"]["c"] == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1})
    assert report["macro_precision"] == pytest.approx(11 / 18)
    assert report["macro_recall"] == pytest.approx(11 / 18)
    assert report["macro_f1"] == pytest.approx(47 / 90)
    assert report["weighted_f1"] == pytest.approx(91 / 180)


def test_classification_report_label_without_examples() -> None:
    report = classification_report_dict(["a", "a"], ["a", "a"], ["a", "d"])
    # d never appears: all its scores are 0 (no division error) and it halves the macro average.
    assert report["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["macro_f1"] == pytest.approx(0.5)
    assert report["weighted_f1"] == pytest.approx(1.0)


def test_confusion_matrix_rows_gold_columns_pred() -> None:
    gold = ["a", "a", "b", "b", "b", "c"]
    pred = ["a", "b", "b", "c", "c", "c"]
    assert confusion_matrix(gold, pred, ["a", "b", "c"]) == [
        [1, 1, 0],  # gold a: predicted a once, b once
        [0, 1, 2],  # gold b: predicted b once, c twice
        [0, 0, 1],  # gold c: predicted c once
    ]
    # Labels outside the list are skipped.
    assert confusion_matrix(["a", "z"], ["a", "a"], ["a"]) == [[1]]


def test_format_table_aligns_columns() -> None:
    text = format_table([["alpha", 1, 0.5], ["b", 123, 0.25]], ["name", "count", "score"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "count", "score"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["alpha", "1", "0.5000"]
    assert lines[3].split() == ["b", "123", "0.2500"]
    # Numbers are right-aligned, so each column ends at the same offset.
    assert lines[2].index("0.5000") + 6 == lines[3].index("0.2500") + 6 == len(lines[2])
    assert lines[2].index("1 ") == lines[3].index("123") + 2


def test_format_confusion_and_report() -> None:
    labels = ["a", "b", "c"]
    gold = ["a", "a", "b", "b", "b", "c"]
    pred = ["a", "b", "b", "c", "c", "c"]
    confusion_text = format_confusion(confusion_matrix(gold, pred, labels), labels)
    lines = confusion_text.splitlines()
    assert lines[0].split()[-3:] == labels
    assert lines[3].split() == ["b", "0", "1", "2"]

    report_text = format_classification_report(classification_report_dict(gold, pred, labels))
    assert "accuracy" in report_text and "0.5000" in report_text
    assert any(line.split()[:2] == ["b", "0.5000"] for line in report_text.splitlines())
    assert f"{47 / 90:.4f}" in report_text
