"""Sentence classification: readers, clear data errors, save/reload of the head, a real fine-tune on SST-2."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from bert_ft.errors import DataError
from bert_ft_tasks.sentence import SentenceOptions, SentenceTask

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "shared", "data")


def shared_path(*parts: str) -> str:
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (integration data lives in ../shared/data beside the checkout)")
    return path


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def read(path: str, **options) -> list:
    return SentenceTask(SentenceOptions(**options)).read(path)


def data_error(path: str, **options) -> DataError:
    with pytest.raises(DataError) as caught:
        read(path, **options)
    return caught.value


# ------------------------------------------------------------------------------------------------ readers

def test_tsv_is_read_like_glue(tmp_path):
    # GLUE TSV: no quoting (a quote is text), a trailing space before the tab, integer labels.
    path = write(tmp_path, "train.tsv", 'sentence\tlabel\nit \'s a "charming" journey . \t1\nbleak \t0\n\n')
    examples = read(path)
    assert [(e.text, e.label, e.id, e.line) for e in examples] == [
        ('it \'s a "charming" journey .', "1", "1", 2), ("bleak", "0", "2", 3)]
    assert examples[0].text_pair is None


def test_csv_with_quoted_commas_quotes_and_line_breaks(tmp_path):
    path = write(tmp_path, "data.csv", 'id,sentence,label\n'
                                       'a7,"Loud, long, and dull.",negative\n'
                                       'b2,"She said ""wow"", then\nleft.",positive\n'
                                       'c3,Plain text,positive\n')
    examples = read(path, id_column="id")
    assert [(e.id, e.text, e.label) for e in examples] == [
        ("a7", "Loud, long, and dull.", "negative"), ("b2", 'She said "wow", then\nleft.', "positive"),
        ("c3", "Plain text", "positive")]
    assert [e.line for e in examples] == [2, 3, 5]  # the quoted line break moves the next row down


def test_jsonl_with_int_labels_and_pairs(tmp_path):
    lines = [{"sentence": "A man plays.", "sentence2": "Someone plays.", "label": 1},
             {"sentence": "A cat sleeps.", "sentence2": "A dog runs.", "label": 0}]
    path = write(tmp_path, "pairs.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
    examples = read(path)
    assert [(e.text, e.text_pair, e.label, e.id) for e in examples] == [
        ("A man plays.", "Someone plays.", "1", "1"), ("A cat sleeps.", "A dog runs.", "0", "2")]


def test_chinese_text_and_custom_columns(tmp_path):
    path = write(tmp_path, "zh.tsv", "text\tcategory\n这部电影非常好看！\t正面\n剧情拖沓，演员也不行。\t负面\n")
    examples = read(path, text_column="text", label_column="category")
    assert [(e.text, e.label) for e in examples] == [("这部电影非常好看！", "正面"), ("剧情拖沓，演员也不行。", "负面")]


def test_sniffed_delimiter_without_known_extension(tmp_path):
    tab = write(tmp_path, "a.txt", "sentence\tlabel\nfine, really\tpos\n")
    comma = write(tmp_path, "b.data", 'sentence,label\n"fine, really",pos\n')
    assert read(tab)[0].text == read(comma)[0].text == "fine, really"


def test_label_order_numeric_or_alphabetical():
    task = SentenceTask()
    assert task.order_labels({"10", "2", "1", "2"}) == ["1", "2", "10"]
    assert task.order_labels({"-1", "0", "1"}) == ["-1", "0", "1"]
    assert task.order_labels({"positive", "negative", "10"}) == ["10", "negative", "positive"]
    assert task.build_labels(read_examples_with_labels(["2", "10", "1"])) == ["1", "2", "10"]


def read_examples_with_labels(labels):
    from bert_ft_tasks.sentence import SentenceExample

    return [SentenceExample(f"text {label}", label, str(index), "x", index) for index, label in enumerate(labels)]


def test_shipped_samples_read():
    task = SentenceTask()
    sizes = {split: len(task.read(path)) for split, path in task.default_files().items()}
    assert sizes == {"train": 400, "validation": 100, "test": 100}


def test_bom_and_crlf_line_endings(tmp_path):
    path = tmp_path / "win.tsv"
    path.write_bytes("\ufeffsentence\tlabel\r\ngood one\tpos\r\nbad one\tneg\r\n".encode("utf-8"))
    assert [(e.text, e.label, e.line) for e in read(str(path))] == [("good one", "pos", 2), ("bad one", "neg", 3)]


def test_pair_column_equal_to_text_column_is_not_a_pair(tmp_path):
    path = write(tmp_path, "p.tsv", "sentence2\tlabel\nonly one text\t1\n")
    (example,) = read(path, text_column="sentence2")
    assert example.text == "only one text" and example.text_pair is None


# ------------------------------------------------------------------------------------------------ errors

def test_repeated_header_names(tmp_path):
    error = data_error(write(tmp_path, "d.tsv", "sentence\tsentence\tlabel\na\tb\t1\n"))
    assert error.line == 1 and "repeats" in str(error) and "sentence" in str(error)


def test_missing_label_column_names_columns_and_flag(tmp_path):
    error = data_error(write(tmp_path, "nolabel.tsv", "sentence\tsentiment\ngood\t1\n"))
    assert str(error).startswith(f"{tmp_path / 'nolabel.tsv'}:1: no label column 'label'")
    assert "'sentence', 'sentiment'" in str(error) and "--label_column" in str(error)


def test_unlabelled_glue_test_file_gives_the_label_column_error(tmp_path):
    # Same layout as SST-2's test.tsv: index<TAB>sentence, no labels.
    path = write(tmp_path, "test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n")
    error = data_error(path)
    assert error.line == 1 and "no label column 'label'" in str(error) and "'index', 'sentence'" in str(error)
    assert "--test_file" in str(error)


def test_unlabelled_real_sst2_test_file():
    error = data_error(shared_path("sst2", "test.tsv"))
    assert error.path.endswith("test.tsv") and error.line == 1 and "--label_column" in str(error)


def test_missing_text_column(tmp_path):
    # Without --text_column a 'review' column is inferred (below); a named column that is absent is refused.
    error = data_error(write(tmp_path, "t.csv", "review,label\ngood,1\n"), text_column="text")
    assert error.line == 1 and "no text column 'text'" in str(error) and "--text_column" in str(error)
    assert "'review', 'label'" in str(error)


# ------------------------------------------------------------------------- text columns inferred like run_glue.py

def test_single_text_column_is_inferred(tmp_path, capsys):
    path = write(tmp_path, "r.tsv", "review\tlabel\nGreat value.\tpos\nBroke in a day.\tneg\n")
    examples = read(path)
    assert [(e.text, e.text_pair, e.label) for e in examples] == [("Great value.", None, "pos"),
                                                                  ("Broke in a day.", None, "neg")]
    assert capsys.readouterr().out == (f"{path}: columns: text='review', text pair=none, label='label' "
                                       "(inferred: pass --text_column to choose)\n")


def test_text_pair_is_inferred_in_header_order(tmp_path, capsys):
    path = write(tmp_path, "nli.csv", 'premise,hypothesis,label\n"A man plays, loudly.",Someone plays.,entailment\n')
    (example,) = read(path)
    assert (example.text, example.text_pair, example.label) == ("A man plays, loudly.", "Someone plays.", "entailment")
    assert "text='premise', text pair='hypothesis', label='label'" in capsys.readouterr().out
    jsonl = write(tmp_path, "nli.jsonl", json.dumps({"premise": "A", "hypothesis": "B", "label": 1}) + "\n"
                  + json.dumps({"premise": "C", "hypothesis": "D", "label": 0}) + "\n")
    assert [(e.text, e.text_pair) for e in read(jsonl)] == [("A", "B"), ("C", "D")]


def test_identifier_columns_are_skipped_by_name_and_by_unique_integers(tmp_path, capsys):
    by_name = write(tmp_path, "n.tsv", "guid\treview\tlabel\nx7\tfine\tpos\nx9\tbad\tneg\n")
    assert [(e.text, e.text_pair, e.id) for e in read(by_name)] == [("fine", None, "1"), ("bad", None, "2")]
    assert "text='review', text pair=none, label='label' (skipped identifier column 'guid'; inferred: pass " \
           "--text_column to choose)" in capsys.readouterr().out
    by_values = write(tmp_path, "v.csv", "num,question,answer,label\n10,Who?,Me.,1\n3,Why?,So.,0\n")
    assert [(e.text, e.text_pair) for e in read(by_values)] == [("Who?", "Me."), ("Why?", "So.")]
    assert "(skipped identifier column 'num';" in capsys.readouterr().out
    # Integers that repeat are not identifiers: three text candidates, refused.
    repeated = write(tmp_path, "r.csv", "num,question,answer,label\n1,Who?,Me.,1\n1,Why?,So.,0\n")
    assert "3 candidate text columns 'num', 'question', 'answer'" in str(data_error(repeated))
    # The --id_column is never a text column, and a JSONL key named like an id is skipped.
    with_id = write(tmp_path, "i.jsonl", json.dumps({"key": "k1", "row_id": 4, "text": "ok", "label": "a"}) + "\n")
    (example,) = read(with_id, id_column="key")
    assert (example.id, example.text, example.text_pair) == ("k1", "ok", None)
    assert "text='text', text pair=none, label='label' (skipped identifier column 'row_id';" in \
        capsys.readouterr().out


def test_ambiguous_text_columns_are_refused(tmp_path):
    path = write(tmp_path, "a.csv", "id,title,body,summary,label\n1,T,B,S,pos\n2,U,C,R,neg\n")
    error = data_error(path)
    assert error.path == path and error.line == 1
    assert ("cannot tell which columns hold the text: 3 candidate text columns 'title', 'body', 'summary' besides "
            "the label column 'label' (at most 2: text and text pair); skipped identifier column 'id' "
            "(columns found: 'id', 'title', 'body', 'summary', 'label')") in str(error)
    assert "--text_column" in str(error) and "--text_pair_column" in str(error)
    # Naming the text column settles it (the pair then comes only from 'sentence2' or --text_pair_column).
    assert [(e.text, e.text_pair) for e in read(path, text_column="body", text_pair_column="summary")] == [
        ("B", "S"), ("C", "R")]
    only_ids = write(tmp_path, "o.tsv", "idx\tlabel\n0\tpos\n")
    error = data_error(only_ids)
    assert "no text column besides the label column 'label'; skipped identifier column 'idx'" in str(error)


def test_no_label_column_is_still_refused_before_any_inference(tmp_path, capsys):
    error = data_error(write(tmp_path, "n.csv", "review,stars\ngood,5\n"))
    assert error.line == 1 and "no label column 'label' (columns found: 'review', 'stars')" in str(error)
    assert "--label_column" in str(error) and capsys.readouterr().out == ""


def test_default_sentence_columns_need_no_inference(tmp_path, capsys):
    # 'sentence' (and 'sentence2') are used as before, whatever other columns there are; nothing is printed.
    path = write(tmp_path, "s.tsv", "idx\tsentence\tsentence2\tother\tlabel\n0\ta\tb\tc\tpos\n")
    (example,) = read(path)
    assert (example.text, example.text_pair, example.label) == ("a", "b", "pos")
    assert capsys.readouterr().out == ""


def test_missing_id_column(tmp_path):
    error = data_error(write(tmp_path, "t.csv", "sentence,label\ngood,1\n"), id_column="uid")
    assert "no id column 'uid'" in str(error) and "--id_column" in str(error)


@pytest.mark.parametrize("name, text, line", [
    ("extra.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n", 3),
    ("short.tsv", "sentence\tlabel\ngood\t1\n\nno tab here\n", 4),
    ("short.csv", 'sentence,label\n"a, b",1\nonly text\n', 3),
])
def test_wrong_number_of_fields_names_the_line(tmp_path, name, text, line):
    path = write(tmp_path, name, text)
    error = data_error(path)
    assert error.path == path and error.line == line and "expected 2" in str(error)


def test_empty_text_and_empty_label(tmp_path):
    error = data_error(write(tmp_path, "e.tsv", "sentence\tlabel\ngood\t1\n  \t0\n"))
    assert error.line == 3 and "empty text" in str(error)
    error = data_error(write(tmp_path, "l.csv", "sentence,label\ngood,1\nbad,\n"))
    assert error.line == 3 and "empty label" in str(error)
    error = data_error(write(tmp_path, "j.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "", "label": 0}\n'))
    assert error.line == 2 and "empty text" in str(error)


def test_header_only_file(tmp_path):
    path = write(tmp_path, "h.tsv", "sentence\tlabel\n")
    error = data_error(path)
    assert error.path == path and error.line == 1 and "header but no examples" in str(error)


def test_jsonl_errors_name_the_line(tmp_path):
    error = data_error(write(tmp_path, "a.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "x", "lbl": 0}\n'))
    assert error.line == 2 and "no label column 'label'" in str(error) and "'lbl'" in str(error)
    error = data_error(write(tmp_path, "b.jsonl", '{"sentence": "ok", "label": 1}\n{not json\n'))
    assert error.line == 2 and "not valid JSON" in str(error)
    error = data_error(write(tmp_path, "c.jsonl", '{"sentence": "ok", "label": null}\n'))
    assert error.line == 1 and "label" in str(error)


def test_missing_and_empty_files(tmp_path):
    assert "file not found" in str(data_error(str(tmp_path / "absent.tsv")))
    assert "empty" in str(data_error(write(tmp_path, "empty.tsv", "\n \n")))


# ------------------------------------------------------------------------------------------------ model

def test_encode_truncates_and_handles_pairs(tiny_model_dir):
    from bert_ft.encoder import load_tokenizer
    from bert_ft_tasks.sentence import SentenceExample

    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [SentenceExample("word " * 50, "a", "1", "x", 2), SentenceExample("short", "b", "2", "x", 3)]
    features = SentenceTask().encode(examples, tokenizer, 16, ["a", "b"])
    assert [len(f["input_ids"]) for f in features.inputs] == [16, 3] and features.lengths == [16, 3]
    assert [f["labels"] for f in features.inputs] == [0, 1] and features.example_index == [0, 1]
    pair = SentenceExample("a man plays", "a", "1", "x", 2, text_pair="someone plays")
    (feature,) = SentenceTask().encode([pair], tokenizer, 32, ["a"]).inputs
    assert feature["input_ids"].count(tokenizer.sep_token_id) == 2 and max(feature["token_type_ids"]) == 1


def test_saved_and_reloaded_model_gives_identical_logits(tiny_model_dir, tmp_path):
    from bert_ft.data import Collator
    from bert_ft.encoder import load_tokenizer
    from bert_ft.model_folder import load_model, save_model
    from bert_ft.prediction import predict_examples

    task = SentenceTask()
    examples = task.read(task.default_files()["test"])[:12]
    labels = task.build_labels(examples)
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(1)
    model = task.build_model(tiny_model_dir, labels, tokenizer, False).eval()
    folder = str(tmp_path / "model")
    save_model(model, tokenizer, folder, "sentence", {"max_seq_length": 64})
    loaded, loaded_tokenizer, meta = load_model(folder)
    assert meta["task"] == "sentence" and loaded.labels == labels

    features = task.encode(examples, loaded_tokenizer, 64, labels)
    batch = Collator(task.pad_values(tokenizer))(list(enumerate(features.inputs)))
    batch.pop("feature_index")
    with torch.no_grad():
        before, after = model(**batch)["logits"], loaded(**batch)["logits"]
    assert before.shape == (12, len(labels))
    assert torch.equal(before, after)

    results = predict_examples(task, loaded, loaded_tokenizer, [e.text for e in examples[:3]] + [{"text": "fine"}],
                               64, 2)
    assert len(results) == 4 and results[3]["text"] == "fine"
    probabilities = before.softmax(-1)
    for row, result in enumerate(results[:3]):
        assert result["label"] == labels[int(probabilities[row].argmax())]
        assert set(result["probabilities"]) == set(labels)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_and_write_predictions(tmp_path):
    import numpy as np
    from bert_ft.task import Features
    from bert_ft_tasks.sentence import SentenceExample

    task = SentenceTask()
    examples = [SentenceExample(f"t{i}", gold, f"id{i}", "dev.tsv", i + 2) for i, gold in enumerate("aabb")]
    features = Features([{} for _ in range(4)], example_index=list(range(4)), lengths=[1] * 4)
    predicted = [0, 1, 1, 1]  # a, b, b, b
    outputs = [{"pred": np.int64(p), "probs": np.eye(2)[p]} for p in predicted]
    evaluation = task.evaluate(examples, features, outputs, ["a", "b"], "dev.tsv")
    assert evaluation.metrics["accuracy"] == 0.75
    assert evaluation.metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert evaluation.report.startswith("scored file: dev.tsv")
    assert evaluation.confusion == (["a", "b"], [[1, 1], [0, 2]])
    path = str(tmp_path / "test_predictions.jsonl")
    task.write_predictions(path, examples, evaluation.predictions)
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert rows == [{"id": f"id{i}", "gold": g, "pred": p} for i, (g, p) in enumerate(zip("aabb", "abbb"))]


def test_from_hub_class_label_names_and_hidden_test_labels():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    train = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]}, features)
    test = datasets.Dataset.from_dict({"sentence": ["hidden"], "label": [-1], "idx": [0]}, features)
    task = SentenceTask()
    examples = task.from_hub(train, "train")
    assert [(e.text, e.label, e.id) for e in examples] == [("good", "positive", "1"), ("bad", "negative", "2")]
    declared = task.hub_label_names(train)
    assert declared == ["negative", "positive"]
    assert task.build_labels(examples[:1], declared) == ["negative", "positive"]  # the dataset's class-id order
    assert task.build_labels(examples[:1]) == ["positive"]  # no declared order: only the labels seen
    assert task.from_hub(test, "test") == []  # GLUE hides test labels: the split is not scored


def test_train_and_predict_commands_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The whole pipeline through the CLI on JSONL data with Chinese text and string labels (seconds on CPU)."""
    from bert_ft.cli import main

    rows = [{"sentence": text, "label": label, "uid": f"u{index}"}
            for index, (text, label) in enumerate([("很好看", "正面"), ("太差了", "负面"), ("great fun", "正面"),
                                                   ("dull and slow", "负面")] * 4)]
    data = write(tmp_path, "zh.jsonl", "\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    run_dir = str(tmp_path / "run")
    code = main(["sentence", "--model_name_or_path", tiny_model_dir, "--train_file", data,
                        "--validation_file", data, "--test_file", data, "--id_column", "uid", "--output_dir", run_dir,
                        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"])
    assert code == 0
    with open(os.path.join(run_dir, "test_predictions.jsonl"), encoding="utf-8") as handle:
        predictions = [json.loads(line) for line in handle]
    assert [(p["id"], p["gold"]) for p in predictions] == [(row["uid"], row["label"]) for row in rows]
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert {"test_accuracy", "test_macro_f1", "test_macro_precision", "test_macro_recall"} <= set(metrics)
    with open(os.path.join(run_dir, "report.txt"), encoding="utf-8") as handle:
        report = handle.read()
    assert f"scored file: {data}" in report and "gold \\ pred" in report

    capsys.readouterr()
    assert main(["predict", "--model_dir", os.path.join(run_dir, "model"), "真不错", "boring"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in results] == ["真不错", "boring"]
    assert all(set(r["probabilities"]) == {"正面", "负面"} and r["label"] in ("正面", "负面") for r in results)


def test_report_to_tensorboard_logs_loss_and_validation_metric(tiny_model_dir, tmp_path):
    """--report_to tensorboard goes through Accelerate's tracker: an event file with the logged scalars."""
    pytest.importorskip("tensorboard", reason="tensorboard is the optional extra bert-ft[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bert_ft.cli import main

    rows = [{"sentence": text, "label": label} for text, label in [("great fun", "pos"), ("dull", "neg")] * 8]
    data = write(tmp_path, "data.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    run_dir = tmp_path / "run"
    assert main(["sentence", "--model_name_or_path", tiny_model_dir, "--train_file", data,
                        "--validation_file", data, "--output_dir", str(run_dir), "--num_train_epochs", "2",
                        "--per_device_train_batch_size", "4", "--logging_steps", "2",
                        "--report_to", "tensorboard"]) == 0
    event_files = list(run_dir.rglob("events.out.tfevents.*"))
    assert event_files, sorted(str(path) for path in run_dir.rglob("*"))
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train_loss", "lr", "eval_accuracy", "train_samples_per_second", "eval_macro_f1", "epoch"} \
        <= set(scalars), scalars
    # after each epoch's 4 steps, then metrics.json's value at the last step
    assert [event.step for event in events.Scalars("eval_accuracy")] == [4, 8, 8]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert events.Scalars("eval_accuracy")[-1].value == pytest.approx(metrics["eval_accuracy"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ integration

TRAIN_SAMPLES = 400  # first rows of SST-2 train.tsv; 2 epochs, with and without FGM, fit 3 minutes on 2 cores


@pytest.mark.integration
def test_fine_tune_minilm_on_sst2_with_and_without_fgm(tmp_path):
    train, dev = shared_path("sst2", "train.tsv"), shared_path("sst2", "dev.tsv")
    with open(dev, encoding="utf-8") as handle:
        dev_labels = [line.rstrip("\n").split("\t")[1] for line in handle.readlines()[1:201]]
    majority = max(dev_labels.count("0"), dev_labels.count("1")) / len(dev_labels)
    # One intra-op thread: on a machine shared with other jobs, two spinning OpenMP threads run several times
    # slower than one. The run's time is printed, not asserted: a CPU-time bound fails on a loaded machine and
    # says nothing about correctness (speed is measured by benchmarks/speed.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fine_tune_twice(tmp_path, train, dev, dev_labels, majority)
    finally:
        torch.set_num_threads(threads)


def _fine_tune_twice(tmp_path, train: str, dev: str, dev_labels: list[str], majority: float) -> tuple[float, float]:
    from bert_ft.cli import main

    start, cpu_start = time.perf_counter(), time.process_time()
    for adversarial in ("none", "fgm"):
        output_dir = str(tmp_path / adversarial)
        code = main(["sentence", "--train_file", train, "--test_file", dev, "--output_dir", output_dir,
                            "--max_train_samples", str(TRAIN_SAMPLES), "--max_eval_samples", "200",
                            "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
                            "--learning_rate", "2e-4", "--head_learning_rate", "1e-3", "--max_seq_length", "64",
                            "--adversarial", adversarial, "--logging_steps", "100"])
        assert code == 0
        with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
            metrics = json.load(handle)
        assert {"test_accuracy", "test_macro_f1", "train_samples_per_second"} <= set(metrics)
        assert metrics["test_accuracy"] > max(majority, 0.5) + 0.1, (adversarial, metrics["test_accuracy"])
        with open(os.path.join(output_dir, "test_predictions.jsonl"), encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
        assert [row["id"] for row in rows] == [str(number) for number in range(1, 201)]
        assert [row["gold"] for row in rows] == [int(label) for label in dev_labels]  # integer labels stay integers
        with open(os.path.join(output_dir, "report.txt"), encoding="utf-8") as handle:
            assert f"scored file: {dev}" in handle.read()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"SST-2 integration: {wall:.0f} s wall, {cpu:.0f} CPU s (load average {os.getloadavg()[0]:.1f})")
    return wall, cpu


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_first_token_top_layer_equals_the_full_forward(tiny_model_dir, attention):
    """The [CLS]-only top layer gives the stock logits and gradients (padding included) and saves a stock folder."""
    from transformers import AutoModelForSequenceClassification

    from bert_ft_tasks.sentence import SequenceClassifier

    head = SequenceClassifier.create(tiny_model_dir, ["neg", "pos", "neutral"])
    reference = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, attn_implementation=attention)
    reference.load_state_dict(head.model.state_dict())
    head.model.config._attn_implementation = attention
    assert head.first_token_only
    assert "forward" in head.model.base_model.encoder.layer[-1].__dict__
    head.eval(), reference.eval()
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 1000, (4, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:], attention_mask[3, 2:] = 0, 0
    labels = torch.tensor([0, 1, 2, 1])
    places = {"example_row": torch.arange(4), "example_offset": torch.zeros(4, dtype=torch.long),
              "example_length": attention_mask.sum(1)}  # one example per row (a padded batch)
    ours = head(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **places)
    theirs = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(ours["logits"], theirs.logits, atol=1e-6, rtol=1e-5)
    ours["loss"].backward(), theirs.loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in head.model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference_grads[name].grad, atol=1e-6, rtol=1e-4)
    assert set(head.model.state_dict()) == set(reference.state_dict())  # the saved folder is a stock one


def test_first_token_path_stays_off_for_an_unknown_layer_layout(tiny_model_dir):
    from bert_ft.heads import encoder_inputs, read_first_token_only
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    del model.base_model.encoder.layer[-1].intermediate  # not the BERT layout any more
    assert read_first_token_only(model, lambda model, batch: model(**encoder_inputs(batch)).logits) is False
    assert "forward" not in model.base_model.encoder.layer[-1].__dict__
