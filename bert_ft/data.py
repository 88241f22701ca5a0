"""Task-independent data plumbing: safe file reading, length-grouped sampling, padding, word windows."""

from __future__ import annotations

import json
import math
import os
import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .errors import DataError


def read_text_lines(path: str) -> list[str]:
    """All lines of a UTF-8 text file (a BOM and CRLF endings are accepted); clear errors otherwise."""
    if not os.path.isfile(path):
        raise DataError(path, None, "file not found", "check the path (relative paths start at the current folder)")
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        raise DataError(path, None, "the file is empty", "give a file with at least one example")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(path, line, f"not valid UTF-8 (byte {raw[error.start]:#04x} at offset {error.start})",
                        "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`") from None
    # Split on "\n" only: str.splitlines would also break inside JSON strings at U+2028, U+0085 and friends.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_jsonl_records(path: str, lines: list[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; clear errors for anything else."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, number, f"not valid JSON ({error.msg})", "one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(path, number, f"expected a JSON object per line, got {type(record).__name__}",
                            "one JSON object per line")
        yield number, record


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length, in random order: shuffle, cut into mega-batches, sort inside each by length.

    Every index appears exactly once per epoch; the order is a pure function of (seed, epoch), so a resumed run can
    rebuild it and skip the batches it already trained on. Padding falls because a batch's lengths are close.
    Under several processes Accelerate shards these batches between the ranks.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_factor: int = 50,
                 shuffle: bool = True) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.mega_batch_factor, self.shuffle = mega_batch_factor, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches of feature indices."""
        indices = list(range(len(self.lengths)))
        if not self.shuffle:
            # Evaluation: longest first, so a memory problem shows at once; one sort, minimal padding.
            indices.sort(key=lambda index: -self.lengths[index])
            return [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        generator = random.Random(self.seed * 1_000_003 + self.epoch)
        generator.shuffle(indices)
        mega_size = self.batch_size * self.mega_batch_factor
        batches = []
        for start in range(0, len(indices), mega_size):
            mega = sorted(indices[start:start + mega_size], key=lambda index: -self.lengths[index])
            batches.extend(mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size))
        # Shuffle the batches too, so the long ones are not always first in a mega-batch.
        generator.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        if not self.shuffle:
            return math.ceil(len(self.lengths) / self.batch_size)
        mega_size = self.batch_size * self.mega_batch_factor
        full, rest = divmod(len(self.lengths), mega_size)
        return full * math.ceil(mega_size / self.batch_size) + math.ceil(rest / self.batch_size)


class PaddingCollator:
    """Pad each list-valued feature to the batch's longest (rounded up to `pad_to_multiple_of`); stack scalars.

    `pad_values` gives the pad value per key ("input_ids": the tokenizer's pad id, "labels": -100, ...);
    keys in `drop_keys` (bookkeeping such as "example_index") are not turned into tensors.
    """

    def __init__(self, pad_values: dict[str, int], pad_to_multiple_of: int | None = None,
                 drop_keys: Sequence[str] = ("example_index", "word_ids", "window")) -> None:
        self.pad_values, self.multiple, self.drop_keys = pad_values, pad_to_multiple_of, set(drop_keys)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.multiple:
            longest = math.ceil(longest / self.multiple) * self.multiple
        for key, first in features[0].items():
            if key in self.drop_keys:
                continue
            if isinstance(first, (list, tuple)):
                pad = self.pad_values.get(key, 0)
                rows = [list(feature[key]) + [pad] * (longest - len(feature[key])) for feature in features]
                batch[key] = torch.tensor(rows, dtype=torch.long)
            else:
                batch[key] = torch.tensor([feature[key] for feature in features])
        return batch


def word_windows(word_lengths: Sequence[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Split words into [start, end) windows of at most `budget` sub-word tokens, overlapping by ~`stride` tokens.

    A single word longer than the budget gets a window of its own (the caller truncates its sub-words; its
    label sits on the first one, so it is still scored). Every word lies in at least one window.
    """
    lengths = [max(1, min(length, budget)) for length in word_lengths]
    windows, start, count = [], 0, len(lengths)
    while start < count:
        end, used = start, 0
        while end < count and used + lengths[end] <= budget:
            used += lengths[end]
            end += 1
        windows.append((start, end))
        if end >= count:
            break
        # Step back from `end` while the overlap stays within `stride` tokens, but always move forward.
        next_start, overlap = end, 0
        while next_start - 1 > start and overlap + lengths[next_start - 1] <= stride:
            next_start -= 1
            overlap += lengths[next_start]
        start = next_start
    return windows or [(0, 0)]


def best_window_per_word(windows: Sequence[tuple[int, int]], num_words: int) -> list[int]:
    """For each word, the window where it has the most context on both sides (its most central occurrence)."""
    best, best_margin = [0] * num_words, [-1] * num_words
    for window_index, (start, end) in enumerate(windows):
        for word in range(start, end):
            margin = min(word - start, end - 1 - word)
            if margin > best_margin[word]:
                best[word], best_margin[word] = window_index, margin
    return best


def padding_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]], multiple: int | None = None) -> tuple[int, int]:
    """(real tokens, padded tokens) over the given batches of feature indices."""
    real = padded = 0
    for batch in batches:
        longest = max(lengths[index] for index in batch)
        if multiple:
            longest = math.ceil(longest / multiple) * multiple
        real += sum(lengths[index] for index in batch)
        padded += longest * len(batch)
    return real, padded


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a single-sequence input starts and ends with ([CLS] / [SEP] for BERT)."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start:start + len(content)] == content:
            return full[:start], full[start + len(content):]
    raise ValueError(f"cannot locate the special tokens of {type(tokenizer).__name__}")
