"""Confidence calibration, task-agnostic: the expected calibration error and temperature scaling.

A task says what a confidence is (`Evaluation.confidences`: one (confidence, correct) pair per prediction; for
NER each predicted entity's probability, for classification the predicted class's probability). A head says what
its likelihood is at a temperature (`Head.calibration_nll`; for a CRF every potential is divided by it). The
temperature is fitted on the validation scores by minimising that negative log-likelihood: it is convex in 1/T,
so a golden-section search over log T finds the minimum. A positive temperature never changes a prediction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


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


def fit_temperature(head: Any, scored: list[tuple[dict, torch.Tensor]], accelerator: Any = None) -> dict | None:
    """Fit the temperature on scored validation batches (they must carry the gold `labels`).

    Returns {"temperature", "nll_before", "nll_after", "labels"} or None when the batches have no gold labels."""
    if not scored or "labels" not in scored[0][0]:
        return None
    before, count = mean_nll(head, scored, 1.0, accelerator)
    if not count or not math.isfinite(before):
        return None
    low, high = TEMPERATURE_RANGE
    best = math.exp(golden_section_minimum(lambda log_t: mean_nll(head, scored, math.exp(log_t), accelerator)[0],
                                           math.log(low), math.log(high)))
    after, _ = mean_nll(head, scored, best, accelerator)
    if not after < before:  # no better than T = 1 (within the search's precision): keep the model as it is
        best, after = 1.0, before
    return {"temperature": round(best, 6), "nll_before": before, "nll_after": after, "labels": count}


def calibration_section(temperature: dict | None, rows: list[tuple[str, float | None, float | None]], note: str,
                        changed: int) -> str:
    """The report.txt section: temperature, what a confidence means, ECE before/after per split."""
    lines = ["== calibration ==", f"confidence: {note}" if note else "confidence: as the task defines it"]
    if temperature is None:
        lines.append("temperature: not fitted (no validation set with labels): confidences are the raw ones")
    else:
        lines.append(f"temperature {temperature['temperature']:.4f}, fitted on the validation set by negative "
                     f"log-likelihood ({temperature['nll_before']:.4f} -> {temperature['nll_after']:.4f} over "
                     f"{temperature['labels']} labels); stored in model/bert_ft.json, used by predict; "
                     f"predictions changed by it: {changed}")
    lines.append(f"expected calibration error ({ECE_BINS} equal-width bins)   before     after")
    for split, before, after in rows:
        shown = [f"{value:.4f}" if value is not None else "-" for value in (before, after)]
        lines.append(f"  {split:<45} {shown[0]:>8}  {shown[1]:>8}")
    return "\n".join(lines)
