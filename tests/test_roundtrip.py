"""train -> save -> reload gives identical outputs, for every task in TASKS (AllenNLP's can_train_save_and_load)."""

from __future__ import annotations

import pytest
import torch

from bert_ft.data import Collator
from bert_ft.model_folder import load_model, save_model
from bert_ft.optim import build_optimizer, parameter_groups
from bert_ft.plugins import registered_tasks

TASKS = registered_tasks()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_save_reload_identical_outputs(name, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    task_type = TASKS[name]
    task = task_type(task_type.options_type())
    examples = task.read(task.default_files()["train"])[:24]
    labels = task.build_labels(examples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task.prepare_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = task.build_model(tiny_model_dir, labels, tokenizer, False)
    features = task.encode(examples, tokenizer, 64, labels)
    batch = Collator(task.pad_values(tokenizer))(list(enumerate(features.inputs[:8])))
    batch.pop("feature_index")
    optimizer = build_optimizer(parameter_groups(model, 1e-3, 1e-2, 1.0, 0.0), 0.0)
    model.train()
    losses = []
    for _ in range(8):  # the loss falls: the head and encoder really train
        loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    folder = str(tmp_path / "model")
    save_model(model, tokenizer, folder, name, {"max_seq_length": 64})
    reloaded, reloaded_tokenizer, meta = load_model(folder)
    assert type(reloaded) is task_type.head_type
    assert meta["task"] == name and meta["labels"] == labels
    assert reloaded_tokenizer(["a <e1>b</e1>"])["input_ids"] == tokenizer(["a <e1>b</e1>"])["input_ids"]
    with torch.no_grad():
        before, after = model(**batch)["logits"], reloaded(**batch)["logits"]
        assert torch.equal(before, after)
        decoded, reloaded_decoded = model(**batch, decode=True), reloaded(**batch, decode=True)
        assert decoded and set(decoded) == set(reloaded_decoded)
        for key, value in decoded.items():
            assert torch.equal(value, reloaded_decoded[key]), key
