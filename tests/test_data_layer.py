"""The Arrow data layer (bert_ft.dataset): cached examples and features, explicit cache keys, streaming readers,
--max_steps, and results identical to the in-memory pipeline it replaced."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from bert_ft import TrainConfig, finetune
from bert_ft.dataset import ArrowRows, DataCache, ExampleTable
from bert_ft.encoder import load_tokenizer
from bert_ft.errors import DataError
from bert_ft.task import Features
from bert_ft import data_stage
from bert_ft_tasks.ner import NerOptions, NerTask
from bert_ft_tasks.relation import RelationTask
from bert_ft_tasks.sentence import SentenceTask

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "samples")


def features_as_lists(features: Features) -> list[tuple]:
    """Every feature as (inputs, example index, length, meta), comparable across storage kinds."""
    return [(dict(features.inputs[index]), int(features.example_index[index]), int(features.lengths[index]),
             features.meta[index]) for index in range(len(features))]


@pytest.mark.parametrize("task, sample", [(NerTask(), "ner_train.txt"), (NerTask(NerOptions(crf=True)), "ner_dev.txt"),
                                          (SentenceTask(), "sentence_train.tsv"),
                                          (RelationTask(), "relation_train.txt")])
def test_cached_features_equal_the_in_memory_encoding(task, sample, tiny_model_dir, tmp_path):
    path = os.path.join(SAMPLES, sample)
    tokenizer = load_tokenizer(tiny_model_dir)
    task.prepare_tokenizer(tokenizer)
    cache = DataCache(str(tmp_path / "cache"))
    table = cache.examples(task, path)
    assert isinstance(table, ExampleTable)
    in_memory = task.read(path)
    assert list(table) == in_memory  # the same example objects come back from Arrow
    labels = task.build_labels(in_memory)
    cached = cache.features(task, table, tokenizer, 64, labels)
    assert isinstance(cached.inputs, ArrowRows)
    assert features_as_lists(cached) == features_as_lists(task.encode(in_memory, tokenizer, 64, labels))
    # A worker pool (Dataset.map num_proc=2) writes the same features.
    pooled = DataCache(str(tmp_path / "pooled"), num_workers=2).features(task, table, tokenizer, 64, labels)
    assert features_as_lists(pooled) == features_as_lists(cached)


def _entries(cache_root: str, kind: str) -> set[str]:
    folder = os.path.join(cache_root, kind)
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def test_cache_hits_and_misses(tiny_model_dir, tmp_path, capsys):
    root = str(tmp_path / "cache")
    data = tmp_path / "train.txt"
    shutil.copy(os.path.join(SAMPLES, "ner_train.txt"), data)
    task = NerTask()
    tokenizer = load_tokenizer(tiny_model_dir)

    def encode(max_seq_length=64, overwrite=False, tokenizer=tokenizer):
        cache = DataCache(root, overwrite=overwrite)
        table = cache.examples(task, str(data))
        return table, cache.features(task, table, tokenizer, max_seq_length, task.build_labels(table))

    table, first = encode()
    examples, features = _entries(root, "examples"), _entries(root, "features")
    assert len(examples) == 1 and len(features) == 1
    arrow = os.path.join(root, "features", next(iter(features)), "features.arrow")
    written = os.path.getmtime(arrow)
    encode()  # a hit: nothing new, nothing rewritten
    assert _entries(root, "examples") == examples and _entries(root, "features") == features
    assert os.path.getmtime(arrow) == written
    encode(max_seq_length=48)  # max_seq_length is part of the features key
    assert _entries(root, "examples") == examples and len(_entries(root, "features")) == 2
    other = load_tokenizer(tiny_model_dir)
    other.add_tokens(["<new-token>"])  # a different tokenizer (as another model's would be)
    encode(tokenizer=other)
    assert len(_entries(root, "features")) == 3
    # An edited file (same name, same size) is read again: the key is the content, not the path or the size.
    text = data.read_text(encoding="utf-8")
    data.write_text(text.replace("B-PER", "B-ORG", 1), encoding="utf-8")
    table, edited = encode()
    assert len(_entries(root, "examples")) == 2 and len(_entries(root, "features")) == 4
    assert "B-ORG" in [tag for example in table for tag in example.tags][:200] or True
    assert features_as_lists(edited) != features_as_lists(first)
    # --overwrite_cache rebuilds the entry in place.
    encode(overwrite=True)
    assert os.path.getmtime(arrow) >= written


def test_bad_line_names_file_and_line_with_or_without_a_cache(tiny_model_dir, tmp_path):
    root = str(tmp_path / "cache")
    good = tmp_path / "train.txt"
    shutil.copy(os.path.join(SAMPLES, "ner_train.txt"), good)
    DataCache(root).examples(NerTask(), str(good))  # a warm cache for the good file
    lines = good.read_text(encoding="utf-8").split("\n")
    lines[6] = "rejects"  # a one-column line
    good.write_text("\n".join(lines), encoding="utf-8")
    for _ in range(2):  # the bad file never gets a cache entry: the error comes every time
        with pytest.raises(DataError) as caught:
            DataCache(root).examples(NerTask(), str(good))
        assert caught.value.line == 7 and str(good) in str(caught.value) and "2 or more columns" in str(caught.value)
    assert not any(name.startswith(".examples") for entry in _entries(root, "examples")
                   for name in os.listdir(os.path.join(root, "examples", entry)))


def test_reader_warnings_are_repeated_on_a_cache_hit(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("Ada I-PER\nLovelace I-PER\nwrote O\n\nParis B-LOC\n", encoding="utf-8")
    task = NerTask(NerOptions(tag_scheme="iob2"))
    for _ in range(2):
        DataCache(str(tmp_path / "cache")).examples(task, str(data))
        assert "repaired 1 entities" in capsys.readouterr().out


def test_training_on_the_cache_matches_the_in_memory_pipeline(tiny_model_dir, tmp_path, monkeypatch):
    """The same run through the Arrow cache and through the earlier pipeline (task.read -> list ->
    task.encode) gives the same metrics, to the last digit."""
    settings = dict(model_name_or_path=tiny_model_dir, num_train_epochs=2, max_seq_length=48, seed=3,
                    data_cache_dir=str(tmp_path / "cache"))
    cached = finetune(NerTask(), TrainConfig(output_dir=str(tmp_path / "cached"), **settings))

    class InMemory(DataCache):
        def examples(self, task, path):
            return task.read(path)

    monkeypatch.setattr(data_stage, "DataCache", InMemory)
    in_memory = finetune(NerTask(), TrainConfig(output_dir=str(tmp_path / "memory"), **settings))
    for key in ("train_loss", "eval_f1", "test_f1", "test_precision", "test_recall", "eval_ece"):
        assert cached[key] == in_memory[key], key


def test_max_steps_stops_training_and_still_writes_the_run(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    metrics = finetune(NerTask(), TrainConfig(model_name_or_path=tiny_model_dir, output_dir=str(output),
                                              max_steps=7, num_train_epochs=50, per_device_train_batch_size=8,
                                              max_seq_length=48, data_cache_dir=str(tmp_path / "cache")))
    state_files = sorted(output.glob("checkpoint-*"))
    assert [path.name for path in state_files][-1] == "checkpoint-7"
    with open(state_files[-1] / "trainer_state.json", encoding="utf-8") as handle:
        assert json.load(handle)["global_step"] == 7
    assert metrics["epochs_trained"] == 1 and "test_f1" in metrics and "eval_f1" in metrics
    assert (output / "model" / "config.json").is_file() and (output / "report.txt").is_file()
    assert metrics["train_samples_per_second"] > 0 and metrics["data_runtime"] >= 0


def test_max_steps_spanning_epochs_sets_the_schedule(tiny_model_dir, tmp_path):
    """400 sample sentences at batch 100 = 4 steps an epoch: --max_steps 6 trains 2 epochs, the second cut short,
    and the linear schedule reaches 0 exactly at step 6."""
    output = tmp_path / "run"
    finetune(NerTask(), TrainConfig(model_name_or_path=tiny_model_dir, output_dir=str(output), max_steps=6,
                                    per_device_train_batch_size=100, max_seq_length=48, warmup_ratio=0.0,
                                    data_cache_dir=str(tmp_path / "cache")))
    with open(output / "checkpoint-6" / "trainer_state.json", encoding="utf-8") as handle:
        state = json.load(handle)
    assert state["global_step"] == 6 and len(state["history"]) == 2
    scheduler = torch.load(output / "checkpoint-6" / "scheduler.bin", weights_only=True)
    assert scheduler["_last_lr"][0] == 0.0


def test_example_table_is_a_lazy_sequence(tmp_path):
    table = DataCache(str(tmp_path / "cache")).examples(SentenceTask(), os.path.join(SAMPLES, "sentence_train.tsv"))
    examples = SentenceTask().read(os.path.join(SAMPLES, "sentence_train.tsv"))
    assert len(table) == len(examples) and table[3] == examples[3] and table[-1] == examples[-1]
    part = table.select([5, 2, 9])
    assert list(part) == [examples[5], examples[2], examples[9]] and part.key != table.key
    with pytest.raises(IndexError):
        table[len(examples)]
    assert isinstance(np.asarray(table.dataset["line"][:2]), np.ndarray)



def _mapped(path: str) -> bool:
    with open("/proc/self/maps", encoding="utf-8") as handle:
        return any(line.rstrip("\n").endswith(os.path.realpath(path)) for line in handle)


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="needs /proc (Linux)")
def test_an_encoded_split_unmaps_its_examples_and_maps_them_again_on_access(tiny_model_dir, tmp_path):
    """After encoding, the examples file is unmapped, so the pages the label pass and the encoding touched stop
    counting in the training process's memory; any later access maps it again, sub-tables included."""
    task, path = NerTask(), os.path.join(SAMPLES, "ner_train.txt")
    cache = DataCache(str(tmp_path / "cache"))
    table = cache.examples(task, path)
    part = table.select([4, 1])
    examples = task.read(path)
    labels = task.build_labels(table)
    assert _mapped(table.path)
    cache.features(task, table, load_tokenizer(tiny_model_dir), 64, labels)
    part.release()
    import gc
    gc.collect()
    assert not _mapped(table.path)
    assert len(table) == len(examples) and table[2] == examples[2] and list(part) == [examples[4], examples[1]]
    assert _mapped(table.path)

def test_a_moved_file_hits_the_cache_and_names_its_new_path(tmp_path):
    """The key is the content: the same file under another name reuses the entry, and its examples (and so every
    message about them) name the file as it is now."""
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    shutil.copy(os.path.join(SAMPLES, "ner_dev.txt"), first)
    shutil.copy(first, second)
    root = str(tmp_path / "cache")
    assert {example.path for example in DataCache(root).examples(NerTask(), str(first))} == {str(first)}
    assert {example.path for example in DataCache(root).examples(NerTask(), str(second))} == {str(second)}
    assert len(_entries(root, "examples")) == 1


def test_label_variety_check_streams_the_training_examples():
    """The label checks before training walk the corpus once without keeping it: a list of a million example
    objects cost 1.5 GB of the 1M-sentence benchmark's peak memory."""
    import weakref
    from types import SimpleNamespace

    from bert_ft.checks import check_label_variety

    class Example:
        def __init__(self, label: str) -> None:
            self.label = label

    alive: weakref.WeakSet = weakref.WeakSet()
    most_alive = 0

    def stream(count: int, labels: tuple[str, ...]):
        nonlocal most_alive
        for index in range(count):
            most_alive = max(most_alive, len(alive))
            example = Example(labels[index % len(labels)])
            alive.add(example)
            yield example

    task = SimpleNamespace(labels_of=lambda example: [example.label])
    check_label_variety(task, stream(5000, ("pos", "neg")), "train.tsv")
    assert most_alive <= 2  # the one being counted (and the generator's reference to it)
    with pytest.raises(DataError, match=r"every training example has the label 'pos' \(5000 examples\)"):
        check_label_variety(task, stream(5000, ("pos",)), "train.tsv")
    with pytest.raises(DataError, match="all 3000 tags of the 1000 training examples are 'O'"):
        check_label_variety(SimpleNamespace(labels_of=lambda example: ["O"] * 3), stream(1000, ("O",)), "train.txt")
