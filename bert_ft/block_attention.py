"""Per-example (block) attention on packed rows: each example's queries attend to its own keys only, computed at a
cost of about sum over examples of length^2 instead of rows x width^2, with attention dropout drawn only inside the
examples (`--block_attention`).

A packed row holds several examples under an additive block-diagonal mask (`bert_ft.data.Collator`); the masked
path computes every row x row score, then throws most of them away (soft-max over finfo.min, and on CPU training a
dropout mask drawn over the whole row). Here the examples are cut out of the rows, attended one by one in a few
batched products, and put back. The design points:

How the attention function learns the layout. transformers (5.x) passes every extra keyword argument of a model's
  forward down to the attention function of each layer, on every family whose attention goes through its registry.
  `bert_ft.families.encoder_call` adds one, `bert_ft_blocks`: a `BlockLayout` built from the batch's
  example_row/offset/length (the batch contract, `bert_ft.heads`), once per forward and shared by every layer. It
  lives only in that call's arguments, so nothing leaks into the next call (another batch, another model, eval);
  it is added only to packed batches of a model that `bert_ft.families.use_block_attention` switched on (a training
  run's own model: predict, export and a reloaded folder never are), never while exporting or compiling, and in
  evaluation only with `--block_attention on`. Without it (padded batches, evaluation under `train`, the [CLS]-only
  top layer, the start-up `packing_is_exact` check) the registered function is exactly the masked path it replaced
  (`bulk_dropout_attention`, or SDPA with --bulk_dropout false).
How examples of different lengths share a matrix product. They are sorted by length and split into at most
  `MAX_BUCKETS` buckets of consecutive lengths; a bucket is padded to its longest member and computed as one
  (examples, heads, width, width) product (shorter members' extra keys get finfo.min, like the masked path). The
  split minimises sum over buckets of examples x width^2 + BUCKET_OVERHEAD per bucket (an exact dynamic programme
  over the sorted lengths); a batch whose best split costs no less than its rows x width^2 keeps the masked path.
  Gathering and scattering are one index_select each (q, k and v in, the output back; padding slots read a zero row
  and stay zero: nothing reads them, heads read examples through example_row/offset/length). Nested tensors were
  not used: torch's CPU SDPA runs them through a per-example loop, and the training path needs the explicit soft-max
  for the bulk dropout masks anyway.
Which families. Those whose attention goes through transformers' attention registry with an additive mask: BERT,
  RoBERTa, XLM-R, ELECTRA, DistilBERT, ALBERT, ModernBERT (its global layers: whole blocks; its sliding-window local
  layers, which announce themselves with the `sliding_window` argument: the band |i - j| <= config.sliding_window
  inside each block, the band `encoder_call` cuts from the mask). DeBERTa has its own attention (relative position
  terms, a 0/1 mask, no registry): it keeps the masked path, and the flag says so in the log. Every family is
  switched on only after a packed batch gave the same outputs both ways (`use_block_attention`).
Dropout. With attention dropout in training the soft-max is explicit and its dropout mask comes from
  `bert_ft.cpu.keep_mask` through `bulk_dropout` (seeded from torch's generator, so seeds and resume fix it), drawn
  over each bucket's (examples, heads, width, width) probabilities only; --bulk_dropout false draws with torch's
  dropout instead. Without dropout (evaluation, p = 0) each bucket runs SDPA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cpu import ATTENTION_NAME as BULK_ATTENTION_NAME, AttentionInterface, AttentionMaskInterface
from .cpu import bulk_dropout, bulk_dropout_attention, sdpa_attention_forward, sdpa_mask

LAYOUT_ARGUMENT = "bert_ft_blocks"  # the attention keyword argument carrying a BlockLayout
MAX_BUCKETS = 6
# A bucket's fixed cost (its gathers, two products, soft-max, dropout and their backward are about a dozen kernel
# calls) in units of one (query, key) pair of one example: a reasoned estimate, not a measurement.
BUCKET_OVERHEAD = 1024
# The transformers attention implementations registered here: name -> (the masked path it falls back to, the
# dropout of its explicit soft-max).
IMPLEMENTATIONS = {"bert_ft_block": (sdpa_attention_forward, F.dropout),
                   "bert_ft_block_bulk": (bulk_dropout_attention, bulk_dropout)}
REPLACES = {"sdpa": "bert_ft_block", BULK_ATTENTION_NAME: "bert_ft_block_bulk"}  # masked path -> block version


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


def _band(width: int, half: int, device: torch.device) -> torch.Tensor:
    steps = torch.arange(width, device=device)
    return (steps[:, None] - steps[None, :]).abs() <= half  # (width, width) True: inside the band


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout,
                    dropout: float, scaling: float, dropout_function=bulk_dropout,
                    band: int | None = None) -> torch.Tensor:
    """Attention of each example over its own tokens. query/key/value: (rows, heads, width, head_dim) as the
    masked path gets them; returns (rows, width, heads, head_dim) (a view: the caller's reshape copies it, as it
    copies the masked path's transpose), zero at positions no example covers. `band`: keys further than this from
    the query are masked too (sliding-window layers).

    Slots are kept head-major, (heads, slots, d): a bucket's (heads, count, width, d) is then a plain view whose
    batch dimensions collapse into one, so its products need no transposed copies."""
    rows, heads, width, head_dim = query.shape

    def slots(tensor: torch.Tensor) -> torch.Tensor:  # (rows, heads, width, d) -> (heads, slots, d)
        flat = tensor.transpose(0, 1).reshape(heads, rows * width, tensor.size(-1))  # a view for BERT's layout
        return flat.index_select(1, layout.gather)

    sizes = [bucket.count * bucket.width for bucket in layout.buckets]
    # split, not slicing: a slice's backward writes into a zero tensor as large as all slots, once per bucket
    pieces = zip(*(slots(tensor).split(sizes, dim=1) for tensor in (query, key, value)))
    outputs = []
    for bucket, (queries, keys, values) in zip(layout.buckets, pieces):

        def piece(tensor: torch.Tensor) -> torch.Tensor:  # (heads, count * width, d) -> (heads, count, width, d)
            return tensor.view(heads, bucket.count, bucket.width, -1)

        mask = bucket.key_mask  # (count, 1, width) or None
        if band is not None and bucket.width > band + 1:
            outside = ~_band(bucket.width, band, query.device)  # (width, width)
            base = mask if mask is not None else torch.zeros((1, bucket.width), device=query.device)
            mask = base.masked_fill(outside, torch.finfo(torch.float32).min)  # (count, width, width) or (w, w)
        if dropout > 0.0:  # the masked path's explicit soft-max (bert_ft.cpu.bulk_dropout_attention), per bucket
            scores = torch.matmul(piece(queries), piece(keys).transpose(2, 3)) * scaling  # (heads, count, w, w)
            if mask is not None:
                scores = scores + mask  # float32 mask: the soft-max runs in fp32, as on the masked path
            probabilities = dropout_function(torch.softmax(scores, dim=-1), dropout).to(values.dtype)
            attended = torch.matmul(probabilities, piece(values))
        else:  # heads play SDPA's batch and examples its heads: attention is independent per pair either way
            attended = F.scaled_dot_product_attention(piece(queries), piece(keys), piece(values), attn_mask=mask,
                                                      scale=scaling)
        outputs.append(attended.reshape(heads, bucket.count * bucket.width, head_dim))
    outputs.append(outputs[-1].new_zeros((heads, 1, head_dim)))  # the slot that padding positions read
    gathered = torch.cat(outputs, dim=1).index_select(1, layout.scatter)  # (heads, rows * width, d)
    return gathered.view(heads, rows, width, head_dim).permute(1, 2, 0, 3)


def block_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, *, implementation: str, **kwargs):
    """A transformers attention function: `block_attention` when the call carries a BlockLayout that fits it, else
    the masked path this implementation replaced (see IMPLEMENTATIONS)."""
    masked_path, dropout_function = IMPLEMENTATIONS[implementation]
    layout = kwargs.pop(LAYOUT_ARGUMENT, None)
    if (layout is None or is_causal or getattr(module, "is_causal", False) or key.size(1) != query.size(1)
            or query.size(0) != layout.rows or query.size(2) != layout.width or key.size(2) != layout.width
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return masked_path(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           is_causal=is_causal, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    band = None
    if kwargs.get("sliding_window") is not None:  # a local layer (ModernBERT): the band encoder_call cuts
        band = int(getattr(module.config, "sliding_window", kwargs["sliding_window"] - 1))
    return block_attention(query, key, value, layout, dropout, scaling, dropout_function, band), None


def register() -> bool:
    """Register the block implementations with transformers (idempotent); False without its attention registry."""
    if AttentionInterface is None:  # pragma: no cover - transformers without the attention registry
        return False
    for name in IMPLEMENTATIONS:
        AttentionInterface.register(name, functools.partial(block_attention_forward, implementation=name))
        AttentionMaskInterface.register(name, sdpa_mask)  # padded batches get exactly sdpa's masks
    return True
