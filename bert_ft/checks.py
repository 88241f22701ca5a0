"""Input checks that need more than the flags: the model's length limit, the output folder, the training labels.

Each refusal is a `UsageError` or `DataError` (one clear message, exit status 2); nothing here writes to disk.
The flag-only checks (non-finite numbers, fp16 without a GPU) live in `TrainConfig.problems`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Callable, Iterable

from .errors import DataError, UsageError

# Tokenizers without a known limit report int(1e30) (transformers' VERY_LARGE_INTEGER); anything this large is "unknown".
_UNKNOWN_LENGTH = 10**9

# Models whose position ids start after the padding index (RoBERTa's `create_position_ids_from_input_ids`):
# `max_position_embeddings` counts pad_token_id + 1 positions no input can use (roberta-base: 514 -> 512).
PADDING_OFFSET_MODEL_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "ibert", "data2vec-text",
    "roberta-prelayernorm", "xmod", "mpnet", "luke", "markuplm", "esm",
})


def model_length_limit(tokenizer: Any, model_config: Any) -> int | None:
    """The most tokens one model input may hold (special tokens included), or None when nothing says.

    The smaller of the tokenizer's `model_max_length` (unless it is the "unknown" sentinel) and the model's
    `max_position_embeddings` less the position offset of RoBERTa-style models (pad_token_id + 1).
    """
    limits = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, (int, float)) and 0 < tokenizer_limit < _UNKNOWN_LENGTH:
        limits.append(int(tokenizer_limit))
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(model_config, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
            pad = getattr(model_config, "pad_token_id", None)
            positions -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
        limits.append(positions)
    return min(limits) if limits else None


def clamp_max_seq_length(requested: int, tokenizer: Any, model_config: Any, log: Callable[[str], Any] = print) -> int:
    """`requested`, or the model's limit with a printed warning when `requested` exceeds it (as HF's scripts do)."""
    limit = model_length_limit(tokenizer, model_config)
    if limit is None or requested <= limit:
        return requested
    log(f"warning: --max_seq_length {requested} exceeds this model's limit of {limit} positions; using {limit}")
    return limit


def check_output_dir_path(output_dir: str) -> None:
    """Refuse an --output_dir that cannot become a writable folder: a file, under a file, or not writable."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output_dir {output_dir}: is a file, not a folder.\n"
                         "  fix: choose another --output_dir (a new or existing folder), or move the file away")
    # The nearest part of the path that exists must be a folder we may create things in.
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    shown = existing if os.path.isabs(output_dir) else os.path.relpath(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        raise UsageError(f"--output_dir {output_dir}: {shown} is a file, not a folder, so nothing can be "
                         "created under it.\n  fix: choose an --output_dir outside that file's path")
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == path else f"{shown}, where it would be created,"
        raise UsageError(f"--output_dir {output_dir}: {what} is not writable by this user.\n"
                         "  fix: choose an --output_dir you may write to (e.g. under your home folder), or fix the "
                         "folder's permissions")


# IOB1/IOB2/IOBES/BILOU tags: the labels of a token tagger rather than classes of whole examples.
_TAG = re.compile(r"^(O|[BIESLU]-.+)$")


def check_label_variety(task: Any, train_examples: Iterable[Any], source: str) -> None:
    """Refuse training data that cannot teach a model anything: one class only, or (tagging) no entity at all.

    Uses only `task.labels_of(example)`. Tag sets (O, B-X, I-X, ...) are recognised by their form: they need at
    least one entity tag; a single entity type is fine. Classes of whole examples need at least two classes.
    """
    if getattr(task, "predicts_numbers", False):
        return  # regression: no classes (the task checks its targets itself)
    # One streaming pass (a cached table builds its examples batch by batch): a list of a million example objects
    # would cost gigabytes for a check that needs only the label counts.
    counts: Counter = Counter()
    total = 0
    for example in train_examples:
        counts.update(task.labels_of(example))
        total += 1
    if not total or not counts:
        raise DataError(source, None, "no training example with a label",
                        "check the file (and --max_train_samples / --validation_split, which take examples away)")
    labels = set(counts)
    if all(_TAG.match(label) for label in labels):
        if labels == {"O"}:
            raise DataError(
                source, None,
                f"no entity in the training data: all {counts['O']} tags of the {total} training examples "
                "are 'O'; a tagger needs at least one entity type",
                "check that the tag is the last column and that the right file was given (and, with "
                "--max_train_samples, that the first examples hold entities)")
        return
    if len(labels) == 1:
        (label, count), = counts.items()
        raise DataError(
            source, None,
            f"every training example has the label {label!r} ({count} examples); a classifier needs at least "
            "two classes",
            "check the label column (--label_column) and the file, or add examples of the other classes (with "
            "--max_train_samples, the first examples may all share one class)")
