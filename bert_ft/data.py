"""Task-independent data plumbing: safe file reading, length-grouped sampling, padding and packing, word windows."""

from __future__ import annotations

import codecs
import json
import math
import os
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import DataError


def read_text_lines(path: str) -> list[str]:
    """All lines of a UTF-8 text file (a BOM and CRLF endings are accepted); clear errors otherwise. For small
    inputs (predict files); training data goes through the streaming `iter_text_lines`."""
    return list(iter_text_lines(path))


SNIFF_BYTES = 1 << 20  # the first MiB shows a UTF-16/32 file's byte pattern


def require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(path, None, "file not found", "check the path (relative paths start at the current folder)")


def iter_text_lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file, one at a time (memory stays flat for any file size): a BOM and CRLF endings
    are accepted; a missing or empty file, UTF-16/32, NUL bytes and invalid UTF-8 raise a DataError naming the line.

    Lines are split on "\n" only: str.splitlines would also break inside JSON strings at U+2028, U+0085 and friends.
    """
    require_file(path)
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
        _check_head(path, head)
        handle.seek(0)
        offset, seen_text = 0, False
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            if b"\x00" in raw:
                raise DataError(path, number, f"binary file or NUL byte at line {number}",
                                "re-save as UTF-8 text (a NUL byte never belongs in a text file)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                where = offset + error.start
                raise DataError(path, number, f"not valid UTF-8 (byte {raw[error.start]:#04x} at offset {where})",
                                "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`") from None
            offset += len(raw)
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            seen_text = seen_text or bool(line.strip())
            yield line
        if not seen_text:
            if offset == 0:
                raise DataError(path, None, "the file is empty", "give a file with at least one example")
            raise DataError(path, None, "the file is empty (it holds only whitespace)",
                            "give a file with at least one example")


def check_text_file(path: str) -> None:
    """Raise the DataError `iter_text_lines` would raise anywhere in the file, before any line is parsed, so a
    file-level problem (UTF-16, a NUL byte, bad UTF-8, no text) is reported as such and not as whatever parse error
    its first damaged line causes. A fast pass in 1 MiB chunks finds whether there is a problem; only then does the
    line-by-line reader run, to name it exactly."""
    if os.path.isfile(path):
        decoder = codecs.getincrementaldecoder("utf-8")()
        seen_text = False
        with open(path, "rb") as handle:
            chunk = handle.read(SNIFF_BYTES)
            _check_head(path, chunk)
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            try:
                while chunk and b"\x00" not in chunk:
                    decoder.decode(chunk)
                    seen_text = seen_text or bool(chunk.strip())
                    chunk = handle.read(SNIFF_BYTES)
                decoder.decode(b"", final=True)
                if seen_text and not chunk:
                    return  # clean text to the end
            except UnicodeDecodeError:
                pass
    for _ in iter_text_lines(path):  # a problem was seen (or there is no file): this raises it, naming the line
        pass


def _check_head(path: str, raw: bytes) -> None:
    """Refuse UTF-16/32 files (with or without a byte-order mark) from the file's first bytes."""
    if not raw.strip():
        return  # empty or whitespace only: said after reading, with the lines
    for bom, encoding in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                          (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise DataError(path, None, f"the file is {encoding} (it starts with the byte-order mark "
                            f"{bom.hex(' ').upper()}), not UTF-8",
                            f"convert it to UTF-8, e.g. `iconv -f {encoding} -t UTF-8 in > out`")
    if b"\x00" in raw:
        half, even, odd = len(raw) // 2, raw[0::2].count(0), raw[1::2].count(0)
        if half >= 2 and max(even, odd) > half // 2 and min(even, odd) < half // 8:
            raise DataError(path, None, "the file looks like UTF-16 without a byte-order mark (a NUL byte in every "
                            "other position), not UTF-8",
                            "convert it to UTF-8, e.g. `iconv -f UTF-16LE -t UTF-8 in > out` (or UTF-16BE)")


def first_content_line(lines: Iterable[str]) -> str:
    """The first non-blank line (what format detection looks at)."""
    return next((line for line in lines if line.strip()), "")


def read_jsonl_records(path: str, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; clear errors for anything else."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if line.startswith("\ufeff"):  # a second byte-order mark: files joined with `cat`
                raise DataError(path, number, "a byte-order mark (U+FEFF) starts this line, inside the file "
                                "(files joined with `cat`?)", "remove it, e.g. `sed -i '1!s/^\\xEF\\xBB\\xBF//' "
                                "FILE`") from None
            raise DataError(path, number, f"not valid JSON ({error.msg})", "one JSON object per line") from None
        except ValueError:  # an integer longer than Python's digit limit (sys.get_int_max_str_digits)
            raise DataError(path, number, "a number too long to read (thousands of digits)",
                            "write such a value as a JSON string, or fix the line") from None
        except RecursionError:
            raise DataError(path, number, "JSON nested too deeply to read",
                            "one flat JSON object per line") from None
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
        # A numpy array (4 bytes a feature), not a list of Python ints: a million features stay a few MB.
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.mega_batch_factor, self.shuffle = mega_batch_factor, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches of feature indices."""
        indices = list(range(len(self.lengths)))
        lengths = self.lengths.tolist()  # this epoch's working copy (fast to index)
        if not self.shuffle:
            # Evaluation: longest first, so a memory problem shows at once; one sort, minimal padding.
            indices.sort(key=lambda index: -lengths[index])
            return [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        generator = random.Random(self.seed * 1_000_003 + self.epoch)
        generator.shuffle(indices)
        mega_size = self.batch_size * self.mega_batch_factor
        batches = []
        for start in range(0, len(indices), mega_size):
            mega = sorted(indices[start:start + mega_size], key=lambda index: -lengths[index])
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


class FeatureDataset(torch.utils.data.Dataset):
    """Feature i of a split as (i, its model inputs): the index travels with the batch for evaluation order."""

    def __init__(self, inputs: Sequence[dict]) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.inputs[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, dict]]:
        """A whole batch at once (the DataLoader asks for it this way): one read from an Arrow table."""
        rows = getattr(self.inputs, "rows", None)
        if rows is None:
            return [(index, self.inputs[index]) for index in indices]
        return list(zip(indices, rows(indices)))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of positions into `lengths` whose lengths sum to at most `capacity` (first-fit decreasing bin packing;
    an item longer than `capacity` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        length = lengths[position]
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(position)
                room[row] -= length
                break
        else:
            rows.append([position])
            room.append(capacity - length)
    return rows


def _sequence_length(value) -> int:
    """Tokens of a token-aligned value: a list of ids, or (several sequences per example) the longest inner list."""
    if value and isinstance(value[0], (list, tuple)):
        return max(len(inner) for inner in value)
    return len(value)


def _pad_nested(value, width: int, pad: int) -> list:
    if value and isinstance(value[0], (list, tuple)):
        return [list(inner) + [pad] * (width - len(inner)) for inner in value]
    return list(value) + [pad] * (width - len(value))


def _ones_like_nested(value) -> list:
    if value and isinstance(value[0], (list, tuple)):
        return [[1] * len(inner) for inner in value]
    return [1] * len(value)


class Collator:
    """Batches under the batch contract of `bert_ft.heads`: the task's token-aligned keys (those in `pad_values`)
    laid out in rows, per-example keys stacked, and each example's row, offset and length.

    Padded (pack=False): one example per row, padded to the longest (rounded up to `pad_to_multiple_of`), with a
    0/1 attention mask and no position ids, so the model runs exactly as transformers' stock classes do.
    Packed (pack=True): the batch's examples are packed first-fit-decreasing into rows of `max(row_capacity,
    longest example)` tokens, by default the longest example's (wider rows add attention and attention dropout
    on every extra column: rows of at least 128 trained 1.1-1.4x slower on all three tasks, README "Measured
    results"), with position ids restarting at 0 per example and an additive block-diagonal mask
    (rows, 1, seq, seq) of 0 / finfo(float32).min: each token attends only within its own example. The padding at
    a row's end forms its own block, so no attention row is fully masked (nothing becomes NaN). A float32 mask
    works for fp32 and under bf16 autocast, for both the eager and the SDPA attention paths.
    """

    def __init__(self, pad_values: dict[str, int], pack: bool = False, row_capacity: int = 0,
                 pad_to_multiple_of: int | None = None) -> None:
        self.pad_values, self.pack = dict(pad_values), pack
        self.row_capacity, self.multiple = row_capacity, pad_to_multiple_of

    def layout(self, lengths: Sequence[int]) -> tuple[list[list[int]], int]:
        """(rows of positions into `lengths`, row width in tokens) for one batch."""
        if self.pack:
            rows = first_fit_decreasing(lengths, max(self.row_capacity, max(lengths)))
            width = max(sum(lengths[position] for position in row) for row in rows)
        else:
            rows, width = [[position] for position in range(len(lengths))], max(lengths)
        if self.multiple:
            width = math.ceil(width / self.multiple) * self.multiple
        return rows, width

    def __call__(self, items: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        indices = [index for index, _ in items]
        features = [feature for _, feature in items]
        keys = list(features[0])
        sequence_keys = [key for key in keys if key in self.pad_values]
        lengths = [_sequence_length(feature["input_ids"]) for feature in features]
        rows, width = self.layout(lengths)
        row_of, offset_of = [0] * len(features), [0] * len(features)
        for row_number, row in enumerate(rows):
            used = 0
            for position in row:
                row_of[position], offset_of[position] = row_number, used
                used += lengths[position]
        batch: dict[str, torch.Tensor] = {}
        if self.pack:
            for key in sequence_keys:
                pad = self.pad_values[key]
                laid = [[pad] * width for _ in rows]
                for position, feature in enumerate(features):
                    start = offset_of[position]
                    laid[row_of[position]][start:start + lengths[position]] = feature[key]
                batch[key] = torch.tensor(laid, dtype=torch.long)
            segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: a row's trailing padding
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            for position in range(len(features)):
                start, length = offset_of[position], lengths[position]
                segments[row_of[position], start:start + length] = position
                positions[row_of[position], start:start + length] = torch.arange(length)
            same_block = segments[:, :, None] == segments[:, None, :]  # (rows, seq, seq)
            batch["attention_mask"] = torch.zeros(same_block.shape, dtype=torch.float32).masked_fill_(
                ~same_block, torch.finfo(torch.float32).min)[:, None]  # (rows, 1, seq, seq)
            batch["position_ids"] = positions
        else:
            for key in sequence_keys:
                pad = self.pad_values[key]
                batch[key] = torch.tensor([_pad_nested(feature[key], width, pad) for feature in features],
                                          dtype=torch.long)
            batch["attention_mask"] = torch.tensor([_pad_nested(_ones_like_nested(feature["input_ids"]), width, 0)
                                                    for feature in features], dtype=torch.long)
        for key in keys:
            if key not in self.pad_values:
                batch[key] = torch.tensor([feature[key] for feature in features])
        batch["example_row"] = torch.tensor(row_of, dtype=torch.long)
        batch["example_offset"] = torch.tensor(offset_of, dtype=torch.long)
        batch["example_length"] = torch.tensor(lengths, dtype=torch.long)
        batch["feature_index"] = torch.tensor(indices, dtype=torch.long)
        return batch


def padding_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]], collator: Collator) -> tuple[int, int]:
    """(real tokens, token slots the model computes) over the given batches of feature indices."""
    real = slots = 0
    for batch in batches:
        batch_lengths = [lengths[index] for index in batch]
        rows, width = collator.layout(batch_lengths)
        real += sum(batch_lengths)
        slots += len(rows) * width
    return real, slots


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


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a single-sequence input starts and ends with ([CLS] / [SEP] for BERT)."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start:start + len(content)] == content:
            return full[:start], full[start + len(content):]
    raise ValueError(f"cannot locate the special tokens of {type(tokenizer).__name__}")


def looks_like_jsonl(lines: Iterable[str]) -> bool:
    """JSON Lines or not, by the first non-blank line: a JSON object starts with "{" (CoNLL, SemEval, TSV never do).
    Reads only up to that line (give it `iter_text_lines(path)` for a file)."""
    return first_content_line(lines).lstrip().startswith("{")
