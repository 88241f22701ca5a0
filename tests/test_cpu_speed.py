"""bert_ft.cpu: bulk-drawn dropout is torch's dropout in distribution (keep rate, scaling, gradient, seeding), the
attention that uses it computes what eager attention computes with the same mask, evaluation is untouched, and the
allocator setting stops the page faults of a re-allocated large block."""

from __future__ import annotations

import math
import os
import resource

import pytest
import torch

from bert_ft.cpu import (ATTENTION_NAME, BulkDropout, bulk_dropout, bulk_dropout_attention, keep_mask,
                         reuse_freed_memory, use_bulk_dropout)
from bert_ft.data import Collator
from bert_ft.encoder import load_tokenizer
from bert_ft_tasks.ner import NerExample, NerTask


def test_keep_mask_keeps_each_element_with_probability_one_minus_p():
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.03):
        mask = keep_mask((1000, 1000), p)
        assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
        count = 1_000_000
        kept = int(mask.sum())
        exact_p = round(p * 65536) / 65536
        spread = math.sqrt(count * exact_p * (1 - exact_p))
        assert abs(kept - count * (1 - exact_p)) < 5 * spread, (p, kept)
        # independent across positions: neighbours' joint keep rate is the product of the marginals
        both = int((mask[:, 1:] & mask[:, :-1]).sum()) / mask[:, 1:].numel()
        assert abs(both - (1 - exact_p) ** 2) < 0.005


def test_keep_mask_follows_torch_seeding():
    torch.manual_seed(3)
    first = keep_mask((64, 64), 0.1)
    torch.manual_seed(3)
    again = keep_mask((64, 64), 0.1)
    torch.manual_seed(4)
    other = keep_mask((64, 64), 0.1)
    state = torch.random.get_rng_state()
    after_state = keep_mask((64, 64), 0.1)
    torch.random.set_rng_state(state)  # a resumed run restores the RNG state: the same masks follow
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(after_state, keep_mask((64, 64), 0.1))


def test_bulk_dropout_scales_kept_elements_and_masks_the_gradient():
    torch.manual_seed(0)
    tensor = torch.randn(50, 70, requires_grad=True)
    torch.manual_seed(11)
    out = bulk_dropout(tensor, 0.2)
    torch.manual_seed(11)
    mask = keep_mask(tensor.shape, 0.2)
    torch.testing.assert_close(out, torch.where(mask, tensor / 0.8, 0.0), rtol=0, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(tensor.grad, mask.float() / 0.8, rtol=0, atol=1e-6)
    # eval, p = 0 and bf16 inputs
    assert torch.equal(bulk_dropout(tensor, 0.2, training=False), tensor)
    assert torch.equal(bulk_dropout(tensor, 0.0), tensor)
    assert bulk_dropout(tensor.detach().bfloat16(), 0.2).dtype == torch.bfloat16


def test_bulk_dropout_layer_is_a_dropout_layer():
    layer = torch.nn.Dropout(0.3)
    layer.__class__ = BulkDropout
    tensor = torch.ones(100, 100)
    layer.train()
    out = layer(tensor)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert abs(kept.float().mean().item() - 0.7) < 0.03
    layer.eval()
    assert torch.equal(layer(tensor), tensor)


class _Attention(torch.nn.Module):
    is_causal = False


def _eager_with_mask(query, key, value, mask, keep, p, scaling):
    scores = query @ key.transpose(2, 3) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probabilities = torch.softmax(scores, dim=-1)
    if keep is not None:
        probabilities = torch.where(keep, probabilities / (1 - p), 0.0)
    return (probabilities @ value).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive_packed"])
def test_bulk_dropout_attention_is_eager_attention_with_the_same_mask(mask_kind):
    torch.manual_seed(0)
    rows, heads, seq, dim = 3, 2, 7, 4
    query, key, value = (torch.randn(rows, heads, seq, dim) for _ in range(3))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = torch.ones(rows, 1, seq, seq, dtype=torch.bool)
        mask[0, :, :, 5:] = False  # padding at the end of row 0
    else:  # two examples and a padding block in a row, as the packing collator lays them out
        segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1]] * rows)
        same = segments[:, :, None] == segments[:, None, :]
        mask = torch.zeros(rows, 1, seq, seq).masked_fill(~same[:, None], torch.finfo(torch.float32).min)
    module = _Attention()
    module.train()
    torch.manual_seed(5)
    out, weights = bulk_dropout_attention(module, query, key, value, mask, dropout=0.25, scaling=dim ** -0.5)
    torch.manual_seed(5)
    keep = keep_mask((rows, heads, seq, seq), 0.25)
    expected = _eager_with_mask(query, key, value, mask, keep, 0.25, dim ** -0.5)
    assert weights is None and out.shape == (rows, seq, heads, dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()
    # evaluation (and dropout 0) is transformers' SDPA attention, unchanged
    module.eval()
    evaluated, _ = bulk_dropout_attention(module, query, key, value, mask, dropout=0.0, scaling=dim ** -0.5)
    torch.testing.assert_close(evaluated, _eager_with_mask(query, key, value, mask, None, 0.0, dim ** -0.5),
                               rtol=1e-5, atol=1e-6)


def _tiny_ner(model_dir):
    tokenizer = load_tokenizer(model_dir)
    task = NerTask()
    words = "the river bank near Paris was flooded after heavy rain".split()
    tags = ["O", "B-LOC", "I-LOC", "O", "B-PER", "O", "O", "O", "O", "O"]
    examples = [NerExample(words[:n], tags[:n], "mem", i) for i, n in enumerate((3, 7, 5, 10, 2, 9))]
    labels = task.build_labels(examples)
    torch.manual_seed(0)
    model = task.build_model(model_dir, labels, tokenizer, False)
    features = task.encode(examples, tokenizer, 64, labels)
    batch = Collator(task.pad_values(tokenizer), pack=True)(list(enumerate(features.inputs)))
    batch.pop("feature_index")
    return model, batch


def test_use_bulk_dropout_leaves_evaluation_and_the_saved_folder_unchanged(tiny_model_dir, tmp_path):
    model, batch = _tiny_ner(tiny_model_dir)
    model.eval()
    with torch.no_grad():
        before = model(**batch)["logits"]
    switched = use_bulk_dropout(model)
    assert any("dropout layers" in item for item in switched) and "attention dropout" in switched
    assert model.model.config._attn_implementation == ATTENTION_NAME
    assert not any(type(module) is torch.nn.Dropout for module in model.modules())
    with torch.no_grad():
        after = model(**batch)["logits"]
    assert torch.equal(before, after)
    model.model.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "config.json"), encoding="utf-8") as handle:
        assert ATTENTION_NAME not in handle.read()


def test_training_with_bulk_dropout_follows_the_seed_and_drops(tiny_model_dir):
    model, batch = _tiny_ner(tiny_model_dir)
    use_bulk_dropout(model)
    model.train()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(model(**batch)["loss"].item())
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)["loss"].item()
    assert losses[0] == losses[1] and losses[0] != losses[2] and losses[0] != evaluated
    assert all(math.isfinite(loss) for loss in losses)


def test_reuse_freed_memory_stops_refaulting_a_large_block():
    if not reuse_freed_memory():
        pytest.skip("not Linux with glibc")

    def faults_of_one_allocation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(48 * 2**20 // 4)  # 48 MB: above glibc's largest dynamic mmap threshold (32 MiB)
        block.fill_(1.0)
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    for _ in range(5):  # the heap settles within a few rounds (the first ones may extend it)
        faults_of_one_allocation()
    # 12,288 pages every time when each allocation is a fresh mapping (glibc's default for blocks above 32 MiB)
    assert max(faults_of_one_allocation() for _ in range(3)) < 1000
