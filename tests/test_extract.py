"""Extraction from raw text (NER model -> candidate pairs -> relation model), its end-to-end scores, and the
SemEval-2010 -> joint converter with the way back for the official score.

The models are tiny random BERTs trained from examples/own_data/joint.jsonl (the `joint_models` fixture)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from bert_ft.cli import main
from bert_ft.inference import packing_is_exact
from bert_ft.plugins import use_task_modules
from bert_ft_tasks.convert import is_semeval_joint, semeval_label, semeval_to_joint
from bert_ft_tasks.extract import ExtractStats, Extractor, evaluate_extraction, extract, sentence_starts
from bert_ft_tasks.relation import RelationExample, joint_examples, read_joint, read_semeval

from .conftest import JOINT_SAMPLE, shared_path

# The commands are entry points (pyproject.toml); naming their modules as well keeps these tests independent of
# whether the editable install's metadata has been refreshed since they were added (`make setup` does it).
use_task_modules(["bert_ft_tasks.extract", "bert_ft_tasks.convert"])

TEXTS = ["  Lisinopril 10 mg daily controls his hypertension.",
         "😀 Omeprazole 20 mg before breakfast for reflux. Gabapentin 300 mg at night eases his neuropathic pain.",
         "Amoxicillin 250 mg was prescribed for acute otitis media.\r\nNo drug was given."]


@pytest.fixture(scope="module")
def extractor(joint_models) -> Extractor:
    return Extractor(joint_models["ner"], joint_models["relation"])


def test_extract_offsets_are_exact_on_the_input_and_relations_index_entities(extractor, joint_models):
    outputs = extract(joint_models["ner"], joint_models["relation"], TEXTS + [{"text": TEXTS[0], "id": "a-1"}])
    assert [output["text"] for output in outputs] == TEXTS + [TEXTS[0]] and outputs[3]["id"] == "a-1"
    found = [entity for output in outputs for entity in output["entities"]]
    assert len(found) >= 6, found  # the tagger learnt the sample's drugs, doses and conditions
    for output in outputs:
        for entity in output["entities"]:
            assert output["text"][entity["start"]:entity["end"]] == entity["text"]
        for relation in output["relations"]:
            assert 0 <= relation["head"] < len(output["entities"]) and 0 <= relation["tail"] < len(output["entities"])
            assert relation["label"] in ("treats", "dose_of", "causes")  # never the negative label
    lisinopril = next(entity for entity in outputs[0]["entities"] if entity["text"] == "Lisinopril")
    assert (lisinopril["start"], lisinopril["end"], lisinopril["type"]) == (2, 12, "DRUG")


def test_candidate_pairs_stay_in_a_sentence_and_skip_type_pairs_never_related(extractor):
    text = "Aspirin 81 mg helps. Stroke risk falls."
    entities = [{"start": 0, "end": 7, "type": "DRUG"}, {"start": 8, "end": 13, "type": "DOSE"},
                {"start": 21, "end": 27, "type": "CONDITION"}]
    assert sentence_starts(text) == [0, 21]
    extractor.stats.skipped_unseen_type_pairs = extractor.stats.skipped_other_sentence = 0
    # the sample relates DRUG -> CONDITION and DOSE -> DRUG only: DRUG -> DOSE is skipped; Stroke is alone
    assert extractor.candidates(text, entities) == [(1, 0)]
    assert (extractor.stats.skipped_unseen_type_pairs, extractor.stats.skipped_other_sentence) == (1, 4)
    extractor.keep_unseen_type_pairs = True
    try:
        assert extractor.candidates(text, entities) == [(0, 1), (1, 0)]
        extractor.pair_scope = "text"
        assert len(extractor.candidates(text, entities)) == 6
    finally:
        extractor.keep_unseen_type_pairs, extractor.pair_scope = False, "sentence"
    assert extractor.related_type_pairs == {("DRUG", "CONDITION"), ("DOSE", "DRUG")}


def test_negative_label_is_never_output_and_directed_labels_turn_the_pair(extractor):
    entities = [{"start": 0, "end": 1, "type": "A"}, {"start": 2, "end": 3, "type": "B"}]
    results = [{"label": "no_relation", "probability": 0.9}, {"label": "treats", "probability": 0.6}]
    assert extractor.relate("a b", entities, [(0, 1), (1, 0)], results) == \
        [{"head": 1, "tail": 0, "label": "treats", "probability": 0.6}]
    # a relation model trained on SemEval's directed labels: X(e2,e1) on the marked pair (0, 1) means 1 -> 0; the
    # two orders agree on one triple, the more probable kept
    directed = [{"label": "Cause-Effect(e2,e1)", "probability": 0.7}, {"label": "Cause-Effect(e1,e2)", "probability": 0.8},
                {"label": "Other", "probability": 0.99}]
    extractor.negative = "Other"  # such a model's negative label
    try:
        assert extractor.relate("a b", entities, [(0, 1), (1, 0), (0, 1)], directed) == \
            [{"head": 1, "tail": 0, "label": "Cause-Effect", "probability": 0.8}]
    finally:
        extractor.negative = "no_relation"


def test_packed_relation_batches_score_as_padded_ones(extractor):
    texts = [json.loads(line)["text"] for line in open(JOINT_SAMPLE, encoding="utf-8")]
    records = [read_joint(json.loads(line), JOINT_SAMPLE, number)
               for number, line in enumerate(open(JOINT_SAMPLE, encoding="utf-8"), start=1)]
    marked = [example.text for record in records for example in joint_examples(record, "no_relation")]
    assert len(marked) > 40 and len(texts) == 12
    task, model, tokenizer = extractor.relation_task, extractor.relation_model, extractor.relation_tokenizer
    features = task.encode(task.input_examples(marked), tokenizer, 48, model.labels)
    assert packing_is_exact(model, features, task.pad_values(tokenizer))  # the check predict(pack=True) runs
    packed, padded = extractor.classify(marked, pack=True), extractor.classify(marked, pack=False)
    assert [result["label"] for result in packed] == [result["label"] for result in padded]
    assert torch.allclose(torch.tensor([r["probability"] for r in packed]),
                          torch.tensor([r["probability"] for r in padded]), atol=1e-5)


class CannedExtractor(Extractor):
    """An Extractor whose models are replaced by canned outputs: the scores below are computed by hand."""

    def __init__(self, outputs, pair_labels) -> None:  # noqa: D107 - no models to load
        self.outputs, self.pair_labels, self.negative = outputs, pair_labels, "no_relation"
        self.keep_unseen_type_pairs, self.pair_scope, self.related_type_pairs = False, "sentence", None
        self.stats = ExtractStats(texts=len(outputs), seconds=1.0)
        self.ner_meta, self.relation_meta = {"entity_types": ["A", "B"]}, {}
        self.relation_model = type("Labels", (), {"labels": ["r", "s", "no_relation"]})()

    def extract(self, inputs):
        return self.outputs

    def classify(self, marked, pack=None):
        return [{"label": self.pair_labels.get(text, "no_relation"), "probability": 0.9} for text in marked]


def test_end_to_end_scores_match_a_hand_count(tmp_path):
    gold = [{"text": "x1 y1 z1", "entities": [{"id": "1", "start": 0, "end": 2, "type": "A"},
                                              {"id": "2", "start": 3, "end": 5, "type": "B"},
                                              {"id": "3", "start": 6, "end": 8, "type": "B"}],
             "relations": [{"head": "1", "tail": "2", "label": "r"}, {"head": "1", "tail": "3", "label": "s"}]},
            {"text": "p q", "entities": [{"id": "a", "start": 0, "end": 1, "type": "A"},
                                         {"id": "b", "start": 2, "end": 3, "type": "B"}],
             "relations": [{"head": "b", "tail": "a", "label": "r"}]}]
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in gold), encoding="utf-8")
    entity = lambda start, end, kind: {"start": start, "end": end, "type": kind}  # noqa: E731
    outputs = [{"entities": [entity(0, 2, "A"), entity(3, 5, "A"), entity(6, 8, "B")],  # 2nd: right span, wrong type
                "relations": [{"head": 0, "tail": 1, "label": "r", "probability": 0.9},  # boundaries-only hit
                              {"head": 0, "tail": 2, "label": "s", "probability": 0.8}]},  # strict hit
               {"entities": [entity(0, 1, "A"), entity(2, 3, "B")],
                "relations": [{"head": 0, "tail": 1, "label": "r", "probability": 0.7}]}]  # wrong direction
    pair_labels = {"<e1>x1</e1> <e2>y1</e2> z1": "r", "<e2>p</e2> <e1>q</e1>": "s"}
    metrics, report, _ = evaluate_extraction(CannedExtractor(outputs, pair_labels), str(path))
    assert (metrics["triple_precision"], metrics["triple_recall"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert (metrics["boundary_triple_precision"], metrics["boundary_triple_recall"]) == \
        (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (metrics["ner_precision"], metrics["ner_recall"]) == (pytest.approx(4 / 5), pytest.approx(4 / 5))
    # gold pairs: 8 ordered pairs, 3 related; predicted r on 1->2 (hit), s on b->a (gold r: a miss for r, a false s)
    # r: P 1/1, R 1/2 -> F1 2/3; s: P 0/1, R 0/1 -> 0; macro (2/3 + 0) / 2
    assert metrics["relation_gold_entities_macro_f1"] == pytest.approx(1 / 3)
    assert "triples, strict" in report and "semeval" not in json.dumps(metrics)


SEMEVAL_SNIPPET = ('1\t"The <e1>fire</e1> was caused by <e2>lightning</e2>."\r\nCause-Effect(e2,e1)\r\nComment:\r\n\r\n'
                   '2\t"A <e1>cup</e1> on the <e2>table</e2>."\r\nOther\r\n\r\n'
                   '3\t"The <e1>handle</e1> of the <e2>door</e2>."\r\nComponent-Whole(e1,e2)\r\n\r\n')


def test_semeval_converter_against_hand_made_records(tmp_path, capsys):
    source = tmp_path / "TRAIN.TXT"
    source.write_bytes(SEMEVAL_SNIPPET.encode("utf-8"))
    target = tmp_path / "train.jsonl"
    assert main(["convert", "--input_file", str(source), "--output_file", str(target)]) == 0
    records = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    nominal = lambda key, start, end: {"id": key, "start": start, "end": end, "type": "nominal"}  # noqa: E731
    assert records == [
        {"id": "1", "text": "The fire was caused by lightning.", "entities": [nominal("e1", 4, 8), nominal("e2", 23, 32)],
         "relations": [{"head": "e2", "tail": "e1", "label": "Cause-Effect"}]},
        {"id": "2", "text": "A cup on the table.", "entities": [nominal("e1", 2, 5), nominal("e2", 13, 18)],
         "relations": []},
        {"id": "3", "text": "The handle of the door.", "entities": [nominal("e1", 4, 10), nominal("e2", 18, 22)],
         "relations": [{"head": "e1", "tail": "e2", "label": "Component-Whole"}]}]
    assert is_semeval_joint(records)
    # the way back for the official scorer
    assert semeval_label([]) == "Other"
    assert semeval_label([("e2", "Cause-Effect", 0.8)]) == "Cause-Effect(e2,e1)"
    assert semeval_label([("e1", "Cause-Effect", 0.6), ("e2", "Component-Whole", 0.7)]) == "Component-Whole(e2,e1)"
    assert semeval_label([("e1", "Message-Topic", 0.9)]) == "Message-Topic(e1,e2)"


def test_semeval_release_converts_with_every_nominal_in_place():
    path = shared_path("semeval2010_task8", "TEST_FILE_FULL.TXT")
    with open(path, encoding="utf-8-sig") as handle:
        examples = list(read_semeval(path, handle.read().splitlines()))
    records = [semeval_to_joint(example) for example in examples]
    assert len(records) == 2717 and is_semeval_joint(records)
    for example, record in zip(examples, records):
        e1, e2 = record["entities"]
        marked = example.text
        assert record["text"][e1["start"]:e1["end"]] == marked[marked.index("<e1>") + 4:marked.index("</e1>")]
        assert record["text"][e2["start"]:e2["end"]] == marked[marked.index("<e2>") + 4:marked.index("</e2>")]
    assert sum(not record["relations"] for record in records) == 454  # the test set's Other records


def test_semeval_end_to_end_official_score_maps_back(tmp_path):
    records = [semeval_to_joint(RelationExample(str(n), text, label, "t", n)) for n, (text, label) in enumerate([
        ("The <e1>fire</e1> was caused by <e2>lightning</e2>.", "Cause-Effect(e2,e1)"),
        ("A <e1>cup</e1> on the <e2>table</e2>.", "Other"),
        ("The <e1>handle</e1> of the <e2>door</e2>.", "Component-Whole(e1,e2)")], start=1)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    nominal = lambda start, end: {"start": start, "end": end, "type": "nominal"}  # noqa: E731
    outputs = [{"entities": [nominal(4, 8), nominal(23, 32)],  # both orders predicted: the more probable wins
                "relations": [{"head": 1, "tail": 0, "label": "Cause-Effect", "probability": 0.9},
                              {"head": 0, "tail": 1, "label": "Cause-Effect", "probability": 0.4}]},
               {"entities": [nominal(2, 5), nominal(13, 18)], "relations": []},
               {"entities": [nominal(4, 10)], "relations": []}]  # a missed nominal: Other
    extractor = CannedExtractor(outputs, {})
    metrics, report, _ = evaluate_extraction(extractor, str(path))
    # gold C-E(e2,e1), Other, C-W(e1,e2); predicted C-E(e2,e1), Other, Other: C-E F1 1, C-W F1 0 -> macro 0.5
    assert metrics["semeval_official_macro_f1_e2e"] == pytest.approx(0.5)
    assert "official score" in report


def test_extract_command_stdin_files_and_test_file(joint_models, tmp_path, monkeypatch, capsys):
    models = ["--ner_model_dir", joint_models["ner"], "--relation_model_dir", joint_models["relation"]]
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXTS[0] + "\n\n" + TEXTS[2].replace("\r\n", " ") + "\n"))
    assert main(["extract", *models]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["text"] for line in lines] == [TEXTS[0], TEXTS[2].replace("\r\n", " ")]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": 7, "text": TEXTS[1]}) + "\n", encoding="utf-8")
    assert main(["extract", *models, "--input_file", str(inputs), "--output_file", str(tmp_path / "out.jsonl")]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))["id"] == 7
    assert "extract: 1 texts" in capsys.readouterr().err
    out = str(tmp_path / "eval")
    assert main(["extract", *models, "--test_file", JOINT_SAMPLE, "--output_dir", out]) == 0
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert {"triple_f1", "boundary_triple_f1", "ner_f1", "relation_gold_entities_macro_f1"} <= set(metrics)
    assert metrics["texts"] == 12 and metrics["gold_triples"] == 22
    assert os.path.isfile(os.path.join(out, "report.txt"))
    assert main(["extract", *models, "--test_file", JOINT_SAMPLE, "--output_dir", out]) == 2  # no silent overwrite
    assert "--overwrite_output_dir" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "A b.", "entities": [{"id": 1, "start": 0, "end": 1, "type": "X"}], "relations": []}\n'
                   '{"text": "A b.", "entities": [{"id": 1, "start": 0, "end": 9, "type": "X"}]}\n', encoding="utf-8")
    assert main(["extract", *models, "--test_file", str(bad), "--output_dir", str(tmp_path / "bad_eval")]) == 2
    assert f"{bad}:2: entity 1 [0, 9) lies outside the text" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad_eval")


def test_extract_refuses_bad_flags_and_swapped_folders(joint_models, capsys):
    assert main(["extract", "--ner_model_dir", joint_models["ner"], "x"]) == 2
    assert "--relation_model_dir: required" in capsys.readouterr().err
    assert main(["extract", "--ner_model_dir", joint_models["relation"], "--relation_model_dir",
                 joint_models["relation"], "x"]) == 2
    assert "a relation model folder, not a ner one" in capsys.readouterr().err
