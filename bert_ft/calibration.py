"""Confidence calibration, task-agnostic: the expected calibration error and temperature scaling.

A task says what a confidence is (`Task.confidences`, also reported in `Evaluation.confidences`: one (confidence,
correct) pair per prediction; for NER each predicted entity's span probability, for classification the predicted
class's probability). By default (objective "confidence") the temperature is fitted on the validation set to what
is judged: the log loss (binary negative log-likelihood) of "the prediction is correct" given its confidence at T,
the validation outputs decoded again at every T tried (`fit_temperature_to_confidences`). A positive temperature
never changes a prediction, so the set of predictions is fixed and only their confidences move. The search: a grid
over log T, then a golden-section search in the bracket around the grid's best point.

Objective "label", and the fallback of "confidence" where the task gives no confidences, where validation has fewer
than ten right or ten wrong predictions, or where the log loss has no minimum inside the temperature range
(`fit_temperature`): T minimises the negative log-likelihood of the gold labels that the head defines
(`Head.calibration_nll`; for a CRF every potential is divided by T): convex in 1/T, a golden-section search over
log T. It needs the same minimum (ten right and ten wrong arg-max predictions of the labels); below it nothing is
fitted (`NotFitted`, whose reason the report prints) and the confidences stay the raw ones.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .inference import decode_batches

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)
GRID_POINTS = 16  # log T grid of the confidence fit: neighbours a factor 1.49 apart over TEMPERATURE_RANGE
MIN_EACH_OUTCOME = 10  # right and wrong predictions the confidence fit needs at least (events per parameter)
PROBABILITY_FLOOR = 1e-12  # the log loss clips confidences to [floor, 1 - floor] (a float32 1.0 can be wrong)
OBJECTIVES = {"confidence": "the log loss of its predictions' confidences (correct or not)",
              "label": "the negative log-likelihood of the gold labels"}


def expected_calibration_error(pairs: Sequence[tuple[float, bool]], bins: int = ECE_BINS) -> float | None:
    """ECE over `bins` equal-width confidence bins ((k/bins, (k+1)/bins], 0 in the first): the mean over
    predictions of |accuracy - mean confidence| of their bin, weighted by the bin's size. None without pairs."""
    if not pairs:
        return None
    counts, confidence_sums, correct_sums = [0] * bins, [0.0] * bins, [0] * bins
    for confidence, correct in pairs:
        index = min(max(math.ceil(float(confidence) * bins) - 1, 0), bins - 1)
        counts[index] += 1
        confidence_sums[index] += float(confidence)
        correct_sums[index] += bool(correct)
    return sum(abs(correct_sums[index] - confidence_sums[index]) for index in range(bins)) / len(pairs)


def golden_section_minimum(function: Callable[[float], float], low: float, high: float,
                           iterations: int = 40) -> float:
    """The minimiser of a unimodal `function` on [low, high]."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = function(c), function(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = function(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = function(d)
    return (a + b) / 2


def log_loss(pairs: Sequence[tuple[float, bool]]) -> float:
    """Mean binary negative log-likelihood of `correct` given `confidence` over (confidence, correct) pairs: a
    proper scoring rule for the confidences, what `fit_temperature_to_confidences` minimises."""
    total = 0.0
    for confidence, correct in pairs:
        probability = min(max(float(confidence), PROBABILITY_FLOOR), 1.0 - PROBABILITY_FLOOR)
        total -= math.log(probability if correct else 1.0 - probability)
    return total / len(pairs) if pairs else float("nan")


def grid_then_golden_minimum(function: Callable[[float], float], low: float, high: float,
                             points: int = GRID_POINTS, iterations: int = 24) -> float:
    """The minimiser of `function` on [low, high]: the best of `points` evenly spaced values, refined by a
    golden-section search between its two neighbours (robust to an objective that is unimodal only near its
    minimum). Evaluates `function` points + iterations + 2 times."""
    grid = [low + (high - low) * index / (points - 1) for index in range(points)]
    values = [function(x) for x in grid]
    best = min(range(points), key=lambda index: (values[index], index))
    return golden_section_minimum(function, grid[max(best - 1, 0)], grid[min(best + 1, points - 1)], iterations)


def fit_temperature_to_confidences(confidences_at: Callable[[float], Sequence[tuple[float, bool]] | None]
                                   ) -> dict | None:
    """Fit the temperature to what calibration is judged on: `confidences_at(T)` gives the validation set's
    (confidence, correct) pairs with confidences at temperature T (the same predictions at every T); T minimises
    their log loss.

    Returns {"temperature", "objective": "confidence", "nll_before", "nll_after" (log loss at 1 and at T),
    "labels" (how many pairs)} or None where it cannot be fitted reliably: fewer than MIN_EACH_OUTCOME right or
    wrong predictions (all right or all wrong, the loss has no minimum inside the range; a few, the one-parameter
    fit is noise: the rule of ten events per parameter of logistic regression), or a minimum at a bound of the
    range. Every process must get the same pairs (decode gathered outputs), so that all of them take the same
    steps and find the same temperature."""
    pairs = confidences_at(1.0)
    if not pairs:
        return None
    right = sum(bool(correct) for _, correct in pairs)
    if min(right, len(pairs) - right) < MIN_EACH_OUTCOME:
        return None
    before = log_loss(pairs)
    if not math.isfinite(before):
        return None
    low, high = TEMPERATURE_RANGE
    best = math.exp(grid_then_golden_minimum(lambda log_t: log_loss(confidences_at(math.exp(log_t))),
                                             math.log(low), math.log(high)))
    low_end, high_end = (math.exp(math.log(bound) + sign * 1e-3) for bound, sign in ((low, 1), (high, -1)))
    if not low_end < best < high_end:  # the loss still falls at the range's end: no temperature fits
        return None
    after = log_loss(confidences_at(best))
    if not after < before:  # no better than T = 1 (within the search's precision): keep the model as it is
        best, after = 1.0, before
    return {"temperature": round(best, 6), "objective": "confidence", "nll_before": before, "nll_after": after,
            "labels": len(pairs)}


def mean_nll(head: Any, scored: list[tuple[dict, torch.Tensor]], temperature: float, accelerator: Any = None
             ) -> tuple[float, int]:
    """(mean negative log-likelihood of the gold labels at `temperature`, how many labels), over every process."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for batch, scores in scored:
            nll, size = head.calibration_nll(scores, batch, temperature)
            total += nll.double().cpu()
            count += size
    if accelerator is not None and accelerator.num_processes > 1:
        summed = accelerator.reduce(torch.tensor([total.item(), float(count)], device=accelerator.device),
                                    reduction="sum")
        total, count = summed[0].double().cpu(), int(summed[1].item())
    return (total.item() / count if count else float("nan")), count


class NotFitted:
    """`calibrate`'s answer where no temperature was fitted: false in a condition (like None), with the reason the
    report gives ("not fitted: 12 labels (11 right, 1 wrong); ...")."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"NotFitted({self.reason!r})"


def label_outcomes(scored: list[tuple[dict, torch.Tensor]], accelerator: Any = None) -> tuple[int, int] | None:
    """(right, wrong) arg-max predictions over the gold labels of scored batches, on every process; None where the
    scores are not (..., num_labels) logits over the labels' positions (then only the label count is checked)."""
    counts = torch.zeros(2, dtype=torch.float64)
    for batch, scores in scored:
        labels = batch["labels"]
        if scores.dim() != labels.dim() + 1 or scores.shape[:-1] != labels.shape:
            return None
        keep = labels != -100
        right = (scores.argmax(-1) == labels) & keep
        counts += torch.tensor([float(right.sum()), float((keep & ~right).sum())], dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").double().cpu()
    return int(counts[0]), int(counts[1])


def fit_temperature(head: Any, scored: list[tuple[dict, torch.Tensor]], accelerator: Any = None
                    ) -> dict | NotFitted | None:
    """Fit the temperature on scored validation batches (they must carry the gold `labels`) by the head's negative
    log-likelihood of the gold labels (the fallback of `calibrate`).

    Returns {"temperature", "objective": "label", "nll_before", "nll_after", "labels"}; None when the batches have
    no gold labels; NotFitted where validation has fewer than MIN_EACH_OUTCOME right or wrong arg-max predictions
    of its labels (or, where those cannot be told, fewer than 2 * MIN_EACH_OUTCOME labels): the same minimum as the
    confidence fit, since with few wrong predictions the likelihood keeps rising as T falls and the fit would only
    make a model more confident."""
    if not scored or "labels" not in scored[0][0]:
        return None
    before, count = mean_nll(head, scored, 1.0, accelerator)
    if not count or not math.isfinite(before):
        return None
    outcomes = label_outcomes(scored, accelerator)
    if outcomes is not None and min(outcomes) < MIN_EACH_OUTCOME:
        return NotFitted(f"not fitted: {count} labels ({outcomes[0]} right, {outcomes[1]} wrong predictions); a "
                         f"fit needs at least {MIN_EACH_OUTCOME} of each")
    if outcomes is None and count < 2 * MIN_EACH_OUTCOME:
        return NotFitted(f"not fitted: {count} labels; a fit needs at least {2 * MIN_EACH_OUTCOME}")
    low, high = TEMPERATURE_RANGE
    best = math.exp(golden_section_minimum(lambda log_t: mean_nll(head, scored, math.exp(log_t), accelerator)[0],
                                           math.log(low), math.log(high)))
    after, _ = mean_nll(head, scored, best, accelerator)
    if not after < before:  # no better than T = 1 (within the search's precision): keep the model as it is
        best, after = 1.0, before
    return {"temperature": round(best, 6), "objective": "label", "nll_before": before, "nll_after": after,
            "labels": count}


def calibrate(head: Any, scored: list[tuple[dict, torch.Tensor]],
              confidences_at: Callable[[float], Sequence[tuple[float, bool]] | None] | None,
              accelerator: Any = None, objective: str = "confidence") -> dict | NotFitted | None:
    """The temperature of a model from its scored validation batches. objective "confidence": fitted to the
    confidences the task judges (`fit_temperature_to_confidences`) where it can be, else to the gold labels'
    likelihood; "label": to the gold labels' likelihood (`fit_temperature`)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"calibration objective {objective!r}: expected one of {sorted(OBJECTIVES)}")
    if not getattr(head, "temperature_scaling", True):
        return None  # a head whose outputs are not softmax confidences (multi-label sigmoids, regression values)
    fitted = None
    if objective == "confidence" and confidences_at is not None:
        fitted = fit_temperature_to_confidences(confidences_at)
    return fitted if fitted is not None else fit_temperature(head, scored, accelerator)


def fit_decision(head: Any, scored: list[tuple[dict, torch.Tensor]] | None, count: int,
                 features: Any, accelerator: Any = None) -> dict | None:
    """Decision rules a head tunes on the validation set after training, such as the multi-label sentence head's
    per-label thresholds: `head.fit_decision(outputs, features)` on the validation outputs (decoded from the stored
    scores, gathered over processes). Returns what the head reports for bert_ft.json, or None (no such head, no
    validation set, or nothing to tune)."""
    if not scored or not hasattr(head, "fit_decision"):
        return None
    return head.fit_decision(decode_batches(head, scored, count, accelerator), features)


def calibration_section(temperature: dict | None, rows: list[tuple[str, float | None, float | None]], note: str,
                        changed: int) -> str:
    """The report.txt section: temperature, what a confidence means, ECE before/after per split."""
    lines = ["== calibration ==", f"confidence: {note}" if note else "confidence: as the task defines it"]
    if isinstance(temperature, NotFitted):
        lines.append(f"temperature: {temperature.reason} on the validation set; confidences are the raw ones")
    elif not temperature:
        lines.append("temperature: not fitted (no validation set with labels): confidences are the raw ones")
    else:
        objective = temperature.get("objective", "label")
        counted = "predictions" if objective == "confidence" else "labels"
        lines.append(f"temperature {temperature['temperature']:.4f}, fitted on the validation set by "
                     f"{OBJECTIVES[objective]} ({temperature['nll_before']:.4f} -> {temperature['nll_after']:.4f} "
                     f"over {temperature['labels']} {counted}); stored in model/bert_ft.json, used by predict; "
                     f"predictions changed by it: {changed}")
    lines.append(f"expected calibration error ({ECE_BINS} equal-width bins)   before     after")
    for split, before, after in rows:
        shown = [f"{value:.4f}" if value is not None else "-" for value in (before, after)]
        lines.append(f"  {split:<45} {shown[0]:>8}  {shown[1]:>8}")
    return "\n".join(lines)
