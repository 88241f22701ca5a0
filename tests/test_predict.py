"""Prediction on raw text: long-text windows, character offsets, and agreement with transformers.pipeline."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bert_ft.cli import main
from bert_ft.data import Collator
from bert_ft.model_folder import load_model, save_model
from bert_ft.optim import build_optimizer, parameter_groups
from bert_ft.prediction import predict_examples
from bert_ft.plugins import registered_tasks
from bert_ft_tasks.ner import NerExample, NerTask

TASKS = registered_tasks()

CITIES = ["Paris", "Berlin", "Madrid"]
FILLER = ["the", "a", "we", "walked", "to", "and", "then", "saw", "big", "river", "."]


def city_sentences(count: int, seed: int) -> list[NerExample]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.randint(4, 12)):
            if rng.random() < 0.25:
                words.append(rng.choice(CITIES))
                tags.append("B-LOC")
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        examples.append(NerExample(words, tags, "mem", 0))
    return examples


@pytest.fixture(scope="module")
def city_tagger(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny tagger overfitted to 'city names are B-LOC' in seconds, saved as a bert-ft model folder."""
    from transformers import AutoTokenizer

    task = NerTask()
    examples = city_sentences(64, seed=0)
    labels = ["O", "B-LOC", "I-LOC"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = task.build_model(tiny_model_dir, labels, tokenizer, False)
    features = task.encode(examples, tokenizer, 32, labels)
    collate = Collator(task.pad_values(tokenizer))
    assert len(features) == len(examples)  # short sentences: one window each
    optimizer = build_optimizer(parameter_groups(model, 3e-3, 3e-3, 1.0, 0.0), 0.0)
    model.train()
    for step in range(60):
        start = (step * 16) % 64
        batch = collate([(index, features.inputs[index]) for index in range(start, start + 16)])
        batch.pop("feature_index")
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = str(tmp_path_factory.mktemp("city") / "model")
    save_model(model.eval(), tokenizer, folder, "ner", {"max_seq_length": 32})
    return folder


def test_long_text_returns_every_entity_with_slicing_offsets(city_tagger):
    model, tokenizer, _ = load_model(city_tagger)
    rng = random.Random(3)
    words = [rng.choice(CITIES) if i % 7 == 3 else rng.choice(FILLER[:-1]) for i in range(400)]
    text = "  ".join(words[:200]) + "\n" + " ".join(words[200:])
    [result] = predict_examples(NerTask(), model, tokenizer, [text], max_seq_length=32, batch_size=16)
    cities = [word for word in words if word in CITIES]
    assert len(cities) > 50
    assert [entity["text"] for entity in result["entities"]] == cities  # 400 words in ~20 windows: none lost
    for entity in result["entities"]:
        assert text[entity["start"]:entity["end"]] == entity["text"]
        assert entity["type"] == "LOC" and 0 < entity["score"] <= 1


def test_ner_predictions_equal_transformers_pipeline(city_tagger):
    from transformers import pipeline

    model, tokenizer, _ = load_model(city_tagger)
    texts = ["We walked to Paris, then Berlin.", "Madrid and the big river", "the a we", "Berlin!Paris?Madrid"]
    ours = predict_examples(NerTask(), model, tokenizer, texts, max_seq_length=128, batch_size=8)
    tagger = pipeline("token-classification", model=city_tagger, aggregation_strategy="first", device="cpu")
    for text, result in zip(texts, ours):
        theirs = tagger(text)
        assert [(e["entity_group"], e["start"], e["end"], e["word"].lower()) for e in theirs] == \
            [(e["type"], e["start"], e["end"], e["text"].lower()) for e in result["entities"]], text
        for mine, reference in zip(result["entities"], theirs):
            assert mine["score"] == pytest.approx(float(reference["score"]), abs=1e-5)


def test_predict_command_reads_file_and_writes_jsonl(city_tagger, tmp_path):
    plain, records = tmp_path / "in.txt", tmp_path / "in.jsonl"
    plain.write_text("We saw Paris.\n\nBerlin and Madrid\n")
    records.write_text("\n".join(json.dumps({"text": text}) for text in ("We saw Paris.", "Berlin and Madrid")))
    for inputs in (plain, records):
        output = tmp_path / "out.jsonl"
        assert main(["predict", "--model_dir", city_tagger, "--input_file", str(inputs),
                            "--output_file", str(output)]) == 0
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert [row["text"] for row in rows] == ["We saw Paris.", "Berlin and Madrid"]
        assert [[e["text"] for e in row["entities"]] for row in rows] == [["Paris"], ["Berlin", "Madrid"]]


def test_predict_on_a_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["predict", "--model_dir", str(tmp_path / "nope"), "text"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_sentence_predictions_equal_transformers_pipeline(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, pipeline

    task_type = TASKS["sentence"]
    task = task_type(task_type.options_type())
    examples = task.read(task.default_files()["train"])[:32]
    labels = task.build_labels(examples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = task.build_model(tiny_model_dir, labels, tokenizer, False)
    features = task.encode(examples, tokenizer, 64, labels)
    batch = Collator(task.pad_values(tokenizer))(list(enumerate(features.inputs)))
    batch.pop("feature_index")
    optimizer = build_optimizer(parameter_groups(model, 1e-3, 1e-2, 1.0, 0.0), 0.0)
    for _ in range(5):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = str(tmp_path / "model")
    save_model(model.eval(), tokenizer, folder, "sentence", {"max_seq_length": 64})
    texts = [example.text for example in examples[:6]] + ["这部电影很好看", "Not bad at all!"]
    reloaded, reloaded_tokenizer, _ = load_model(folder)
    ours = predict_examples(task, reloaded, reloaded_tokenizer, texts, max_seq_length=64, batch_size=4)
    classifier = pipeline("text-classification", model=folder, device="cpu", top_k=None)
    for text, result in zip(texts, ours):
        rows = classifier(text)
        rows = rows[0] if rows and isinstance(rows[0], list) else rows  # versions differ in nesting
        theirs = {row["label"]: row["score"] for row in rows}
        assert max(theirs, key=theirs.get) == result["label"], text
        for label, probability in result["probabilities"].items():
            assert probability == pytest.approx(theirs[label], abs=1e-5)
