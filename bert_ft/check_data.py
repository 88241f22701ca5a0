"""`--check_data`: the report on data that was read and encoded exactly as training would, printed instead of training.

`data_report` only formats: every refusal (unreadable file, unseen label, one class) has already been raised by
the same code that training runs, so a report means the data would train. It works on anything duck-typed like
a Task (`labels_of`, and optionally `example_text`, `word_count`, `data_notes`) and like `Features`
(`example_index`, `lengths`); a plain list of feature dicts (`example_index`, `input_ids`) is accepted too.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

SPLIT_ORDER = ("train", "validation", "test")
SHOWN = 3  # examples quoted for duplicates and overlap


def percentile(values: Sequence[int], share: float) -> int:
    """Nearest-rank percentile (`share` in (0, 100]): the smallest value with at least share % of values <= it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(share / 100 * len(ordered))) - 1]


def _feature_columns(features: Any) -> tuple[list[int], list[int]]:
    """(example index, length) of every feature, from a Features object or a list of feature dicts."""
    if hasattr(features, "example_index") and hasattr(features, "lengths"):
        return list(features.example_index), list(features.lengths)
    rows = list(features)
    return [row["example_index"] for row in rows], [len(row["input_ids"]) for row in rows]


def _text(task: Any, example: Any) -> str:
    if hasattr(task, "example_text"):
        return task.example_text(example)
    if isinstance(getattr(example, "text", None), str):
        return example.text
    if isinstance(getattr(example, "words", None), list):
        return " ".join(example.words)
    return str(example)


def _words(task: Any, example: Any) -> int:
    if hasattr(task, "word_count"):
        return task.word_count(example)
    if isinstance(getattr(example, "words", None), list):
        return len(example.words)
    return len(_text(task, example).split())


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return '"' + (text if len(text) <= limit else text[: limit - 3] + "...") + '"'


def _share(count: int, total: int) -> str:
    if not total:
        return "-"
    share = 100 * count / total
    return "<0.1 %" if 0 < share < 0.05 else f"{share:.1f} %"


def _example(examples: list, index: int) -> str:
    """'example 7', with the file line when the example records one."""
    line = getattr(examples[index], "line", None)
    return f"example {index + 1}" + (f" (line {line})" if isinstance(line, int) else "")


def _ordered_splits(splits: dict) -> list[str]:
    return [split for split in SPLIT_ORDER if split in splits] + [split for split in splits if split not in SPLIT_ORDER]


def _split_section(task: Any, split: str, examples: list, source: str, features: Any, texts: list[str]) -> list[str]:
    example_index, lengths = _feature_columns(features)
    per_example = Counter(example_index)
    windowed = sum(1 for count in per_example.values() if count > 1)
    lines = [f"== {split}: {source} ==",
             f"  {'examples':<26} {len(examples)}",
             f"  {'words':<26} {sum(_words(task, example) for example in examples)}",
             f"  {'features (model inputs)':<26} {len(lengths)}"]
    if lengths:
        lines.append(f"  {'sub-words per feature':<26} p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
                     f"p99 {percentile(lengths, 99)}, max {max(lengths)}")
    lines.append(f"  {'examples over one window':<26} {windowed} ({_share(windowed, len(examples))})")
    # Duplicates: examples whose text already occurred earlier in this split.
    first_seen: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
    repeats = []
    for index, text in enumerate(texts):
        if text in first_seen:
            repeats.append((index, first_seen[text]))
            groups.setdefault(text, [first_seen[text]]).append(index)
        else:
            first_seen[text] = index
    if repeats:
        conflicting = sum(1 for members in groups.values()
                          if len({tuple(task.labels_of(examples[member])) for member in members}) > 1)
        lines.append(f"  {'duplicates':<26} {len(repeats)} examples repeat an earlier one ({len(groups)} distinct "
                     f"texts, {conflicting} of them with different labels), first:")
        lines += [f"    {_example(examples, index)} = {_example(examples, first)}: {_quote(texts[index])}"
                  for index, first in repeats[:SHOWN]]
    else:
        lines.append(f"  {'duplicates':<26} none")
    return lines


def _label_section(task: Any, splits: dict, order: list[str], labels: list[str]) -> list[str]:
    counts = {split: Counter(label for example in splits[split] for label in task.labels_of(example))
              for split in order}
    seen = set().union(*counts.values()) if counts else set()
    rows = list(labels) + sorted(seen - set(labels))  # the model's labels (zeros shown), then any others
    width = max([len(label) for label in rows] + [5])
    totals = {split: sum(counts[split].values()) for split in order}
    lines = ["== labels: count and share per split ==",
             "  " + f"{'label':<{width}}" + "".join(f"  {split:>10} {'%':>7}" for split in order)]
    for label in rows:
        cells = "".join(f"  {counts[split][label]:>10} {_share(counts[split][label], totals[split]):>7}"
                        for split in order)
        lines.append("  " + f"{label:<{width}}" + cells)
    lines.append(("  " + f"{'total':<{width}}" + "".join(f"  {totals[split]:>10} {'':>7}" for split in order)).rstrip())
    if len(order) > 1:
        only = []
        for label in rows:
            present = [split for split in order if counts[split][label]]
            if len(present) == 1:
                only.append(f"{label!r} only in {present[0]}")
        lines.append(f"  labels only in one split: {', '.join(only) if only else 'none'}")
    return lines


def _overlap_section(splits: dict, order: list[str], texts: dict[str, list[str]]) -> list[str]:
    if "train" not in texts or len(order) < 2:
        return []
    train_index: dict[str, int] = {}
    for index, text in enumerate(texts["train"]):
        train_index.setdefault(text, index)
    lines = ["== overlap with train (exact same input text) =="]
    for split in order:
        if split == "train":
            continue
        hits = [(index, train_index[text]) for index, text in enumerate(texts[split]) if text in train_index]
        lines.append(f"  train/{split}: {len(hits)} of {len(texts[split])} {split} examples "
                     f"({_share(len(hits), len(texts[split]))}) also occur in train{', first:' if hits else ''}")
        lines += [f"    {split} {_example(splits[split], index)} = train {_example(splits['train'], first)}: "
                  f"{_quote(texts[split][index])}" for index, first in hits[:SHOWN]]
    return lines


def data_report(task: Any, splits: dict[str, list], sources: dict[str, str], features: dict[str, Any],
                labels: list[str], tokenizer: Any, max_seq_length: int) -> str:
    """The plain-text --check_data report of data already read, checked and encoded as training would.

    `splits`, `sources` and `features` map a split name (train/validation/test) to its examples, the file they
    came from and their encoded Features; `labels` is the model's label list. Examples are numbered from 1 in
    file order.
    """
    order = _ordered_splits(splits)
    texts = {split: [_text(task, example) for example in splits[split]] for split in order}
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    lines = [f"data check: max_seq_length {max_seq_length}, tokenizer {name}",
             "(sub-word counts include the special tokens; examples are numbered from 1 in file order)", ""]
    for split in order:
        lines += _split_section(task, split, splits[split], sources.get(split, split), features[split], texts[split])
        lines.append("")
    if not getattr(task, "predicts_numbers", False):  # regression targets are described in the task's notes
        lines += _label_section(task, splits, order, labels)
        lines.append("")
    overlap = _overlap_section(splits, order, texts)
    if overlap:
        lines += overlap + [""]
    if hasattr(task, "data_notes"):
        notes = []
        for split in order:
            split_notes = task.data_notes(split, splits[split], features[split], tokenizer)
            if split_notes:
                notes += [f"  {split}:"] + [f"    {note}" for note in split_notes]
        if notes:
            lines += [f"== notes from the {getattr(task, 'name', 'task')} task =="] + notes + [""]
    lines.append("data check passed: the data would train")
    return "\n".join(lines)


# ------------------------------------------------------------------------- multi-label and regression notes

RARE_LABEL = 5  # a multi-label label with fewer examples than this in a split is listed as rare
SHOWN_PAIRS = 5  # co-occurring label pairs shown


def multi_label_notes(label_lists: Sequence[Sequence[str]]) -> list[str]:
    """--check_data lines for multi-label data (one label list per example): label cardinality, empty lists
    (allowed: a text with no label), rare labels, and the most frequent co-occurring pairs."""
    count = len(label_lists)
    if not count:
        return []
    sizes = Counter(len(labels) for labels in label_lists)
    singles = Counter(label for labels in label_lists for label in set(labels))
    pairs = Counter((first, second) for labels in label_lists for first in sorted(set(labels))
                    for second in sorted(set(labels)) if first < second)
    mean = sum(len(labels) for labels in label_lists) / count
    lines = [f"label cardinality: {mean:.3f} labels per example (max {max(sizes)}); examples by number of labels: "
             + ", ".join(f"{size}: {sizes[size]}" for size in sorted(sizes)),
             f"empty label lists: {sizes.get(0, 0)} ({_share(sizes.get(0, 0), count)}) - allowed: a text with no "
             "label"]
    rare = [f"{label} ({number})" for label, number in sorted(singles.items(), key=lambda item: (item[1], item[0]))
            if number < RARE_LABEL]
    lines.append(f"rare labels (< {RARE_LABEL} examples): {', '.join(rare) if rare else 'none'}")
    if pairs:
        shown = ", ".join(f"{first}+{second} {number} ({_share(number, singles[first])} of {first}, "
                          f"{_share(number, singles[second])} of {second})"
                          for (first, second), number in pairs.most_common(SHOWN_PAIRS))
        lines.append(f"co-occurring labels (most frequent pairs): {shown}")
    else:
        lines.append("co-occurring labels: none (no example has two labels)")
    return lines


def regression_notes(values: Sequence[float | None]) -> list[str]:
    """--check_data lines for regression targets: how many are numbers, range, mean and standard deviation,
    percentiles and a 10-bin histogram."""
    numbers = sorted(value for value in values if value is not None)
    missing = len(values) - len(numbers)
    lines = [f"targets: {len(numbers)} numbers, {missing} non-numbers"
             + (" (refused in training: each is named by file and line)" if missing else "")]
    if not numbers:
        return lines
    mean = sum(numbers) / len(numbers)
    spread = (sum((value - mean) ** 2 for value in numbers) / len(numbers)) ** 0.5
    low, high = numbers[0], numbers[-1]

    def at(share: float) -> float:
        return numbers[max(1, math.ceil(share / 100 * len(numbers))) - 1]

    lines.append(f"range {low:.6g} .. {high:.6g}; mean {mean:.6g}, standard deviation {spread:.6g}; "
                 f"p10 {at(10):.6g}, p50 {at(50):.6g}, p90 {at(90):.6g}; distinct values {len(set(numbers))}")
    if high > low:
        bins = [0] * 10
        for value in numbers:
            bins[min(int((value - low) / (high - low) * 10), 9)] += 1
        width = (high - low) / 10
        lines.append("histogram (10 equal bins): " + ", ".join(
            f"[{low + index * width:.3g}, {low + (index + 1) * width:.3g}{']' if index == 9 else ')'} {number}"
            for index, number in enumerate(bins)))
    return lines
