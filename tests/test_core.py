"""Core behaviour on a tiny random BERT: windows, sampler, lr groups, freezing, config validation, CLI."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from bert_ft.cli import build_parser, parse
from bert_ft.config import TrainConfig
from bert_ft.data import Collator, LengthGroupedSampler, best_window_per_word, padding_stats, word_windows
from bert_ft.errors import UsageError
from bert_ft.optim import build_optimizer, parameter_groups, set_frozen
from bert_ft.plugins import registered_tasks
from bert_ft_tasks.ner import NerExample, NerOptions, NerTask

TASKS = registered_tasks()


# ------------------------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_every_word_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 6) for _ in range(rng.randint(1, 80))]
    budget, stride = rng.randint(6, 20), rng.randint(0, 4)
    windows = word_windows(lengths, budget, stride)
    covered = set()
    for start, end in windows:
        assert end > start
        assert sum(min(length, budget) for length in lengths[start:end]) <= budget
        covered.update(range(start, end))
    assert covered == set(range(len(lengths)))
    assert [start for start, _ in windows] == sorted(start for start, _ in windows)
    chosen = best_window_per_word(windows, len(lengths))
    assert all(windows[w][0] <= word < windows[w][1] for word, w in enumerate(chosen))


def test_long_word_gets_its_own_window():
    assert word_windows([2, 50, 2], budget=10, stride=2) == [(0, 1), (1, 2), (2, 3)]


def test_ner_window_split_and_merge_return_exactly_the_input_words(tiny_model_dir):
    """A sentence far longer than max_seq_length: every word comes back once, with its own label."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    vocabulary = ["Paris", "unbelievably", "x", "Ouagadougou", ",", "the", "Schwarzenegger", "3.14", "a"]
    types = ["PER", "LOC"]
    words = [rng.choice(vocabulary) for _ in range(300)]
    tags = [rng.choice(["O", "B-" + rng.choice(types)]) for _ in words]
    task = NerTask(NerOptions(doc_stride=8))
    examples = [NerExample(words, tags, "mem", 1), NerExample(["short"], ["O"], "mem", 2)]
    labels = task.build_labels(examples)
    features = task.encode(examples, tokenizer, max_seq_length=32, labels=labels)
    assert len(features) > 10 and all(len(feature["input_ids"]) <= 32 for feature in features.inputs)
    assert features.lengths == [len(feature["input_ids"]) for feature in features.inputs]
    assert sorted(set(features.example_index)) == [0, 1] and features.example_index[-1] == 1
    # Fake model outputs: the gold label id at every word start (so the merge must reproduce the gold tags).
    outputs = [{"pred": torch.tensor(feature["labels"]).clamp(min=0).numpy(),
                "score": torch.ones(len(feature["labels"])).numpy()} for feature in features.inputs]
    merged = task.word_predictions(examples, features, outputs, labels)
    assert [[tag for tag, _ in sentence] for sentence in merged] == [tags, ["O"]]


# ------------------------------------------------------------------------------------------------ sampler

def test_length_grouped_sampler_invariants():
    rng = random.Random(1)
    lengths = [rng.randint(3, 120) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=7, mega_batch_factor=8)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [index for batch in batches for index in batch]
        assert sorted(flat) == list(range(1000)), "every example exactly once per epoch"
        assert len(batches) == len(sampler)
    sampler.set_epoch(0)
    first = list(sampler)
    assert first == list(LengthGroupedSampler(lengths, 16, seed=7, mega_batch_factor=8)), "seeded"
    sampler.set_epoch(1)
    assert list(sampler) != first, "a new order each epoch"
    # Length-homogeneous: far less padding than random batches of the same size.
    padded_batches = Collator({"input_ids": 0})
    real, padded = padding_stats(lengths, first, padded_batches)
    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    random_real, random_padded = padding_stats(lengths, [shuffled[i:i + 16] for i in range(0, 1000, 16)],
                                               padded_batches)
    assert 1 - real / padded < (1 - random_real / random_padded) / 3
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 30 for b in first)


def test_mega_batch_factor_one_gives_random_batches():
    """--mega_batch_factor 1: no length grouping, batches as a random sampler makes them (and still seeded)."""
    rng = random.Random(2)
    lengths = [rng.randint(3, 120) for _ in range(640)]
    batches = list(LengthGroupedSampler(lengths, batch_size=32, seed=5, mega_batch_factor=1))
    assert sorted(index for batch in batches for index in batch) == list(range(640))
    padded_batches = Collator({"input_ids": 0})
    real, padded = padding_stats(lengths, batches, padded_batches)
    grouped_real, grouped_padded = padding_stats(lengths, list(LengthGroupedSampler(lengths, 32, seed=5)),
                                                 padded_batches)
    assert 1 - real / padded > 0.3 > 1 - grouped_real / grouped_padded  # random-batch padding vs grouped
    assert batches == list(LengthGroupedSampler(lengths, batch_size=32, seed=5, mega_batch_factor=1))


def test_eval_sampler_is_sorted_and_complete():
    lengths = [5, 50, 7, 30, 1]
    batches = list(LengthGroupedSampler(lengths, 2, seed=0, shuffle=False))
    assert batches == [[1, 3], [2, 0], [4]]


# ------------------------------------------------------------------------------------------------ lr groups

def _tiny_tagger(tiny_model_dir):
    task = NerTask()
    return task.build_model(tiny_model_dir, ["O", "B-PER", "I-PER"], _tokenizer(tiny_model_dir), False)


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_group_learning_rates_follow_layer_decay(tiny_model_dir):
    model = _tiny_tagger(tiny_model_dir)
    groups = parameter_groups(model, learning_rate=1e-4, head_learning_rate=3e-3, layer_lr_decay=0.5,
                              weight_decay=0.01)
    by_name = {}
    for group in groups:
        by_name.setdefault(group.name, set()).add(group.lr)
    # 2 layers: layer.1 gets lr, layer.0 lr*0.5, embeddings lr*0.25; the head its own lr.
    assert by_name == {"embeddings": {2.5e-5}, "layer.0": {5e-5}, "layer.1": {1e-4}, "head": {3e-3}}
    named = {id(param): name for name, param in model.named_parameters()}
    for group in groups:
        for param in group.params:
            name = named[id(param)]
            is_exempt = name.endswith("bias") or "LayerNorm" in name
            assert group.decay != is_exempt, name
    assert sum(len(group.params) for group in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("freeze", [{"freeze_encoder": True, "freeze_layers": 0},
                                    {"freeze_encoder": False, "freeze_layers": 1}])
def test_frozen_weights_stay_bit_identical(tiny_model_dir, freeze):
    model = _tiny_tagger(tiny_model_dir)
    set_frozen(model, **freeze)
    frozen = {name: param.detach().clone() for name, param in model.named_parameters() if not param.requires_grad}
    trainable = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    assert frozen and trainable
    if freeze["freeze_layers"]:
        assert any("layer.1." in name for name in trainable) and not any("layer.0." in n for n in trainable)
    optimizer = build_optimizer(parameter_groups(model, 1e-2, None, 1.0, 0.1), weight_decay=0.1)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long),
             "labels": torch.randint(0, 3, (4, 9)), "word_starts": torch.ones(4, 9, dtype=torch.long),
             "example_row": torch.arange(4), "example_offset": torch.zeros(4, dtype=torch.long),
             "example_length": torch.full((4,), 9)}
    for _ in range(3):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(param, trainable[name]) for name, param in model.named_parameters()
               if name in trainable)


# ------------------------------------------------------------------------------------------------ config / CLI

def test_validation_names_every_bad_flag_at_once():
    with pytest.raises(UsageError) as caught:
        parse(["ner", "--num_train_epochs", "0", "--learning_rate", "-1", "--freeze_encoder",
                      "--layer_lr_decay", "0.8", "--warmup_ratio", "1.5"])
    message = str(caught.value)
    for name in ("--num_train_epochs", "--learning_rate", "--layer_lr_decay", "--warmup_ratio"):
        assert name in message


def test_help_lists_every_config_field(capsys):
    parser = build_parser()
    for name, task in TASKS.items():
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = capsys.readouterr().out
        for dataclass_type in (TrainConfig, task.options_type):
            for item in dataclasses.fields(dataclass_type):
                assert f"--{item.name}" in text, (name, item.name)
                assert item.metadata["help"].split()[0] in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in TASKS)


def test_config_file_is_overridden_by_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.001\nnum_train_epochs: 7\ncrf: true\n")
    _, config, task = parse(["ner", "--config", str(path), "--num_train_epochs", "2"])
    assert isinstance(task, NerTask)
    assert (config.learning_rate, config.num_train_epochs, task.options.crf) == (0.001, 2, True)
    path.write_text("learning_rat: 0.001\n")
    with pytest.raises(UsageError, match="learning_rat"):
        parse(["ner", "--config", str(path)])


@pytest.mark.parametrize("name, task", [("conll2003", "ner"), ("cluener2020", "ner"),
                                        ("semeval2010_task8", "relation"), ("sst2", "sentence")])
def test_ready_configs_are_valid(name, task):
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.yaml")
    _, config, _ = parse([task, "--config", path, "--train_file", "elsewhere.txt"])
    assert config.train_file == "elsewhere.txt" and config.output_dir.startswith("runs/")
