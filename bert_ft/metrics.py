"""Classification metrics and plain-text report formatting (pure Python, no torch).

All scores are fractions in [0, 1], not percentages. Any ratio with a zero
denominator is defined as 0.0 so empty classes never raise or produce NaN.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

# SemEval-2010 Task 8 labels carry the argument order as a suffix, e.g. "Cause-Effect(e2,e1)".
_DIRECTION_SUFFIX = re.compile(r"\((?:e1,e2|e2,e1)\)$")


def _safe_divide(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _safe_divide(2 * precision * recall, precision + recall)


def _check_same_length(gold: list[str], pred: list[str]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")


def relation_type(label: str) -> str:
    """Strip a SemEval direction suffix: "Cause-Effect(e2,e1)" -> "Cause-Effect"; "Other" -> "Other"."""
    return _DIRECTION_SUFFIX.sub("", label)


def semeval_official_score(gold: list[str], pred: list[str], other_label: str = "Other") -> dict:
    """Official SemEval-2010 Task 8 score: "(9+1)-way evaluation taking directionality into account".

    For each relation type R (direction suffix removed, `other_label` excluded):
      TP_R = predictions equal to the gold label exactly (direction included) whose type is R
      P_R  = TP_R / #predictions whose type is R (wrong-direction ones included)
      R_R  = TP_R / #gold examples whose type is R
    macro_f1 (the official number) is the unweighted mean of F1_R over the relation types present in GOLD,
    exactly as the official Perl scorer (semeval2010_task8_scorer-v1.2.pl) does: it loops over the answer-key
    labels and divides by their count minus Other. On SemEval data all 9 types occur in gold, so this is the
    official 9-type average. A predicted type absent from gold is neither averaged nor pooled: such predictions
    lower no relation's score, but they are still wrong for accuracy. Micro scores pool the same per-type counts
    over the same gold types (also as the scorer does); accuracy is exact-match over all examples, `other_label`
    included. With no relation type in gold every average is 0.0 (the Perl scorer would divide by zero).

    Returns {"macro_f1", "per_type": {type: {"precision", "recall", "f1", "support"}},
    "micro_precision", "micro_recall", "micro_f1", "accuracy"}.
    """
    _check_same_length(gold, pred)
    gold_types = [relation_type(label) for label in gold]
    pred_types = [relation_type(label) for label in pred]
    types = sorted(set(gold_types) - {other_label})  # gold types only, like the official scorer

    exact_hits_by_type = Counter(g_type for g, p, g_type in zip(gold, pred, gold_types) if g == p)
    predicted_by_type = Counter(pred_types)
    gold_by_type = Counter(gold_types)

    per_type: dict[str, dict[str, float]] = {}
    for type_name in types:
        precision = _safe_divide(exact_hits_by_type[type_name], predicted_by_type[type_name])
        recall = _safe_divide(exact_hits_by_type[type_name], gold_by_type[type_name])
        per_type[type_name] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": gold_by_type[type_name],
        }

    total_hits = sum(exact_hits_by_type[type_name] for type_name in types)
    micro_precision = _safe_divide(total_hits, sum(predicted_by_type[type_name] for type_name in types))
    micro_recall = _safe_divide(total_hits, sum(gold_by_type[type_name] for type_name in types))
    return {
        "macro_f1": _safe_divide(sum(scores["f1"] for scores in per_type.values()), len(per_type)),
        "per_type": per_type,
        "micro_precision": micro_precision,
        "micro_recall": micro_recall,
        "micro_f1": _f1(micro_precision, micro_recall),
        "accuracy": _safe_divide(sum(g == p for g, p in zip(gold, pred)), len(gold)),
    }


def classification_report_dict(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Per-class precision/recall/F1/support plus accuracy and macro/weighted averages over `labels`.

    Accuracy is exact match over all examples, including labels outside `labels`.
    Returns {"accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1",
    "per_class": {label: {"precision", "recall", "f1", "support"}}} with per_class in `labels` order.
    """
    _check_same_length(gold, pred)
    hits = Counter(g for g, p in zip(gold, pred) if g == p)
    predicted_counts = Counter(pred)
    gold_counts = Counter(gold)

    per_class: dict[str, dict[str, float]] = {}
    for label in labels:
        precision = _safe_divide(hits[label], predicted_counts[label])
        recall = _safe_divide(hits[label], gold_counts[label])
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": gold_counts[label],
        }

    num_labels = len(labels)
    total_support = sum(scores["support"] for scores in per_class.values())
    return {
        "accuracy": _safe_divide(sum(g == p for g, p in zip(gold, pred)), len(gold)),
        "macro_precision": _safe_divide(sum(scores["precision"] for scores in per_class.values()), num_labels),
        "macro_recall": _safe_divide(sum(scores["recall"] for scores in per_class.values()), num_labels),
        "macro_f1": _safe_divide(sum(scores["f1"] for scores in per_class.values()), num_labels),
        "weighted_f1": _safe_divide(
            sum(scores["f1"] * scores["support"] for scores in per_class.values()), total_support
        ),
        "per_class": per_class,
    }


def confusion_matrix(gold: list[str], pred: list[str], labels: list[str]) -> list[list[int]]:
    """Counts with rows = gold label, columns = predicted label, both in `labels` order.

    Pairs where either label is not in `labels` are not counted.
    """
    _check_same_length(gold, pred)
    index_of = {label: index for index, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for gold_label, pred_label in zip(gold, pred):
        if gold_label in index_of and pred_label in index_of:
            matrix[index_of[gold_label]][index_of[pred_label]] += 1
    return matrix


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: list[list], headers: list[str]) -> str:
    """Fixed-width text table; numbers right-aligned, floats with 4 decimals, text left-aligned."""
    text_rows = [[_format_cell(cell) for cell in row] for row in rows]
    num_columns = max([len(headers)] + [len(row) for row in text_rows])
    padded_headers = list(headers) + [""] * (num_columns - len(headers))
    text_rows = [row + [""] * (num_columns - len(row)) for row in text_rows]
    widths = [
        max([len(padded_headers[column])] + [len(row[column]) for row in text_rows]) for column in range(num_columns)
    ]
    # Decide alignment per column from the raw values: a column of numbers reads best right-aligned.
    numeric_columns = [
        bool(rows) and all(
            isinstance(row[column], (int, float)) and not isinstance(row[column], bool)
            for row in rows
            if column < len(row)
        )
        for column in range(num_columns)
    ]

    def render(cells: list[str]) -> str:
        parts = [
            cell.rjust(width) if is_numeric else cell.ljust(width)
            for cell, width, is_numeric in zip(cells, widths, numeric_columns)
        ]
        return "  ".join(parts).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([render(padded_headers), separator] + [render(row) for row in text_rows])


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """Confusion matrix as a text table: rows gold, columns predicted."""
    rows = [[label] + list(counts) for label, counts in zip(labels, matrix)]
    return format_table(rows, ["gold \\ pred"] + list(labels))


def format_classification_report(report: dict) -> str:
    """Text form of `classification_report_dict`: per-class table, then accuracy and averages."""
    rows = [
        [label, scores["precision"], scores["recall"], scores["f1"], scores["support"]]
        for label, scores in report["per_class"].items()
    ]
    table = format_table(rows, ["label", "precision", "recall", "f1", "support"])
    summary = [
        f"accuracy     {report['accuracy']:.4f}",
        f"macro avg    precision {report['macro_precision']:.4f}  recall {report['macro_recall']:.4f}"
        f"  f1 {report['macro_f1']:.4f}",
        f"weighted f1  {report['weighted_f1']:.4f}",
    ]
    return "\n".join([table, ""] + summary)


def relation_f1(gold: list[str], pred: list[str], negative: str | None) -> dict:
    """Relation scores for any label set: per relation type P/R/F1, their macro average (the headline) and the
    pooled micro scores, over the types that occur in gold or in the predictions, the `negative` label excluded
    (None: every label is a relation). A label with a SemEval-style direction suffix ("X(e2,e1)") is of type X and
    a hit needs the exact label, direction included (precision counts wrong-direction predictions of X against X);
    without suffixes a type is a label. Accuracy is exact-match over all examples, the negative label included.

    Returns {"macro_f1", "per_type": {type: {"precision", "recall", "f1", "support"}}, "micro_precision",
    "micro_recall", "micro_f1", "accuracy"}."""
    _check_same_length(gold, pred)
    gold_types = [relation_type(label) for label in gold]
    pred_types = [relation_type(label) for label in pred]
    types = sorted((set(gold_types) | set(pred_types)) - {negative})
    hits = Counter(g_type for g, p, g_type in zip(gold, pred, gold_types) if g == p)
    predicted, in_gold = Counter(pred_types), Counter(gold_types)
    per_type = {}
    for type_name in types:
        precision = _safe_divide(hits[type_name], predicted[type_name])
        recall = _safe_divide(hits[type_name], in_gold[type_name])
        per_type[type_name] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                               "support": in_gold[type_name]}
    total_hits = sum(hits[type_name] for type_name in types)
    micro_precision = _safe_divide(total_hits, sum(predicted[type_name] for type_name in types))
    micro_recall = _safe_divide(total_hits, sum(in_gold[type_name] for type_name in types))
    return {
        "macro_f1": _safe_divide(sum(scores["f1"] for scores in per_type.values()), len(per_type)),
        "per_type": per_type,
        "micro_precision": micro_precision,
        "micro_recall": micro_recall,
        "micro_f1": _f1(micro_precision, micro_recall),
        "accuracy": _safe_divide(sum(g == p for g, p in zip(gold, pred)), len(gold)),
    }
