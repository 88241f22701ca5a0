"""Integration: fine-tune the real MiniLM on slices of ../shared/data (CoNLL-2003 and CLUENER2020)."""

from __future__ import annotations

import json
import os

import pytest

from bert_ft.cli import main
from bert_ft_tasks.ner import NerTask

from .conftest import shared_path

pytestmark = pytest.mark.integration


def finetune(output_dir: str, train: str, test: str, *extra: str) -> dict:
    args = ["ner", "--train_file", train, "--test_file", test, "--output_dir", output_dir,
            "--num_train_epochs", "3", "--max_seq_length", "64", *extra]
    assert main(args) == 0
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_conll2003_slice(tmp_path):
    train, test = shared_path("conll2003", "train.txt"), shared_path("conll2003", "test.txt")
    metrics = finetune(str(tmp_path), train, test, "--max_train_samples", "400", "--max_eval_samples", "150")
    assert metrics["test_f1"] > 0.35, metrics  # chance is ~0; 400 sentences x 3 epochs reach ~0.5
    for key in ("test_precision", "test_recall", "test_strict_f1", "train_runtime", "train_samples_per_second",
                "train_tokens_per_second", "padding_ratio", "peak_memory_mb", "num_processes"):
        assert key in metrics
    # Every test word present, sentences in input order.
    gold = NerTask().read(test)[:150]
    with open(tmp_path / "test_predictions.txt", encoding="utf-8") as handle:
        blocks = handle.read().strip("\n").split("\n\n")
    assert [[line.split()[:2] for line in block.split("\n")] for block in blocks] == \
        [[[word, tag] for word, tag in zip(example.words, example.tags)] for example in gold]
    for name in ("report.txt", "config.json", "model/model.safetensors", "model/bert_ft.json",
                 "training_curves.png", "confusion_matrix.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cluener_slice_with_crf(tmp_path):
    """Chinese, tagged per character from inclusive character spans; the CRF head."""
    train, dev = shared_path("cluener2020", "train.json"), shared_path("cluener2020", "dev.json")
    metrics = finetune(str(tmp_path), train, dev, "--max_train_samples", "400", "--max_eval_samples", "120",
                       "--crf", "--head_learning_rate", "5e-3")
    assert metrics["test_f1"] > 0.05, metrics  # an English uncased vocabulary: low, but clearly above chance (0)
    with open(tmp_path / "test_predictions.txt", encoding="utf-8") as handle:
        first = handle.read().split("\n\n")[0].split("\n")
    with open(dev, encoding="utf-8") as handle:
        text = json.loads(handle.readline())["text"]
    assert [line.split()[0] for line in first] == list(text)
