"""Block attention (--block_attention, bert_ft.block_attention): each example of a packed row attends over its own
tokens only, in a few length buckets, with the same outputs and gradients as the block-diagonal mask, attention
dropout drawn only inside examples, and fewer FLOPs than the masked rows."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForTokenClassification

from bert_ft import block_attention as blocks
from bert_ft import block_layout
from bert_ft.cli import main
from bert_ft.cpu import bulk_dropout_attention, use_bulk_dropout
from bert_ft.data import Collator
from bert_ft.encoder import load_tokenizer
from bert_ft.block_attention import use_block_attention
from bert_ft.families import encoder_call
from bert_ft.heads import encoder_inputs
from bert_ft.inference import packing_is_exact
from bert_ft.random_models import family_folders
from bert_ft_tasks.ner import NerExample, NerTask

# Every family whose attention goes through transformers' registry (DeBERTa keeps the mask: tested apart).
REGISTRY_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "modernbert")
# First-fit-decreasing rows of 24 tokens: [24], [24], [20, 1, 1, 1] (+1 padding), [13, 11], [9, 7, 5] (+3 padding):
# rows holding 1, 2, 3 and 4 examples, length-1 examples, rows ending in padding; modernbert's tiny local layers
# see 8 tokens each side, so the long examples exercise its band.
LENGTHS = (24, 13, 1, 9, 24, 7, 1, 20, 11, 5, 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    transformers.logging.set_verbosity_error()
    return family_folders(str(tmp_path_factory.mktemp("block-families")), REGISTRY_FAMILIES + ("deberta-v3",))


def packed_batch(pad_id: int, lengths=LENGTHS, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    items = [(index, {"input_ids": torch.randint(5, 500, (length,), generator=generator).tolist()})
             for index, length in enumerate(lengths)]
    batch = Collator({"input_ids": pad_id}, pack=True)(items)
    batch.pop("feature_index")
    return batch


def example_tokens(batch: dict) -> torch.Tensor:
    """(rows, seq) True at every example token (False: a row's trailing padding)."""
    real = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for row, offset, length in zip(batch["example_row"].tolist(), batch["example_offset"].tolist(),
                                   batch["example_length"].tolist()):
        real[row, offset:offset + length] = True
    return real


def layout_of(batch: dict, max_buckets: int = block_layout.MAX_BUCKETS) -> block_layout.BlockLayout:
    return block_layout.build_layout(batch["example_row"], batch["example_offset"], batch["example_length"],
                               *batch["input_ids"].shape, max_buckets=max_buckets)


def without_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # ModernBERT's attention
            module.attention_dropout = 0.0


def test_bucket_plan_is_the_cheapest_split():
    """The dynamic programme finds the split of the sorted lengths with the lowest cost + overhead (brute force)."""
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        most, overhead = rng.randint(1, 4), rng.choice([0, 50, 1024])
        buckets, cost = block_layout.plan_buckets(lengths, most, overhead)
        assert sorted(index for bucket in buckets for index in bucket) == list(range(len(lengths)))
        assert len(buckets) <= most and all(lengths[bucket[0]] == max(lengths[i] for i in bucket) for bucket in buckets)
        ranked = sorted(lengths, reverse=True)
        best = min(sum((cuts[k + 1] - cuts[k]) * ranked[cuts[k]] ** 2 for k in range(count)) + overhead * count
                   for count in range(1, min(most, len(ranked)) + 1)
                   for cuts in ([0, *inner, len(ranked)] for inner in itertools.combinations(range(1, len(ranked)),
                                                                                             count - 1)))
        assert cost + overhead * len(buckets) == best


@pytest.mark.parametrize("family", REGISTRY_FAMILIES)
def test_block_attention_equals_the_masked_rows(family, folders, monkeypatch):
    """Outputs at every example token and every parameter gradient match the block-diagonal mask, in evaluation and
    in training without dropout, with the examples in 3 buckets (no per-bucket overhead: as many as allowed)."""
    monkeypatch.setattr(block_layout, "BUCKET_OVERHEAD", 0)
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(folders[family], num_labels=3)
    use_bulk_dropout(model)
    assert use_block_attention(model, "on").startswith("on")
    assert model.config._attn_implementation == "bert_ft_block_bulk"
    without_dropout(model)
    batch = packed_batch(model.config.pad_token_id or 0)
    per_row = torch.bincount(batch["example_row"]).tolist()
    assert {1, 2, 3, 4} <= set(per_row), per_row
    real = example_tokens(batch)
    inputs = encoder_call(model, {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")})
    layout = layout_of(batch, max_buckets=3)
    assert len(layout.buckets) == 3
    calls = []
    original = blocks.block_attention
    monkeypatch.setattr(blocks, "block_attention", lambda *args, **kwargs: calls.append(args[3]) or original(
        *args, **kwargs))
    for training in (False, True):
        model.train(training)
        results = []
        for extra in ({}, {block_layout.LAYOUT_ARGUMENT: layout}):
            model.zero_grad()
            logits = model(**inputs, **extra).logits  # (rows, seq, 3)
            assert torch.isfinite(logits).all()
            (logits[real] ** 2).sum().backward()
            results.append((logits[real].detach(), {name: parameter.grad.clone()
                                                    for name, parameter in model.named_parameters()
                                                    if parameter.grad is not None}))
        (masked, masked_grads), (blocked, block_grads) = results
        assert torch.allclose(masked, blocked, atol=1e-5, rtol=1e-4), (masked - blocked).abs().max()
        assert masked_grads.keys() == block_grads.keys()
        for name, gradient in masked_grads.items():
            assert torch.allclose(gradient, block_grads[name], atol=1e-5, rtol=1e-4), name
    # one forward of each mode carried the layout: every layer of it ran per example
    assert len(calls) == 2 * model.config.num_hidden_layers and all(used is layout for used in calls)


def test_block_attention_under_bf16_autocast(folders):
    """bf16 training (the CPU default) gives the masked rows' logits to bf16 precision."""
    model = AutoModelForTokenClassification.from_pretrained(folders["bert"], num_labels=3)
    use_block_attention(model, "train")
    without_dropout(model)
    batch = packed_batch(0)
    inputs = encoder_call(model.train(), {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")})
    real = example_tokens(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked = model(**inputs).logits[real].float()
        blocked = model(**inputs, **{block_layout.LAYOUT_ARGUMENT: layout_of(batch)}).logits[real].float()
    assert (masked - blocked).abs().max() <= 0.02 * masked.abs().max()


def test_dropout_is_drawn_only_inside_examples():
    """Values = one-hot per key position make the output the (dropped-out) probability matrix: zero outside each
    example's block, kept elements scaled by 1 / (1 - p), a kept fraction of 1 - p, and the same masks for the
    same torch seed (bulk masks from keep_mask)."""
    batch = packed_batch(0)
    rows, width = batch["input_ids"].shape
    real = example_tokens(batch)
    same_example = (batch["attention_mask"][:, 0] == 0) & real[:, :, None] & real[:, None, :]  # (rows, q, k)
    layout = layout_of(batch)
    generator = torch.Generator().manual_seed(0)
    query, key = (torch.randn(rows, 2, width, width, generator=generator) for _ in range(2))
    value = torch.eye(width).expand(rows, 2, width, width).contiguous()  # key j -> unit vector j
    p = 0.25
    torch.manual_seed(3)
    dropped = blocks.block_attention(query, key, value, layout, p, 0.5)  # (rows, q, heads, k)
    torch.manual_seed(3)
    assert torch.equal(dropped, blocks.block_attention(query, key, value, layout, p, 0.5)), "seeded masks"
    torch.manual_seed(4)
    assert not torch.equal(dropped, blocks.block_attention(query, key, value, layout, p, 0.5)), "another seed"
    kept = blocks.block_attention(query, key, value, layout, 0.0, 0.5)  # no dropout: the probabilities
    for head in range(2):
        probabilities, after = kept[:, :, head], dropped[:, :, head]  # (rows, q, k)
        assert (after[~same_example] == 0).all() and (probabilities[~same_example] == 0).all()
        inside_rows = probabilities[same_example]
        assert torch.allclose(probabilities.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-5)
        survived = after[same_example] != 0
        assert abs(survived.float().mean().item() - (1 - p)) < 0.04, survived.float().mean()
        assert torch.allclose(after[same_example][survived], inside_rows[survived] / (1 - p), atol=1e-6)


def test_explicit_softmax_path_is_the_masked_math():
    """The training path (explicit soft-max) with dropout replaced by the identity equals softmax(QK^T s + mask)V
    on the masked rows; the bulk-dropout attention it falls back to runs that math too."""
    batch = packed_batch(0)
    rows, width = batch["input_ids"].shape
    real = example_tokens(batch)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(rows, 2, width, 8, generator=generator) for _ in range(3))
    reference = torch.softmax(query @ key.transpose(2, 3) * 0.3 + batch["attention_mask"], -1) @ value
    blocked = blocks.block_attention(query, key, value, layout_of(batch), 0.1, 0.3, lambda tensor, p: tensor)
    assert torch.allclose(blocked[real], reference.transpose(1, 2)[real], atol=1e-6)
    assert (blocked[~real] == 0).all()


def test_block_attention_does_fewer_flops():
    """On a batch shaped like CoNLL training (32 sentences of 3 to 60 sub-words, packed rows as wide as the
    longest), the attention products cost what the buckets cost, well under the masked rows'."""
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 11, 14, 18, 23, 30, 41, 60]) for _ in range(32)]
    batch = packed_batch(0, lengths)
    rows, width = batch["input_ids"].shape
    layout = layout_of(batch)
    assert block_layout.worthwhile(layout)
    heads, head_dim = 12, 32
    query, key, value = (torch.randn(rows, heads, width, head_dim) for _ in range(3))

    class Attention(torch.nn.Module):
        is_causal = False

    module = Attention().train()

    def flops(function) -> int:
        with FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops()

    masked = flops(lambda: bulk_dropout_attention(module, query, key, value, batch["attention_mask"], dropout=0.1))
    blocked = flops(lambda: blocks.block_attention(query, key, value, layout, 0.1, 0.2))
    assert masked == 2 * 2 * heads * head_dim * rows * width ** 2  # QK^T and PV over whole rows
    assert blocked == 2 * 2 * heads * head_dim * layout.cost
    exact = sum(length ** 2 for length in lengths)
    assert blocked < 0.75 * masked and layout.cost <= 1.5 * exact, (blocked / masked, layout.cost / exact)


def test_deberta_keeps_the_masked_path(folders):
    model = AutoModelForTokenClassification.from_pretrained(folders["deberta-v3"], num_labels=3)
    before = model.config._attn_implementation
    said = use_block_attention(model, "train")
    assert said.startswith("off (deberta-v2") and model.config._attn_implementation == before
    batch = packed_batch(0)
    assert block_layout.LAYOUT_ARGUMENT not in encoder_inputs(batch, model.train())


def test_layout_rides_only_on_packed_batches_in_the_chosen_mode(folders):
    """encoder_call adds the layout to packed batches of a switched-on model: training steps only under "train",
    evaluation too under "on"; never to padded batches or to a model never switched on."""
    rng = random.Random(1)
    batch = packed_batch(0, [rng.randint(2, 40) for _ in range(32)])
    padded = Collator({"input_ids": 0})([(0, {"input_ids": [5, 6, 7]}), (1, {"input_ids": [8]})])
    model = AutoModelForTokenClassification.from_pretrained(folders["bert"], num_labels=3)
    assert block_layout.LAYOUT_ARGUMENT not in encoder_inputs(batch, model.train())
    use_block_attention(model, "train")
    assert block_layout.LAYOUT_ARGUMENT in encoder_inputs(batch, model.train())
    assert block_layout.LAYOUT_ARGUMENT not in encoder_inputs(batch, model.eval())
    assert block_layout.LAYOUT_ARGUMENT not in encoder_inputs(padded, model.train())
    use_block_attention(model, "on")
    assert block_layout.LAYOUT_ARGUMENT in encoder_inputs(batch, model.eval())


def test_packing_is_exact_with_block_attention_on(tiny_model_dir, monkeypatch):
    """The start-up exactness check (padded vs packed NER head, evaluation) passes through the block path (its six
    short examples pay for buckets once the per-bucket overhead is 0)."""
    monkeypatch.setattr(block_layout, "BUCKET_OVERHEAD", 0)
    tokenizer = load_tokenizer(tiny_model_dir)
    task = NerTask(NerTask.options_type())
    words = "the river bank near Paris was flooded after heavy rain in early spring".split()
    examples = [NerExample(words[:n], ["O"] * n, "mem", i) for i, n in enumerate((13, 2, 1, 9, 3, 4))]
    labels = ["O", "B-LOC", "I-LOC"]
    torch.manual_seed(0)
    head = task.build_model(tiny_model_dir, labels, tokenizer, False)
    features = task.encode(examples, tokenizer, 64, labels)
    assert use_block_attention(head.model, "on") == "on (training and evaluation)"
    calls = []
    original = blocks.block_attention
    monkeypatch.setattr(blocks, "block_attention", lambda *args, **kwargs: calls.append(1) or original(*args,
                                                                                                        **kwargs))
    assert packing_is_exact(head, features, task.pad_values(tokenizer))
    assert calls, "the packed half of the check ran through the block path"


def test_training_uses_blocks_with_dropout_in_steps_only(tiny_model_dir, tmp_path, monkeypatch):
    """A run with --block_attention train: every training step's attention (dropout 0.1) runs per example; no
    evaluation does; the run ends cleanly and its saved model loads with stock attention."""
    calls = []
    original = blocks.block_attention

    def counted(query, key, value, layout, dropout, *args, **kwargs):
        calls.append(dropout)
        return original(query, key, value, layout, dropout, *args, **kwargs)

    monkeypatch.setattr(blocks, "block_attention", counted)
    assert main(["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                 "--max_train_samples", "64", "--max_eval_samples", "16", "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "32", "--block_attention", "train", "--report_to", "none"]) == 0
    # the start-up check of the switch ran 2 layers without dropout; every other call was a training step's
    assert calls.count(0.0) == 2 and len(calls) > 2, calls
    assert all(dropout == pytest.approx(0.1) for dropout in calls if dropout), calls
    config = (tmp_path / "run" / "model" / "config.json").read_text()
    assert "bert_ft_block" not in config
