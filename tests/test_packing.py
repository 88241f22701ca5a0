"""Packing: several examples per row give exactly what one example per row (padding) gives, for every head.

Each check packs at least 3 examples into a row and looks at the examples at offset > 0, under eager and SDPA
attention; every hidden state (padding included) must be finite and no position id may exceed the model's table.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bert_ft.data import Collator, first_fit_decreasing
from bert_ft.encoder import load_tokenizer
from bert_ft.heads import full_top_layer
from bert_ft.training_setup import packing_is_exact
from bert_ft_tasks.ner import NerExample, NerTask, with_document_context
from bert_ft_tasks.relation import RelationExample, RelationTask
from bert_ft_tasks.sentence import SentenceExample, SentenceTask

ATTENTIONS = ("eager", "sdpa")
WORDS = "the river bank near Paris was flooded after heavy rain in early spring".split()


def ner_case(tokenizer, crf: bool):
    task = NerTask(NerTask.options_type(crf=crf))
    tags = ["O", "B-LOC", "I-LOC", "O", "B-PER", "O", "B-ORG", "I-ORG", "O", "O", "O", "B-LOC", "O", "O"]
    examples = [NerExample(WORDS[:n], tags[:n], "mem", i) for i, n in enumerate((3, 7, 5, 12, 2, 9))]
    return task, examples


def ner_context_case(tokenizer, crf: bool):
    """Document context (--context_size): the same sentences as one document, each with unlabelled neighbours."""
    task, examples = ner_case(tokenizer, crf)
    task.options.context_size = 6
    for example in examples:
        example.document = 0
    return task, list(with_document_context(examples, 6))


def sentence_case(tokenizer, pairs: bool):
    task = SentenceTask()
    examples = [SentenceExample(" ".join(WORDS[:n]), label, str(i), "mem", i,
                                " ".join(WORDS[n:n + 3]) if pairs else None)
                for i, (n, label) in enumerate(((3, "a"), (8, "b"), (4, "a"), (11, "b"), (2, "a"), (6, "b")))]
    return task, examples


def relation_case(tokenizer, pooling: str):
    task = RelationTask(RelationTask.options_type(pooling=pooling))
    texts = ["<e1>Smoke</e1> came from the <e2>fire</e2> .",
             "a b c d e f g h the <e2>river</e2> bank near <e1>Paris</e1>",  # markers near the row end
             "<e1>x</e1><e2>y</e2>",
             "heavy rain in early spring flooded the <e1>river</e1> and the <e2>bank</e2>",
             "<e2>z</e2> and <e1>w</e1>"]  # ends on a marker: packed last in its row
    labels = ["Cause-Effect(e2,e1)", "Other", "Other", "Cause-Effect(e1,e2)", "Other"]
    examples = [RelationExample(str(i), text, label, "mem", i) for i, (text, label) in enumerate(zip(texts, labels))]
    return task, examples


CASES = {
    "token": lambda tok: ner_case(tok, crf=False),
    "token_crf": lambda tok: ner_case(tok, crf=True),
    "token_context": lambda tok: ner_context_case(tok, crf=False),
    "token_crf_context": lambda tok: ner_context_case(tok, crf=True),
    "sentence": lambda tok: sentence_case(tok, pairs=False),
    "sentence_pair": lambda tok: sentence_case(tok, pairs=True),
    "relation_entity_start": lambda tok: relation_case(tok, "entity_start"),
    "relation_entity_mean": lambda tok: relation_case(tok, "entity_mean"),
    "relation_cls": lambda tok: relation_case(tok, "cls"),
}


def build(case: str, attention: str, model_dir: str):
    tokenizer = load_tokenizer(model_dir)
    task, examples = CASES[case](tokenizer)
    task.prepare_tokenizer(tokenizer)
    labels = task.build_labels(examples)
    torch.manual_seed(0)
    model = task.build_model(model_dir, labels, tokenizer, False)
    model.model.set_attn_implementation(attention)
    features = task.encode(examples, tokenizer, 64, labels)
    return task, tokenizer, model.eval(), features


def batches(task, tokenizer, features):
    items = list(enumerate(features.inputs))
    pad_values = task.pad_values(tokenizer)
    padded = Collator(pad_values)(items)
    # Rows wide enough for all but one example: most share the first row, the last row ends in padding.
    capacity = sum(features.lengths) - min(features.lengths)
    packed = Collator(pad_values, pack=True, row_capacity=capacity)(items)
    return padded, packed


def run(model, batch, **extra):
    batch = {key: value for key, value in batch.items() if key != "feature_index"}
    return model(**batch, **extra)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_rows_equal_padded_rows(case, attention, tiny_model_dir):
    task, tokenizer, model, features = build(case, attention, tiny_model_dir)
    padded, packed = batches(task, tokenizer, features)
    per_row = torch.bincount(packed["example_row"])
    assert per_row.max() >= 3, f"at least 3 examples share a row: {per_row.tolist()}"
    assert (packed["example_offset"] > 0).sum() >= 2
    assert packed["position_ids"].max() < model.config.max_position_embeddings
    if case.startswith("relation"):  # some example's end marker sits at its row's last content tokens
        rows, offsets = packed["example_row"], packed["example_offset"]
        fill = {int(row): int((offsets + packed["example_length"])[rows == row].max()) for row in rows.unique()}
        ends = offsets + torch.maximum(packed["e1_end"], packed["e2_end"])  # the later end marker, in row positions
        assert any(int(ends[i]) >= fill[int(rows[i])] - 2 and offsets[i] > 0 for i in range(len(ends))), \
            "an example after another one has its end marker right before its row's end ([SEP])"
    # token_type_ids of sentence pairs survive packing: each example's segment ids are where they belong.
    if "token_type_ids" in packed:
        for index in range(len(features)):
            row, offset = packed["example_row"][index], packed["example_offset"][index]
            length = features.lengths[index]
            assert packed["token_type_ids"][row, offset:offset + length].tolist() == \
                features.inputs[index]["token_type_ids"]

    hidden = []
    hook = model.encoder_model().register_forward_hook(lambda module, args, output: hidden.append(output[0]))
    with torch.no_grad():
        padded_loss, packed_loss = run(model, padded)["loss"], run(model, packed)["loss"]
        padded_out, packed_out = run(model, padded, decode=True), run(model, packed, decode=True)
    hook.remove()
    assert all(torch.isfinite(states).all() for states in hidden), "every hidden state, padding included, is finite"
    assert torch.allclose(padded_loss, packed_loss, atol=1e-5, rtol=1e-5), (padded_loss, packed_loss)
    for key, value in padded_out.items():
        assert value.shape == packed_out[key].shape, key
        if value.is_floating_point():
            assert torch.allclose(value, packed_out[key], atol=1e-5, rtol=1e-4), key
        else:
            assert torch.equal(value, packed_out[key]), key
    # The examples placed after another one in their row are the ones packing could get wrong: check them alone.
    later = packed["example_offset"] > 0
    for key, value in padded_out.items():
        assert torch.allclose(value[later].float(), packed_out[key][later].float(), atol=1e-5, rtol=1e-4), key
    assert packing_is_exact(model, features, task.pad_values(tokenizer))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("case", ["sentence", "sentence_pair"])
def test_sentence_first_token_fast_path_reads_packed_examples_at_their_offsets(case, attention, tiny_model_dir):
    """The [CLS]-only top layer on packed rows: the same probabilities as padded rows and as the stock top layer on
    the same packed rows, and the same gradients as the stock layer (dropout off)."""
    task, tokenizer, model, features = build(case, attention, tiny_model_dir)
    assert model.first_token_only, "the [CLS]-only top layer is on"
    padded, packed = batches(task, tokenizer, features)
    assert packed["input_ids"].size(0) < len(features) and int(packed["example_offset"].max()) > 0
    with torch.no_grad():
        expected = run(model, padded, decode=True)["probs"]
        got = run(model, packed, decode=True)["probs"]
        with full_top_layer(model.model, needed=True):
            stock = run(model, packed, decode=True)["probs"]
    assert torch.allclose(expected, got, atol=1e-5) and torch.allclose(stock, got, atol=1e-5)
    assert "forward" in vars(model.model.base_model.encoder.layer[-1]), "the fast path stays on"
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gradients = []
    for stock_layer in (False, True):
        model.zero_grad()
        with full_top_layer(model.model, needed=stock_layer):
            run(model, packed)["loss"].backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()
                          if param.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradient, gradients[1][name], atol=1e-6, rtol=1e-4), name


def test_padding_slots_form_their_own_block():
    collator = Collator({"input_ids": 0}, pack=True, row_capacity=8)
    batch = collator([(0, {"input_ids": [1, 2, 3]}), (1, {"input_ids": [4, 5]}), (2, {"input_ids": [6, 7, 8, 9, 10]})])
    mask = batch["attention_mask"][:, 0]  # (rows, seq, seq)
    assert mask.dtype == torch.float32
    allowed = mask == 0
    assert allowed.any(-1).all(), "no attention row is fully masked"
    row, offset = batch["example_row"][1].item(), batch["example_offset"][1].item()
    block = allowed[row, offset:offset + 2]
    assert block.sum().item() == 4 and block[:, offset:offset + 2].all(), "an example attends only to itself"
    assert batch["position_ids"][row, offset:offset + 2].tolist() == [0, 1]


def test_first_fit_decreasing_respects_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[index] for index in row) <= 10 for row in rows)
    assert len(rows) == 4  # 39 tokens need at least 4 rows of 10


@pytest.mark.parametrize("case", ["token", "token_context", "sentence"])
def test_packed_and_padded_training_give_equal_losses_for_50_steps(case, tiny_model_dir):
    """Dropout off, the same batches: the two layouts train the same model (losses within 1e-4 for 50 steps)."""
    task, tokenizer, model, features = build(case, "sdpa", tiny_model_dir)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    twin = copy.deepcopy(model)
    pad_values = task.pad_values(tokenizer)
    padded_collator, packed_collator = Collator(pad_values), Collator(pad_values, pack=True, row_capacity=24)
    optimizers = [torch.optim.AdamW(network.parameters(), lr=1e-3) for network in (model, twin)]
    generator = torch.Generator().manual_seed(0)
    for step in range(50):
        chosen = torch.randperm(len(features), generator=generator)[:4].tolist()
        items = [(index, features.inputs[index]) for index in chosen]
        losses = []
        for network, optimizer, collator in ((model, optimizers[0], padded_collator),
                                             (twin, optimizers[1], packed_collator)):
            network.train()
            loss = run(network, collator(items))["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4, f"step {step}: padded {losses[0]} vs packed {losses[1]}"
