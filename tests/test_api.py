"""The Python API, --init_from weight transfer, gradual unfreezing and the offline --dataset_name message."""

from __future__ import annotations

import os

import pytest
import torch

from bert_ft import TrainConfig, finetune, load_model, predict
from bert_ft.cli import main
from bert_ft.encoder import transfer_encoder
from bert_ft.errors import UsageError
from tasks import TASKS
from tasks.ner import NerOptions, NerTask


def small(tiny_model_dir: str, output_dir: str, **overrides) -> TrainConfig:
    settings = {"model_name_or_path": tiny_model_dir, "output_dir": output_dir, "num_train_epochs": 1,
                "max_train_samples": 48, "max_eval_samples": 16, "max_seq_length": 48}
    return TrainConfig(**{**settings, **overrides})


def test_finetune_and_predict_from_python(tiny_model_dir, tmp_path):
    task = NerTask(NerOptions(crf=True))
    metrics = finetune(task, small(tiny_model_dir, str(tmp_path / "run")))
    assert {"test_f1", "eval_f1", "train_samples_per_second"} <= set(metrics)
    [result] = predict(task, str(tmp_path / "run" / "model"), ["Ada Lovelace visited Paris."])
    assert result["text"] == "Ada Lovelace visited Paris." and isinstance(result["entities"], list)
    with pytest.raises(UsageError, match="--num_train_epochs"):
        finetune(task, small(tiny_model_dir, str(tmp_path / "bad"), num_train_epochs=0))


def test_init_from_copies_the_encoder_and_replaces_the_head(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    finetune(NerTask(), small(tiny_model_dir, str(tmp_path / "source"), learning_rate=1e-2))
    source, _, _ = load_model(str(tmp_path / "source" / "model"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentence = TASKS["sentence"](TASKS["sentence"].options_type())
    target = sentence.build_model(tiny_model_dir, ["negative", "positive"], tokenizer, False)
    missing, unexpected = transfer_encoder(target, source)
    printed = capsys.readouterr().out
    assert "missing keys" in printed and "unexpected keys" in printed
    source_state = source.encoder_model().state_dict()
    for key, value in target.encoder_model().state_dict().items():
        if key in source_state:
            assert torch.equal(value, source_state[key]), key
    assert all("classifier" not in key for key in source_state)  # the output layer is never copied
    assert "pooler.dense.weight" in missing  # the NER encoder has no pooler: kept from --model_name_or_path


def test_init_from_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    finetune(NerTask(), small(tiny_model_dir, str(tmp_path / "source")))
    args = ["sentence", "--model_name_or_path", tiny_model_dir, "--init_from", str(tmp_path / "source" / "model"),
            "--output_dir", str(tmp_path / "target"), "--num_train_epochs", "1", "--max_train_samples", "32",
            "--max_eval_samples", "16"]
    assert main(TASKS, args) == 0
    assert "init_from: copied" in capsys.readouterr().out


def test_gradual_unfreezing(tiny_model_dir, tmp_path, capsys):
    config = small(tiny_model_dir, str(tmp_path / "run"), num_train_epochs=2, freeze_layers=1, unfreeze_at_epoch=2)
    finetune(NerTask(), config)
    out = capsys.readouterr().out
    assert "frozen" in out and "epoch 2: encoder unfrozen" in out


def test_dataset_name_offline_gives_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = main(TASKS, ["ner", "--dataset_name", "conll2003", "--output_dir", str(tmp_path / "r")])
    error = capsys.readouterr().err
    assert code == 2 and "--dataset_name conll2003: cannot load it" in error and "--train_file" in error
    assert not os.path.exists(tmp_path / "r")
