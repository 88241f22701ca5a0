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
    return _relation_scores(gold, pred, sorted(set(gold_types) - {other_label}))  # gold types only, like the scorer


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
    types = {relation_type(label) for label in gold} | {relation_type(label) for label in pred}
    return _relation_scores(gold, pred, sorted(types - {negative}))


def _relation_scores(gold: list[str], pred: list[str], types: list[str]) -> dict:
    """Per relation type P/R/F1 over `types` (a hit is the exact label, direction included; precision counts every
    prediction of the type), their macro average, the micro scores pooled over the same types, and exact-match
    accuracy over all examples: what both semeval_official_score and relation_f1 return."""
    gold_types = [relation_type(label) for label in gold]
    hits = Counter(g_type for g, p, g_type in zip(gold, pred, gold_types) if g == p)
    predicted, in_gold = Counter(relation_type(label) for label in pred), Counter(gold_types)
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


# ------------------------------------------------------------------------------------- multi-label

def multi_label_report_dict(gold: list[list[str]], pred: list[list[str]], labels: list[str]) -> dict:
    """Multi-label scores of label sets `gold` and `pred` (one list per example) over `labels`.

    micro_* pool the (example, label) decisions of every label; macro_* average the per-label scores over
    `labels`; samples_f1 averages each example's F1 of its predicted set against its gold set, an example whose
    gold and predicted sets are both empty scoring 1 (it is right: nothing to find, nothing claimed; scikit-learn's
    f1_score(average="samples", zero_division=1)); subset_accuracy counts exactly right sets; hamming_loss is the
    share of wrong (example, label) decisions; label cardinality is the mean set size (gold and predicted).
    Per-label scores with a zero denominator are 0 (scikit-learn's zero_division=0).
    """
    _check_same_length(gold, pred)
    gold_sets, pred_sets = [set(items) for items in gold], [set(items) for items in pred]
    per_label: dict[str, dict[str, float]] = {}
    total_tp = total_fp = total_fn = 0
    for label in labels:
        tp = sum(1 for g, p in zip(gold_sets, pred_sets) if label in g and label in p)
        fp = sum(1 for g, p in zip(gold_sets, pred_sets) if label not in g and label in p)
        fn = sum(1 for g, p in zip(gold_sets, pred_sets) if label in g and label not in p)
        total_tp, total_fp, total_fn = total_tp + tp, total_fp + fp, total_fn + fn
        precision, recall = _safe_divide(tp, tp + fp), _safe_divide(tp, tp + fn)
        per_label[label] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                            "support": tp + fn}
    known = set(labels)
    samples = []
    for g, p in zip(gold_sets, pred_sets):
        g, p = g & known, p & known
        denominator = len(g) + len(p)
        samples.append(1.0 if not denominator else 2 * len(g & p) / denominator)
    count = len(gold_sets)
    micro_precision = _safe_divide(total_tp, total_tp + total_fp)
    micro_recall = _safe_divide(total_tp, total_tp + total_fn)
    return {
        "micro_precision": micro_precision, "micro_recall": micro_recall,
        "micro_f1": _f1(micro_precision, micro_recall),
        "macro_precision": _safe_divide(sum(s["precision"] for s in per_label.values()), len(labels)),
        "macro_recall": _safe_divide(sum(s["recall"] for s in per_label.values()), len(labels)),
        "macro_f1": _safe_divide(sum(s["f1"] for s in per_label.values()), len(labels)),
        "samples_f1": _safe_divide(sum(samples), count),
        "subset_accuracy": _safe_divide(sum(g & known == p & known for g, p in zip(gold_sets, pred_sets)), count),
        "hamming_loss": _safe_divide(sum(len((g ^ p) & known) for g, p in zip(gold_sets, pred_sets)),
                                     count * len(labels)),
        "label_cardinality": _safe_divide(sum(len(g & known) for g in gold_sets), count),
        "predicted_label_cardinality": _safe_divide(sum(len(p & known) for p in pred_sets), count),
        "per_label": per_label,
    }


def format_multi_label_report(report: dict) -> str:
    rows = [[label, s["precision"], s["recall"], s["f1"], s["support"]] for label, s in report["per_label"].items()]
    table = format_table(rows, ["label", "precision", "recall", "f1", "support"])
    summary = [
        f"micro avg        precision {report['micro_precision']:.4f}  recall {report['micro_recall']:.4f}  "
        f"f1 {report['micro_f1']:.4f}",
        f"macro avg        precision {report['macro_precision']:.4f}  recall {report['macro_recall']:.4f}  "
        f"f1 {report['macro_f1']:.4f}",
        f"samples f1       {report['samples_f1']:.4f}",
        f"subset accuracy  {report['subset_accuracy']:.4f}   (the whole label set right)",
        f"hamming loss     {report['hamming_loss']:.4f}   (share of wrong example x label decisions)",
        f"label cardinality  gold {report['label_cardinality']:.3f}, predicted "
        f"{report['predicted_label_cardinality']:.3f} labels per example",
    ]
    return "\n".join([table, ""] + summary)


def f1_optimal_threshold(probabilities: list[float], gold: list[bool], default: float = 0.5) -> tuple[float, float]:
    """(threshold, F1 at it) of one label: the cut that maximises F1 of `probability >= threshold` against `gold`.

    Candidate cuts lie at each distinct probability; the chosen cut is placed midway between the lowest
    probability it predicts positive and the next lower distinct probability (0 below the lowest), so that a
    validation example's probability never sits exactly on it. Among equal F1s the highest cut wins (fewest
    positives). A label with no gold positive keeps `default` (F1 is 0 at every cut)."""
    positives = sum(1 for item in gold if item)
    if not positives:
        return default, 0.0
    pairs = sorted(zip(probabilities, gold), key=lambda pair: -pair[0])
    best_f1, best_cut, tp, fp, index = -1.0, default, 0, 0, 0
    while index < len(pairs):
        value = pairs[index][0]
        while index < len(pairs) and pairs[index][0] == value:  # every example tied at this probability
            tp, fp = (tp + 1, fp) if pairs[index][1] else (tp, fp + 1)
            index += 1
        f1 = 2 * tp / (2 * tp + fp + (positives - tp))
        if f1 > best_f1:
            lower = pairs[index][0] if index < len(pairs) else 0.0
            best_f1, best_cut = f1, (value + lower) / 2
    return float(best_cut), best_f1


# ------------------------------------------------------------------------------------- regression

def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (what Spearman's correlation ranks by)."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's r; 0.0 when either side is constant (undefined there)."""
    if len(x) < 2:
        return 0.0
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = (sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y)) ** 0.5
    return covariance / spread if spread else 0.0


def regression_report_dict(gold: list[float], pred: list[float]) -> dict:
    """Pearson and Spearman correlation, MSE, RMSE, MAE and R^2 (1 - residual / total sum of squares; 0.0 for
    constant gold) of predictions `pred` against targets `gold`, in the targets' own units; plus the gold and
    predicted mean and standard deviation."""
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    count = len(gold)
    if not count:
        return {key: 0.0 for key in ("pearson", "spearman", "mse", "rmse", "mae", "r2")}
    errors = [p - g for g, p in zip(gold, pred)]
    mse = sum(e * e for e in errors) / count
    mean_gold = sum(gold) / count
    total = sum((g - mean_gold) ** 2 for g in gold)
    mean_pred = sum(pred) / count
    return {
        "pearson": pearson(gold, pred),
        "spearman": pearson(_ranks(gold), _ranks(pred)),
        "mse": mse, "rmse": mse ** 0.5, "mae": sum(abs(e) for e in errors) / count,
        "r2": 1 - mse * count / total if total else 0.0,
        "gold_mean": mean_gold, "gold_std": (total / count) ** 0.5,
        "pred_mean": mean_pred, "pred_std": (sum((p - mean_pred) ** 2 for p in pred) / count) ** 0.5,
    }


def format_regression_report(report: dict) -> str:
    return "\n".join([
        f"pearson   {report['pearson']:.4f}",
        f"spearman  {report['spearman']:.4f}",
        f"mse       {report['mse']:.6g}",
        f"rmse      {report['rmse']:.6g}",
        f"mae       {report['mae']:.6g}",
        f"r2        {report['r2']:.4f}",
        f"gold      mean {report['gold_mean']:.6g}, std {report['gold_std']:.6g}",
        f"predicted mean {report['pred_mean']:.6g}, std {report['pred_std']:.6g}",
    ])
