"""The joint format (text + entities with ids + relations naming them): validation with file and line, pair
generation (both orders, negatives, the per-record cap), NER and relation trained from one joint file, and the
entity types / type pairs the two model folders record."""

from __future__ import annotations

import json
import os

import pytest

from bert_ft.cli import main
from bert_ft.errors import DataError
from bert_ft_tasks.joint import JointEntity, JointRecord, JointRelation, candidate_pairs
from bert_ft_tasks.ner import NerTask
from bert_ft_tasks.relation import RelationOptions, RelationTask, joint_examples

from .conftest import ROOT

JOINT_SAMPLE = os.path.join(ROOT, "examples", "own_data", "joint.jsonl")
TEXT = "Aspirin reduces the risk of stroke in adults."
ENTITIES = [{"id": "T1", "start": 0, "end": 7, "type": "DRUG"}, {"id": "T2", "start": 28, "end": 34, "type": "DISEASE"},
            {"id": "T3", "start": 38, "end": 44, "type": "GROUP"}]


def write(tmp_path, records, name="joint.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def record(**changes) -> dict:
    return {"text": TEXT, "entities": [dict(entity) for entity in ENTITIES],
            "relations": [{"head": "T1", "tail": "T2", "label": "prevents"}], **changes}


def test_every_ordered_pair_is_an_example_and_the_reverse_of_a_relation_is_negative(tmp_path):
    examples = RelationTask().read(write(tmp_path, [record()]))
    got = {(example.text, example.label) for example in examples}
    assert len(examples) == 6  # 3 entities: 3 * 2 ordered pairs
    assert ("<e1>Aspirin</e1> reduces the risk of <e2>stroke</e2> in adults.", "prevents") in got
    assert ("<e2>Aspirin</e2> reduces the risk of <e1>stroke</e1> in adults.", "no_relation") in got  # the reverse
    assert ("Aspirin reduces the risk of <e2>stroke</e2> in <e1>adults</e1>.", "no_relation") in got
    assert [example.label for example in examples].count("prevents") == 1
    assert {(example.head_type, example.tail_type) for example in examples if example.label == "prevents"} == \
        {("DRUG", "DISEASE")}
    assert all(example.line == 1 and example.path.endswith("joint.jsonl") for example in examples)


def test_negative_label_option_and_the_per_record_cap(tmp_path):
    path = write(tmp_path, [record()])
    named = RelationTask(RelationOptions(negative_label="none_of_these")).read(path)
    assert sorted(example.label for example in named) == ["none_of_these"] * 5 + ["prevents"]
    positives_only = RelationTask(RelationOptions(negative_label="none")).read(path)
    assert [example.label for example in positives_only] == ["prevents"]
    capped = RelationTask(RelationOptions(max_negatives_per_record=2)).read(path)
    assert sorted(example.label for example in capped) == ["no_relation", "no_relation", "prevents"]
    again = RelationTask(RelationOptions(max_negatives_per_record=2)).read(path)
    assert [example.text for example in again] == [example.text for example in capped]  # seeded: reproducible
    zero = RelationTask(RelationOptions(max_negatives_per_record=0)).read(path)
    assert [example.label for example in zero] == ["prevents"]


def test_candidate_pairs_api_skips_overlapping_entities():
    joint = JointRecord("New York City Hall", [JointEntity("a", 0, 8, "CITY"), JointEntity("b", 0, 13, "CITY"),
                                               JointEntity("c", 14, 18, "BUILDING")],
                        [JointRelation(2, 1, "located_in")])
    assert candidate_pairs(joint, "NA") == [(0, 2, "NA"), (1, 2, "NA"), (2, 0, "NA"), (2, 1, "located_in")]
    marked = joint_examples(joint, None)
    assert [(example.text, example.label) for example in marked] == \
        [("<e2>New York City</e2> <e1>Hall</e1>", "located_in")]


@pytest.mark.parametrize("bad, problem", [
    (record(relations=[{"head": "T1", "tail": "T9", "label": "x"}]), "relation 1: tail \"T9\" names no entity"),
    (record(entities=[dict(ENTITIES[0]), {**ENTITIES[1], "id": "T1"}]), "entities 1 and 2 have the same id 'T1'"),
    (record(entities=[dict(ENTITIES[0]), {**ENTITIES[1], "end": 99}]), "entity 2 [28, 99) lies outside the text"),
    (record(relations=[{"head": [0, 7], "tail": "T2", "label": "x"}]), "'head' is [0, 7], a span"),
    (record(relations=[{"head": "T1", "tail": "T1", "label": "x"}]), "head and tail are the same entity"),
    (record(relations=[{"head": "T1", "tail": "T2"}]), "relation 1 {\"head\": \"T1\", \"tail\": \"T2\"} is not"),
    (record(relations={"head": "T1"}), "'relations' must be a list"),
    (record(relations=[{"head": "T1", "tail": "T2", "label": "a"}, {"head": "T1", "tail": "T2", "label": "b"}]),
     "already has the label 'a', now 'b'"),
    (record(entities=[{**ENTITIES[0], "id": [1]}, dict(ENTITIES[1])]), "entity 1: 'id' must be"),
    (record(entities=[dict(ENTITIES[0]), {"id": "T2", "start": 3, "end": 10, "type": "X"}]), "overlap"),
])
def test_bad_joint_records_are_refused_with_file_and_line_by_both_tasks(tmp_path, bad, problem):
    path = write(tmp_path, [record(), bad])
    for task in (RelationTask(), NerTask()):
        if task.name == "ner" and "overlap" in problem:
            continue  # NER reads overlapping entities (the longer kept, counted); only a relation cannot mark them
        with pytest.raises(DataError) as caught:
            task.read(path)
        assert str(caught.value).startswith(f"{path}:2: ") and problem in str(caught.value), (task.name, caught.value)


def test_ner_reads_the_entities_of_a_joint_file_through_the_entities_reader(tmp_path):
    ner = NerTask().read(write(tmp_path, [record()]))
    assert ner[0].words[:2] == ["Aspirin", "reduces"]
    assert ner[0].tags == ["B-DRUG", "O", "O", "O", "O", "B-DISEASE", "O", "B-GROUP", "O"]


@pytest.fixture(scope="module")
def joint_models(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """A tiny NER model and a tiny relation model, both trained from the shipped joint sample."""
    root = tmp_path_factory.mktemp("joint-runs")
    folders = {}
    for task in ("ner", "relation"):
        run = str(root / task)
        assert main([task, "--train_file", JOINT_SAMPLE, "--model_name_or_path", tiny_model_dir, "--output_dir", run,
                     "--num_train_epochs", "2", "--max_seq_length", "48", "--learning_rate", "5e-3",
                     "--per_device_train_batch_size", "8", "--report_to", "none"]) == 0
        folders[task] = os.path.join(run, "model")
    return folders


def test_both_models_train_from_one_joint_file_and_record_what_types_they_saw(joint_models):
    with open(os.path.join(joint_models["ner"], "bert_ft.json"), encoding="utf-8") as handle:
        ner = json.load(handle)
    with open(os.path.join(joint_models["relation"], "bert_ft.json"), encoding="utf-8") as handle:
        relation = json.load(handle)
    assert ner["entity_types"] == ["CONDITION", "DOSE", "DRUG"]
    assert relation["entity_types"] == ["CONDITION", "DOSE", "DRUG"]
    assert relation["negative_label"] == "no_relation"
    assert sorted(relation["labels"]) == ["causes", "dose_of", "no_relation", "treats"]
    pairs = {(pair["head"], pair["tail"]): (pair["relations"], pair["negatives"]) for pair in relation["type_pairs"]}
    # hand count over examples/own_data/joint.jsonl: DRUG -> CONDITION carries treats (9) and causes (3)
    assert pairs["DRUG", "CONDITION"][0] == 12
    assert pairs["DOSE", "DRUG"][0] == 10 and pairs["CONDITION", "DRUG"] == (0, 15)
    assert pairs["DOSE", "CONDITION"][0] == 0
