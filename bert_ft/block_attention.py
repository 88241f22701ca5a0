"""Per-example (block) attention on packed rows: each example's queries attend to its own keys only, computed at a
cost of about sum over examples of length^2 instead of rows x width^2, with attention dropout drawn only inside the
examples (`--block_attention`).

A packed row holds several examples under an additive block-diagonal mask (`bert_ft.data.Collator`); the masked
path computes every row x row score, then throws most of them away (soft-max over finfo.min, and on CPU training a
dropout mask drawn over the whole row). Here the examples are cut out of the rows, attended one by one in a few
batched products, and put back. The design points:

How the attention function learns the layout. transformers (5.x) passes every extra keyword argument of a model's
  forward down to the attention function of each layer, on every family whose attention goes through its registry.
  `bert_ft.families.encoder_call` adds one, `bert_ft_blocks`: a `bert_ft.block_layout.BlockLayout` built from the
  batch's example_row/offset/length (the batch contract, `bert_ft.heads`), once per forward and shared by every
  layer. It lives only in that call's arguments, so nothing leaks into the next call (another batch, another
  model, eval); it is added only to packed batches of a model that `use_block_attention` switched on (a training
  run's own model: predict, export and a reloaded folder never are), never while exporting or compiling, and in
  evaluation only with `--block_attention on`. Without it (padded batches, evaluation under `train`, the [CLS]-only
  top layer, the start-up `packing_is_exact` check) the registered function is exactly the masked path it replaced
  (`bulk_dropout_attention`, or SDPA with --bulk_dropout false). Not chosen: a context variable set around the
  encoder call (every head, plugin heads included, would have to set and reset it, and a forgotten reset leaks
  into the next call) and reading the layout back from the mask in every layer (a host sync and a scan of
  rows x width^2 per layer).
How examples of different lengths share a matrix product (the plan: `bert_ft.block_layout`, importable without
  this module's training-time dependencies). They are sorted by length and split into at most `MAX_BUCKETS` (6)
  buckets of consecutive lengths; a bucket is padded to its longest member and computed as one
  (examples, heads, width, width) product (shorter members' extra keys get finfo.min, like the masked path). The
  split minimises sum over buckets of examples x width^2 + `BUCKET_OVERHEAD` per bucket (an exact dynamic programme
  over the sorted lengths); a batch whose best split costs no less than its rows x width^2 keeps the masked path.
  Gathering and scattering are one index_select each (q, k and v in, the output back; padding slots read a zero row
  and stay zero: nothing reads them, heads read examples through example_row/offset/length). Not chosen: jagged
  nested tensors. torch 2.13 runs SDPA on them on CPU, but SDPA draws its dropout with bernoulli_ (not the bulk
  masks), and the explicit soft-max the bulk masks need starts with a product of two ragged dimensions
  (Q K^T), which their matmul refuses (checked).
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

import torch
import torch.nn.functional as F
from torch import nn

from .block_layout import BLOCK_MODE, LAYOUT_ARGUMENT, BlockLayout, build_layout
from .cpu import ATTENTION_NAME as BULK_ATTENTION_NAME, AttentionInterface, AttentionMaskInterface
from .cpu import bulk_dropout, bulk_dropout_attention, sdpa_attention_forward, sdpa_mask
from .data import Collator
from .families import encoder_call, family_of

# The transformers attention implementations registered here: name -> (the masked path it falls back to, the
# dropout of its explicit soft-max).
IMPLEMENTATIONS = {"bert_ft_block": (sdpa_attention_forward, F.dropout),
                   "bert_ft_block_bulk": (bulk_dropout_attention, bulk_dropout)}
REPLACES = {"sdpa": "bert_ft_block", BULK_ATTENTION_NAME: "bert_ft_block_bulk"}  # masked path -> block version


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


def use_block_attention(model: nn.Module, mode: str) -> str:
    """Switch `model` (a transformers model) to per-example attention on packed batches: in training steps (mode
    "train") or in evaluation too ("on"); "off" switches it off again (the registered function is then exactly
    the masked path it replaced). Switched on only where the family's attention goes
    through transformers' registry and a packed check batch gives the same outputs both ways; returns what
    happened, for the log (why not, where it stays off)."""
    if mode == "off":
        model.__dict__.pop(BLOCK_MODE, None)
        return "off"
    family = family_of(model)
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation in IMPLEMENTATIONS and BLOCK_MODE in model.__dict__:  # switched on already
        model.__dict__[BLOCK_MODE] = mode
        return _switched(mode)
    if family.boolean_mask:
        return (f"off ({family.model_type} computes its own attention with relative positions, outside "
                "transformers' attention registry: packed rows keep the block-diagonal mask)")
    if implementation not in REPLACES or not register():
        return f"off (the model's attention is {implementation!r}, not SDPA: packed rows keep the block-diagonal mask)"
    try:
        model.set_attn_implementation(REPLACES[implementation])
    except (ValueError, ImportError):
        return f"off ({family.model_type}'s attention cannot be switched at run time)"
    if model.config._attn_implementation == REPLACES[implementation] and _block_matches_mask(model):
        model.__dict__[BLOCK_MODE] = mode
        return _switched(mode)
    model.set_attn_implementation(implementation)
    return "off (the check batch's per-example attention differed from the masked rows)"


def _switched(mode: str) -> str:
    return "on (training steps)" if mode == "train" else "on (training and evaluation)"


def _block_matches_mask(model: nn.Module) -> bool:
    """Eval-mode outputs of a packed check batch (examples of 1 to 21 tokens, 1 to 4 per row) with and without
    the block layout, compared at every example token."""
    lengths = [21, 9, 1, 6, 3, 1, 14, 2]
    generator = torch.Generator().manual_seed(0)
    high = min(model.config.vocab_size, 1000)
    items = [(index, {"input_ids": torch.randint(5, high, (length,), generator=generator).tolist()})
             for index, length in enumerate(lengths)]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = Collator({"input_ids": pad}, pack=True)(items)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    inputs = encoder_call(model, {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")})
    layout = build_layout(batch["example_row"], batch["example_offset"], batch["example_length"],
                          batch["input_ids"].size(0), batch["input_ids"].size(1))
    real = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=device)  # (rows, seq) example tokens
    for row, offset, length in zip(*(batch[key].tolist() for key in ("example_row", "example_offset",
                                                                        "example_length"))):
        real[row, offset:offset + length] = True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            masked = model(**inputs)[0]
            blocked = model(**inputs, **{LAYOUT_ARGUMENT: layout})[0]
        if masked.dim() >= 3 and masked.shape[:2] == real.shape:  # token outputs: compare the example tokens
            masked, blocked = masked[real], blocked[real]
        same = masked.shape == blocked.shape and torch.allclose(masked.float(), blocked.float(), atol=1e-5,
                                                                rtol=1e-4)
    except Exception:  # a forward that refuses the layout argument: keep the masked path
        same = False
    model.train(was_training)
    return same
