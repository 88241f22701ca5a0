"""Where each example of a packed batch sits, planned for per-example (block) attention: the examples sorted by
length and split into a few buckets, and the index tensors that cut them out of the rows and put their outputs back
(the design: `bert_ft.block_attention`). Only numpy and torch: the export side of the core (`bert_ft.families`)
builds layouts without importing the training-time attention code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LAYOUT_ARGUMENT = "bert_ft_blocks"  # the attention keyword argument carrying a BlockLayout
BLOCK_MODE = "_bert_ft_block_attention"  # the model attribute (not saved) holding --block_attention once on
MAX_BUCKETS = 6
# A bucket's fixed cost (its gathers, two products, soft-max, dropout and their backward are about a dozen kernel
# calls) in units of one (query, key) pair of one example: a reasoned estimate, not a measurement.
BUCKET_OVERHEAD = 1024


@dataclass(frozen=True)
class Bucket:
    """Examples of similar length computed as one product: `count` examples padded to `width` tokens."""

    count: int
    width: int
    key_mask: torch.Tensor | None  # (count, 1, width) float32, 0 / finfo.min past each example's end; None: none


@dataclass(frozen=True)
class BlockLayout:
    """Where each example of a packed batch sits, as index tensors shared by every layer of one forward."""

    rows: int
    width: int
    gather: torch.Tensor  # (slots,) flat position row * width + column of each bucket slot, buckets one after another
    scatter: torch.Tensor  # (rows * width,) the slot each position's output comes from; padding: `slots`, a zero row
    buckets: tuple[Bucket, ...]
    cost: int  # sum of count x width^2 over the buckets (query-key pairs per head)


def plan_buckets(lengths: list[int], max_buckets: int = MAX_BUCKETS,
                 overhead: int | None = None) -> tuple[list[list[int]], int]:
    """(buckets of indices into `lengths`, each longest first, their cost sum count x width^2) minimising that cost
    plus `overhead` per bucket, over the splits of the lengths sorted longest first into at most `max_buckets` runs
    of consecutive ranks (an exact dynamic programme: rows of the examples' count, a few levels); `overhead`
    None: BUCKET_OVERHEAD."""
    overhead = BUCKET_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    ranked = np.array([lengths[index] for index in order], dtype=np.int64)  # longest first
    count = len(ranked)
    first, last = np.arange(count)[:, None], np.arange(count)[None, :]
    never = np.iinfo(np.int64).max // 4  # the cost of an impossible split (sums of two stay representable)
    # span[j, i]: one bucket holding ranked[j..i], as wide as ranked[j]
    span = np.where(last >= first, (last - first + 1) * ranked[:, None] ** 2, never)
    best = span[0].copy()  # best[i]: the cheapest split of ranked[0..i] into exactly `level` buckets
    starts = [np.zeros(count, dtype=np.int64)]  # starts[level - 1][i]: where that split's last bucket begins
    totals = [int(best[-1]) + overhead]
    for level in range(2, min(max_buckets, count) + 1):
        # the best split of ranked[0..j-1] into level - 1 buckets, then ranked[j..i]
        candidates = np.full((count, count), never, dtype=np.int64)
        candidates[1:] = np.minimum(best[:-1, None] + span[1:], never)
        start = candidates.argmin(axis=0)
        best = candidates[start, np.arange(count)]
        starts.append(start)
        totals.append(int(best[-1]) + overhead * level)
    level = int(np.argmin(totals)) + 1  # the bucket count with the lowest cost + overhead
    bounds, end = [], count - 1
    for current in range(level, 0, -1):
        begin = int(starts[current - 1][end])
        bounds.append((begin, end))
        end = begin - 1
    buckets = [order[begin:end + 1] for begin, end in reversed(bounds)]
    cost = sum(len(bucket) * lengths[bucket[0]] ** 2 for bucket in buckets)
    return buckets, cost


def build_layout(example_row: torch.Tensor, example_offset: torch.Tensor, example_length: torch.Tensor, rows: int,
                 width: int, max_buckets: int = MAX_BUCKETS) -> BlockLayout:
    """The BlockLayout of a packed batch: examples (examples,) at (row, offset) with `length` tokens, in `rows` rows
    of `width` tokens (index arithmetic in numpy: a few hundred microseconds for a batch of 32)."""
    row, offset, length = (value.cpu().numpy().astype(np.int64) for value in
                           (example_row, example_offset, example_length))
    groups, cost = plan_buckets(length.tolist(), max_buckets)
    gather_parts, buckets = [], []
    scatter = np.full(rows * width, -1, dtype=np.int64)  # -1 until an example's token claims the position
    slot = 0
    for group in groups:
        members = np.asarray(group)
        bucket_width = int(length[members[0]])
        steps = np.arange(bucket_width)
        starts = row[members] * width + offset[members]  # (count,) flat position of each first token
        row_ends = row[members] * width + width - 1
        # slots past an example's end read the following tokens of its row (kept inside the row); they are masked
        # as keys and their query outputs are never read
        positions = np.minimum(starts[:, None] + steps, row_ends[:, None])  # (count, width)
        real = steps[None, :] < length[members][:, None]  # (count, width)
        slots = slot + np.arange(len(group) * bucket_width).reshape(len(group), bucket_width)
        scatter[positions[real]] = slots[real]
        gather_parts.append(positions.reshape(-1))
        key_mask = None
        if not real.all():
            key_mask = torch.zeros(real.shape, dtype=torch.float32).masked_fill_(
                torch.from_numpy(~real), torch.finfo(torch.float32).min)[:, None, :]  # (count, 1, width)
            key_mask = key_mask.to(example_row.device)
        buckets.append(Bucket(len(group), bucket_width, key_mask))
        slot += len(group) * bucket_width
    scatter[scatter < 0] = slot  # a row's trailing padding reads the zero row appended after the last slot
    device = example_row.device
    return BlockLayout(rows, width, torch.from_numpy(np.concatenate(gather_parts)).to(device),
                       torch.from_numpy(scatter).to(device), tuple(buckets), cost)


def worthwhile(layout: BlockLayout) -> bool:
    """Whether the buckets cost less than the masked path's rows x width^2 (one product, no extra buckets)."""
    buckets = len(layout.buckets)
    return layout.cost + BUCKET_OVERHEAD * (buckets - 1) < layout.rows * layout.width ** 2
