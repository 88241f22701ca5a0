"""Imbalance-aware training losses shared by every head: class weights and focal loss.

`--class_weights none|balanced|FILE` gives one weight per label; `--loss cross_entropy|focal` (`--focal_gamma`)
chooses the per-target loss. Every head computes its training loss with `classification_loss` (through
`Head.loss`); the settings reach the heads through `Head.set_loss`, called once in `train.build_training`. They are
a training-time setting: nothing of them is saved in the model folder (config.json records the flags and the
resolved weights).

Reduction, for both losses: the weighted mean over the labelled targets i (those != ignore_index),

    loss = sum_i w[y_i] * l_i / sum_i w[y_i]          (w = 1 without class weights: the plain mean)

which is what torch's `F.cross_entropy(weight=w)` computes, so scaling every weight by one constant changes
nothing; only the ratios between weights matter. With l_i = -log p_i this is the weighted cross-entropy; the focal
loss (Lin et al., 2017) is l_i = -(1 - p_i)^gamma * log p_i, the class weight playing the part of its alpha_t, and
gamma = 0 gives the cross-entropy.

The CRF (a sequence likelihood) has no per-token loss to weight; its weighting lives with the tagger
(tasks/ner.py) and focal loss is refused with it (`NerOptions.problems`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import DataError, UsageError

LOSSES = ("cross_entropy", "focal")
WEIGHT_MODES = ("none", "balanced")  # besides a file path
FILE_FIX = ('a JSON object {"label": weight, ...} or one "label weight" per line (lines starting with # are '
            'comments); weights are finite numbers > 0; labels missing from the file get weight 1.0')


# ----------------------------------------------------------------------------------------------- the loss

def classification_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                        loss: str = "cross_entropy", gamma: float = 2.0, ignore_index: int = -100) -> torch.Tensor:
    """Weighted-mean cross-entropy or focal loss of `logits` (..., C) against `targets` (...) (see the module
    docstring for the formula); targets equal to `ignore_index` are left out. Computed in float32, without a host
    synchronisation (no data-dependent shapes). Cross-entropy is torch's own `F.cross_entropy`."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    logits = logits.float().reshape(-1, logits.size(-1))  # (N, C)
    targets = targets.reshape(-1)  # (N,)
    if weights is not None:
        weights = weights.to(device=logits.device, dtype=torch.float32)
    if loss == "cross_entropy":
        return F.cross_entropy(logits, targets, weight=weights, ignore_index=ignore_index)
    keep = targets != ignore_index  # (N,)
    safe_targets = targets.masked_fill(~keep, 0)
    log_p = F.log_softmax(logits, dim=-1).gather(1, safe_targets[:, None]).squeeze(1)  # (N,) log p_t
    per_target = -log_p
    if gamma:
        # 1 - p_t from log p_t without cancellation; kept above 0 so that (1 - p)^gamma has a finite gradient for
        # gamma < 1 when p_t rounds to 1.
        one_minus_p = (-torch.expm1(log_p)).clamp(min=torch.finfo(torch.float32).tiny)
        per_target = one_minus_p.pow(gamma) * per_target
    target_weights = keep.float() if weights is None else weights[safe_targets] * keep  # (N,) alpha_t, 0 if ignored
    return weighted_mean(per_target, target_weights)


def sequence_weights(weights: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sequences,) the mean class weight of each sequence's gold tags at the `mask` positions (0 for an empty
    sequence): how the CRF tagger weights each sentence's negative log-likelihood."""
    per_tag = weights.to(device=tags.device, dtype=torch.float32)[tags.clamp(min=0)] * mask  # (sequences, words)
    return per_tag.sum(1) / mask.sum(1).clamp(min=1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w); 0 (connected to the graph) when every weight is 0."""
    total = weights.sum()
    return (weights * values).sum() / total.clamp(min=torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------------------------- the weights

def label_counts(label_lists: Iterable[Sequence[str]]) -> Counter:
    """How often each label occurs in `label_lists` (one list per training example, as Task.labels_of gives)."""
    counts: Counter = Counter()
    for labels in label_lists:
        counts.update(labels)
    return counts


def balanced_weights(counts: Counter, labels: Sequence[str]) -> dict[str, float]:
    """scikit-learn's "balanced" weights n_samples / (n_classes * count_c) over the labels that occur; a label of
    the model that never occurs in training gets 1.0 (a weight applies only to gold targets, so it is unused)."""
    present = [label for label in labels if counts.get(label, 0) > 0]
    total = sum(counts[label] for label in present)
    return {label: (total / (len(present) * counts[label]) if counts.get(label, 0) > 0 else 1.0) for label in labels}


def read_weight_file(path: str) -> dict[str, tuple[float, int | None]]:
    """{label: (weight, line)} from a JSON object or "label weight" lines; DataError naming the file and line for
    anything else (a non-number, a weight <= 0, NaN or inf, a label given twice, an empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(path, None, f"not valid UTF-8 ({error.reason} at byte {error.start})", FILE_FIX) from None
    except OSError as error:
        raise DataError(path, None, f"cannot read it ({error.strerror})", FILE_FIX) from None
    is_json = text.lstrip().startswith("{")
    entries = _read_json(path, text) if is_json else _read_lines(path, text)
    if not entries:
        raise DataError(path, None, "no label weights found", FILE_FIX)
    found: dict[str, tuple[float, int | None]] = {}
    for label, value, line in entries:
        if label in found:
            earlier = found[label][1]
            raise DataError(path, line, f"label {label!r} is given twice"
                            + (f" (first on line {earlier})" if earlier else ""), "give each label once")
        found[label] = (_weight(path, line, label, value, text_allowed=not is_json), line)
    return found


def _read_json(path: str, text: str) -> list[tuple[str, Any, int | None]]:
    pairs: list[tuple[str, Any]] = []

    def keep_pairs(items):
        pairs.extend(items)
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=keep_pairs)
    except json.JSONDecodeError as error:
        raise DataError(path, error.lineno, f"not valid JSON: {error.msg} (column {error.colno})", FILE_FIX) from None
    if any(isinstance(value, dict) for _, value in pairs):
        raise DataError(path, None, "the JSON object must map labels to numbers, not hold nested objects", FILE_FIX)
    return [(label, value, _json_key_line(text, label)) for label, value in pairs]


def _json_key_line(text: str, label: str) -> int | None:
    """The line of the key `label` in a JSON text (for messages); None when it is written with escapes."""
    for candidate in (json.dumps(label, ensure_ascii=False), json.dumps(label)):
        match = re.search(re.escape(candidate) + r"\s*:", text)
        if match:
            return text.count("\n", 0, match.start()) + 1
    return None


def _read_lines(path: str, text: str) -> list[tuple[str, Any, int | None]]:
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # a label may hold spaces; the weight is the last field
        if len(parts) != 2:
            raise DataError(path, number, f"expected 'label weight', got {raw.strip()!r}", FILE_FIX)
        entries.append((parts[0], parts[1], number))
    return entries


def _weight(path: str, line: int | None, label: str, value: Any, text_allowed: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str) if text_allowed else (int, float)):
        raise DataError(path, line, f"the weight of {label!r} is {json.dumps(value)}, not a number", FILE_FIX)
    try:
        weight = float(value)
    except ValueError:
        raise DataError(path, line, f"the weight of {label!r} is {value!r}, not a number", FILE_FIX) from None
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(path, line, f"the weight of {label!r} is {value}; weights must be finite numbers > 0",
                        "give a positive weight (1.0 leaves a label as it is)")
    return weight


def class_weight_problems(spec: str) -> list[str]:
    """'--class_weights: why' lines for a value that is neither none, balanced nor a readable weight file (checked
    with the other flags, before any data is read; the labels are checked once they are known)."""
    if spec in WEIGHT_MODES:
        return []
    if not os.path.isfile(spec):
        return [f"--class_weights: {spec!r} is neither none, balanced nor an existing file ({FILE_FIX})"]
    try:
        read_weight_file(spec)
    except DataError as error:
        return [f"--class_weights: {error}".replace("\n", "\n    ")]
    return []


def resolve_class_weights(spec: str, labels: Sequence[str], counts: Counter, log=print) -> dict[str, float] | None:
    """{label: weight} for every label of the model (None for `none`), from `balanced` and the training label
    `counts`, or from a weight file: a label the model does not know is refused (DataError naming the line), a
    label the file leaves out gets 1.0 with a printed note."""
    if spec == "none":
        return None
    if spec == "balanced":
        weights = balanced_weights(counts, labels)
        absent = [label for label in labels if not counts.get(label)]
        if absent:
            log(f"class weights: {', '.join(absent)} never occur in the training data: weight 1.0 (unused)")
        return weights
    if spec not in WEIGHT_MODES and not os.path.isfile(spec):
        raise UsageError(f"--class_weights: {spec!r} is neither none, balanced nor an existing file ({FILE_FIX})")
    found = read_weight_file(spec)
    known = set(labels)
    for label, (_, line) in found.items():
        if label not in known:
            raise DataError(spec, line, f"label {label!r} is not a label of this run (labels: "
                            f"{', '.join(labels)})", "fix the spelling or remove the line")
    missing = [label for label in labels if label not in found]
    if missing:
        log(f"class weights: {spec} does not list {', '.join(missing)}: weight 1.0")
    return {label: found[label][0] if label in found else 1.0 for label in labels}


def format_weights(weights: dict[str, float], counts: Counter) -> str:
    """A printed table: label, training count, weight."""
    width = max(len(label) for label in weights)
    return "\n".join(f"  {label:<{width}}  {counts.get(label, 0):>8}  {weight:.4g}"
                     for label, weight in weights.items())


# ------------------------------------------------------------------------------- multi-label and regression

def multi_label_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                     loss: str = "cross_entropy", gamma: float = 2.0) -> torch.Tensor:
    """Binary cross-entropy per label (multi-label classification): `logits` and 0/1 `targets` (examples, L),
    the mean over every (example, label) cell, in float32.

    A class weight w_c multiplies the positive cells of label c (torch's `pos_weight`: a rare label's positives
    count w_c times), so --class_weights balanced lifts rare labels as it lifts rare classes. The focal loss is
    applied per cell: l = -(1 - p_t)^gamma * log p_t with p_t the probability of the cell's own 0/1 value (gamma
    = 0 gives the binary cross-entropy)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    logits, targets = logits.float(), targets.float()  # (examples, L)
    log_p = F.logsigmoid(logits)  # log p(label on)
    log_not_p = F.logsigmoid(-logits)  # log p(label off)
    positive, negative = -targets * log_p, -(1 - targets) * log_not_p  # (examples, L) each
    if gamma and loss == "focal":
        # (1 - p_t)^gamma: for a positive cell 1 - p = sigmoid(-x), for a negative one p = sigmoid(x)
        positive = positive * torch.exp(gamma * log_not_p)
        negative = negative * torch.exp(gamma * log_p)
    if weights is not None:
        positive = positive * weights.to(device=logits.device, dtype=torch.float32)[None, :]
    return (positive + negative).mean()


REGRESSION_LOSSES = ("mse", "huber")


def regression_loss(predicted: torch.Tensor, targets: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """MSE or Huber loss (delta 1) of standardised predictions against standardised targets, (examples,) each,
    in float32 (the head standardises both with the training targets' mean and standard deviation)."""
    if kind not in REGRESSION_LOSSES:
        raise ValueError(f"regression loss must be one of {', '.join(REGRESSION_LOSSES)}, got {kind!r}")
    predicted, targets = predicted.float().reshape(-1), targets.float().reshape(-1)
    if kind == "huber":
        return F.huber_loss(predicted, targets, delta=1.0)
    return F.mse_loss(predicted, targets)
