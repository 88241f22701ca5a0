"""Issue 16, "trust the input": the model's length limit, unusable output folders, non-finite flags, fp16 without a
GPU and training data with a single class, each refused (or clamped) with one clear message."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from dataclasses import dataclass

import pytest
import torch
from transformers import BertConfig, RobertaConfig

from bert_ft.checks import check_label_variety, check_output_dir_path, clamp_max_seq_length, model_length_limit
from bert_ft.config import TrainConfig, _field_type
from bert_ft.errors import DataError, UsageError

from .conftest import ROOT, save_tiny_bert

SAMPLES = os.path.join(ROOT, "tasks", "samples")


def tokenizer_with(limit):
    return types.SimpleNamespace(model_max_length=limit)


# ------------------------------------------------------------------------------------------------ 1. length limit

def test_model_length_limit():
    bert = BertConfig(max_position_embeddings=512)
    assert model_length_limit(tokenizer_with(512), bert) == 512
    assert model_length_limit(tokenizer_with(256), bert) == 256  # the tokenizer is stricter
    assert model_length_limit(tokenizer_with(int(1e30)), BertConfig(max_position_embeddings=64)) == 64  # sentinel
    assert model_length_limit(tokenizer_with(int(1e30)), types.SimpleNamespace()) is None  # nothing says
    assert model_length_limit(tokenizer_with(128), types.SimpleNamespace()) == 128


def test_model_length_limit_subtracts_the_roberta_position_offset():
    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert model_length_limit(tokenizer_with(int(1e30)), roberta) == 512
    xlmr = types.SimpleNamespace(model_type="xlm-roberta", max_position_embeddings=514, pad_token_id=1)
    assert model_length_limit(tokenizer_with(int(1e30)), xlmr) == 512
    bert = types.SimpleNamespace(model_type="bert", max_position_embeddings=512, pad_token_id=0)
    assert model_length_limit(tokenizer_with(int(1e30)), bert) == 512


def test_clamp_max_seq_length():
    printed = []
    bert = BertConfig(max_position_embeddings=512)
    assert clamp_max_seq_length(1000, tokenizer_with(512), bert, log=printed.append) == 512
    assert printed == ["warning: --max_seq_length 1000 exceeds this model's limit of 512 positions; using 512"]
    printed.clear()
    assert clamp_max_seq_length(512, tokenizer_with(512), bert, log=printed.append) == 512
    assert clamp_max_seq_length(128, tokenizer_with(int(1e30)), types.SimpleNamespace(), log=printed.append) == 128
    assert printed == []


# ------------------------------------------------------------------------------------------------ 2. output_dir

def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(UsageError, match=r"--output_dir .*notes\.txt: is a file, not a folder") as caught:
        check_output_dir_path(str(target))
    assert "fix:" in str(caught.value)
    with pytest.raises(UsageError, match=r"notes\.txt is a file, not a folder"):
        check_output_dir_path(str(target / "run" / "deeper"))
    assert target.read_text() == "keep me"


def test_output_dir_usable(tmp_path):
    check_output_dir_path(str(tmp_path))  # an existing folder
    check_output_dir_path(str(tmp_path / "new" / "run"))  # created later, under a writable folder
    assert not (tmp_path / "new").exists(), "the check creates nothing"


def test_output_dir_not_writable(tmp_path, monkeypatch):
    # Root may write anywhere, so the permission answer is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match=r"the folder is not writable"):
        check_output_dir_path(str(tmp_path))
    with pytest.raises(UsageError, match=r"where it would be created, is not writable"):
        check_output_dir_path(str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ 3. non-finite

FLOAT_FIELDS = [item.name for item in dataclasses.fields(TrainConfig) if _field_type(TrainConfig, item) is float]


def test_float_fields_are_found():
    assert {"learning_rate", "head_learning_rate", "warmup_ratio", "validation_split", "adv_epsilon"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_float_flag_is_reported_once(name, value):
    problems = TrainConfig(**{name: value}).problems()
    assert problems == [f"--{name}: must be a finite number, got {value}"]


def test_a_new_float_flag_is_covered():
    @dataclass
    class Extended(TrainConfig):
        label_smoothing: float = 0.0

    assert Extended(label_smoothing=math.nan).problems() == ["--label_smoothing: must be a finite number, got nan"]


def test_finite_values_still_pass():
    assert TrainConfig().problems() == []
    assert TrainConfig(learning_rate=-1.0).problems() == ["--learning_rate: must be > 0, got -1.0"]


# ------------------------------------------------------------------------------------------------ 4. fp16

FP16_MESSAGE = ("--mixed_precision fp16: needs a CUDA GPU (none found); use bf16 (CPUs with AVX-512 BF16 run it "
                "natively) or no")


def test_fp16_needs_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainConfig(mixed_precision="fp16").problems() == [FP16_MESSAGE]
    assert TrainConfig(mixed_precision="bf16").problems() == []
    assert TrainConfig(mixed_precision="no").problems() == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainConfig(mixed_precision="fp16").problems() == []


# ------------------------------------------------------------------------------------------------ 5. label variety

@dataclass
class Item:
    labels: list


class LabelTask:
    def labels_of(self, example):
        return example.labels


def items(*labels):
    return [Item(list(value) if isinstance(value, (list, tuple)) else [value]) for value in labels]


def test_single_class_is_refused():
    with pytest.raises(DataError) as caught:
        check_label_variety(LabelTask(), items(*["pos"] * 120), "train.tsv")
    message = str(caught.value)
    assert message.startswith("train.tsv: every training example has the label 'pos' (120 examples); a classifier "
                              "needs at least two classes\n  fix: ")


def test_two_classes_pass():
    check_label_variety(LabelTask(), items("pos", "neg", "pos"), "train.tsv")


def test_tags_without_any_entity_are_refused():
    with pytest.raises(DataError) as caught:
        check_label_variety(LabelTask(), items(["O", "O"], ["O"]), "train.txt")
    assert str(caught.value).startswith("train.txt: no entity in the training data: all 3 tags of the 2 training "
                                        "examples are 'O'")
    assert "\n  fix: " in str(caught.value)


def test_tags_with_one_entity_type_pass():
    check_label_variety(LabelTask(), items(["B-PER", "I-PER", "O"], ["O"]), "train.txt")
    check_label_variety(LabelTask(), items(["B-PER"]), "train.txt")  # no O at all is fine too


def test_no_training_examples_is_refused():
    with pytest.raises(DataError, match="no training example"):
        check_label_variety(LabelTask(), [], "train.txt")


# ------------------------------------------------------------------------------------------------ the command line

def run_main(argv, capsys):
    from bert_ft.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code, err, expected):
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expected in err, err
    assert "Traceback" not in err


def base_args(tiny_model_dir, output_dir, *extra):
    return ["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir), "--num_train_epochs", "1",
            "--max_train_samples", "32", "--max_eval_samples", "16", *extra]


@pytest.fixture(scope="module")
def short_position_model_dir(tmp_path_factory) -> str:
    """The tiny BERT with a 64-position table (its tokenizer still says 512)."""
    return save_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert-64")), max_position_embeddings=64)


def test_cli_clamps_max_seq_length(short_position_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "run"
    code, out, err = run_main(base_args(short_position_model_dir, output_dir, "--max_seq_length", "1000"), capsys)
    assert code == 0, err
    assert ("warning: --max_seq_length 1000 exceeds this model's limit of 64 positions; using 64") in out + err
    with open(output_dir / "config.json", encoding="utf-8") as handle:
        assert json.load(handle)["max_seq_length"] == 64
    assert (output_dir / "metrics.json").exists()


def test_cli_output_dir_is_a_file(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a folder")
    code, _, err = run_main(base_args(tiny_model_dir, target), capsys)
    assert_one_error(code, err, f"--output_dir {target}: is a file, not a folder")
    assert target.read_text() == "not a folder"


def test_cli_output_dir_under_a_file(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a folder")
    code, _, err = run_main(base_args(tiny_model_dir, target / "run"), capsys)
    assert_one_error(code, err, "results is a file, not a folder")
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("flag", ["--learning_rate", "--warmup_ratio", "--adv_epsilon"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_non_finite_flag(flag, value, tiny_model_dir, tmp_path, capsys):
    code, _, err = run_main(base_args(tiny_model_dir, tmp_path / "run", flag, value), capsys)
    assert_one_error(code, err, f"{flag}: must be a finite number, got {value}")
    assert err.count(flag + ":") == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_non_finite_value_in_a_config_file(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: .nan\n")
    code, _, err = run_main(base_args(tiny_model_dir, tmp_path / "run", "--config", str(config)), capsys)
    assert_one_error(code, err, "--learning_rate: must be a finite number, got nan")
    assert not (tmp_path / "run").exists()


def test_cli_fp16_without_gpu(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(base_args(tiny_model_dir, tmp_path / "run", "--mixed_precision", "fp16"), capsys)
    assert_one_error(code, err, FP16_MESSAGE)
    assert not (tmp_path / "run").exists()


def test_cli_ner_without_entities(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text("Peter O\nran O\n\nto O\nParis O\n", encoding="utf-8")
    test = tmp_path / "test.txt"
    test.write_text("Peter O\n", encoding="utf-8")
    code, _, err = run_main(base_args(tiny_model_dir, tmp_path / "run", "--train_file", str(train),
                                      "--validation_file", str(test), "--test_file", str(test)), capsys)
    assert_one_error(code, err, f"{train}: no entity in the training data")
    assert not (tmp_path / "run").exists()


def test_cli_sentence_single_class(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"good film {index}\tpos\n" for index in range(6)), encoding="utf-8")
    args = ["sentence", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
            "--num_train_epochs", "1", "--train_file", str(train), "--validation_file", str(train),
            "--test_file", str(train)]
    code, _, err = run_main(args, capsys)
    assert_one_error(code, err, f"{train}: every training example has the label 'pos' (6 examples)")
    assert not (tmp_path / "run").exists()


def sentence_args(tiny_model_dir, output_dir, train, *extra):
    return ["sentence", "--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir), "--num_train_epochs",
            "1", "--train_file", str(train), "--validation_file", str(train), "--test_file", str(train), *extra]


def test_cli_infers_the_text_columns_like_run_glue(tiny_model_dir, tmp_path, capsys):
    """No 'sentence' column: the non-label columns become text and text pair, an id column is skipped, and the
    choice is printed; the run trains on those columns."""
    train = tmp_path / "pairs.csv"
    rows = [(7 + index, f"premise {index}", f"hypothesis {index}", "yes" if index % 2 else "no") for index in range(8)]
    train.write_text("guid,premise,hypothesis,label\n" + "".join(f"{i},{p},{h},{y}\n" for i, p, h, y in rows),
                     encoding="utf-8")
    code, out, err = run_main(sentence_args(tiny_model_dir, tmp_path / "run", train), capsys)
    assert code == 0, err
    assert "columns: text='premise', text pair='hypothesis', label='label' (skipped identifier column 'guid'" in out
    predictions = [json.loads(line) for line in (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()]
    assert [row["gold"] for row in predictions] == [y for *_, y in rows]


def test_cli_ambiguous_text_columns_are_refused(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "three.tsv"
    train.write_text("title\tbody\tsummary\tlabel\n" + "".join(f"t{i}\tb{i}\ts{i}\t{'ab'[i % 2]}\n" for i in range(6)),
                     encoding="utf-8")
    code, _, err = run_main(sentence_args(tiny_model_dir, tmp_path / "run", train), capsys)
    assert_one_error(code, err, "cannot tell which columns hold the text: 3 candidate text columns")
    assert "--text_column" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("task", ["relation", "sentence"])
def test_cli_check_data_for_every_task(task, tiny_model_dir, tmp_path, capsys):
    code, out, err = run_main([task, "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                               "--check_data"], capsys)
    assert code == 0, err
    assert "data check passed" in out and "train" in out
    assert not (tmp_path / "run").exists(), "--check_data trains nothing and writes nothing"
