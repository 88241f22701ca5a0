"""Annotation tools (issue 29): Label Studio and doccano exports built at test time from ../shared/data slices
(CoNLL-2003 spans, SemEval-2010 pairs, SST-2 labels) train every task with no conversion step; spans that do not
fit are counted and named; UTF-16 offsets are converted; predict writes pre-annotations each tool imports, and
they read back as predicted."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from bert_ft.annotation import ToolReport, detect_tool, read_tool_records
from bert_ft.cli import main
from bert_ft.errors import DataError
from bert_ft_tasks.ner import NerOptions, NerTask
from bert_ft_tasks.relation import RelationOptions, RelationTask
from bert_ft_tasks.sentence import SentenceOptions, SentenceTask
from tests.conftest import shared_path
from tests.test_own_data import conll_twin  # the CoNLL file of span records: split_words tokens, tags by hand


# ---------------------------------------------------------------------------------------------- builders

def conll_slice(count: int) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """The first `count` CoNLL-2003 training sentences as (text, spans): tokens joined by spaces, entity spans
    in characters from the IOB1/IOB2 tags."""
    records, words, tags = [], [], []
    with open(shared_path("conll2003", "train.txt"), encoding="utf-8") as handle:
        for line in handle:
            columns = line.split()
            if columns and not columns[0].startswith("-DOCSTART-"):
                words.append(columns[0])
                tags.append(columns[-1])
                continue
            if words:
                text, spans, offset, current = "", [], 0, None
                for word, tag in zip(words, tags):
                    start = len(text) + (1 if text else 0)
                    text = (text + " " + word) if text else word
                    if tag == "O":
                        current = None
                    elif current is None or tag.startswith("B-") or current[2] != tag[2:]:
                        current = [start, start + len(word), tag[2:]]
                        spans.append(current)
                    else:
                        current[1] = start + len(word)
                records.append((text, [tuple(span) for span in spans]))
                words, tags = [], []
                if len(records) == count:
                    return records
    return records


def ls_task(task_id, text, spans, relations=(), annotations=None, key="text") -> dict:
    """A Label Studio task: one annotation with `labels` results (ids s0, s1, ...) and `relation` results."""
    result = [{"id": f"s{index}", "from_name": "label", "to_name": "text", "type": "labels",
               "value": {"start": start, "end": end, "text": text[start:end], "labels": [label]}}
              for index, (start, end, label) in enumerate(spans)]
    result += [{"from_id": f"s{head}", "to_id": f"s{tail}", "type": "relation", "direction": "right",
                "labels": [label]} for head, tail, label in relations]
    annotations = annotations if annotations is not None else [{"id": task_id * 10, "completed_by": 1,
                                                                 "result": result}]
    return {"id": task_id, "data": {key: text}, "annotations": annotations}


def write_json(path, value) -> str:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def write_jsonl(path, records, newline="\n") -> str:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + newline for record in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def features_of(task, path, tokenizer, labels=None):
    examples = task.read(path)
    labels = labels or task.build_labels(examples)
    return labels, task.encode(examples, tokenizer, 64, labels).inputs


# ---------------------------------------------------------------------------------------------- NER

def test_conll_slice_from_each_export_encodes_like_its_conll_twin(tmp_path, tokenizer):
    records = conll_slice(40)
    cancelled = {"id": 1, "completed_by": 7, "was_cancelled": True, "created_at": "2024-01-01",
                 "result": [{"id": "x", "type": "labels", "value": {"start": 0, "end": 1, "labels": ["MISC"]}}]}
    tasks = [ls_task(number, text, spans) for number, (text, spans) in enumerate(records, start=1)]
    tasks[0]["annotations"].insert(0, cancelled)  # a cancelled annotation is never used
    label_studio = write_json(tmp_path / "ls.json", tasks)
    json_min = write_json(tmp_path / "min.json", [
        {"id": number, "text": text, "label": [{"start": s, "end": e, "text": text[s:e], "labels": [t]}
                                               for s, e, t in spans],
         "annotator": "a@example.org", "annotation_id": number, "created_at": "2024-01-02"}
        for number, (text, spans) in enumerate(records, start=1)])
    doccano = write_jsonl(tmp_path / "doccano.jsonl", [{"id": number, "text": text, "label": [list(s) for s in spans],
                                                        "Comments": []}
                                                       for number, (text, spans) in enumerate(records, start=1)])
    twin = tmp_path / "twin.txt"
    twin.write_text("\n".join(conll_twin(records)) + "\n", encoding="utf-8")
    task = NerTask(NerOptions())
    labels, expected = features_of(task, str(twin), tokenizer)
    assert [detect_tool(path) for path in (label_studio, json_min, doccano, str(twin))] == \
        ["label-studio", "label-studio-min", "doccano", None]
    for path in (label_studio, json_min, doccano):
        assert features_of(task, path, tokenizer, labels) == (labels, expected), path
    bracket = tmp_path / "bracket.txt"  # a CoNLL file whose first token is "[" is not taken for a JSON export
    bracket.write_text("[ O\nsee O\n] O\n\nParis B-LOC\n", encoding="utf-8")
    assert detect_tool(str(bracket)) is None and len(task.read(str(bracket))) == 2


def test_awkward_spans_are_counted_named_converted_or_refused(tmp_path):
    emoji = "Ann 😀 met Bob in Rome."  # one character outside the BMP: UTF-16 offsets after it are one more
    tasks = [
        ls_task(1, "Acme Ltd of London hired Smithson.", [(0, 8, "ORG"), (12, 18, "LOC"), (0, 4, "PER"),
                                                          (25, 30, "PER")]),  # nested PER; 'Smith' cuts a word
        ls_task(2, emoji, [(0, 3, "PER"), (10, 13, "PER")]),  # code points
        ls_task(3, emoji, []),
        ls_task(4, "First line\r\nParis is here.", [(12, 17, "LOC")]),  # CRLF inside the text
        ls_task(5, "   ", []),  # an empty text
        ls_task(6, "Cancelled only.", [], annotations=[{"id": 1, "was_cancelled": True, "result": []}]),
    ]
    tasks[2]["annotations"][0]["result"] = [  # UTF-16 units: Bob at [11, 14), Rome at [18, 22)
        {"id": "b", "type": "labels", "value": {"start": 11, "end": 14, "text": "Bob", "labels": ["PER"]}},
        {"id": "r", "type": "labels", "value": {"start": 18, "end": 22, "text": "Rome", "labels": ["LOC"]}}]
    path = write_json(tmp_path / "ls.json", tasks)
    report = ToolReport("label-studio")
    records = list(read_tool_records(path, "label-studio", report=report))
    assert [(span.start, span.end) for span in records[2].spans] == [(10, 13), (17, 21)]
    assert report.utf16 == ["task 3"] and report.used == 4
    assert report.overlaps == ["task 1: PER 'Acme' ~ ORG 'Acme Ltd'"]
    # a nested span of the same type that snaps onto the same words is reported, not merged away
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"id": 1, "text": "Ada met Bob\r\nin Paris.",
                                                      "label": [[0, 3, "PER"], [16, 21, "LOC"], [16, 18, "LOC"]]}])
    [example] = NerTask(NerOptions()).read(nested)
    assert example.tags == ["B-PER", "O", "O", "O", "B-LOC", "O"]
    assert [note.split(":")[0] for note in example.span_notes] == ["snapped", "overlap"]
    assert report.skipped == {"empty text": ["task 5"], "every annotation cancelled": ["task 6"]}
    examples = NerTask(NerOptions()).read(path)
    assert examples[0].tags == ["B-ORG", "I-ORG", "O", "B-LOC", "O", "B-PER", "O"]
    assert [note.split(":")[0] for note in examples[0].span_notes] == ["overlap", "snapped"]
    assert "'Smithson'" in examples[0].span_notes[1] and "'Acme Ltd'" in examples[0].span_notes[0]
    assert examples[2].tags == ["O", "O", "O", "B-PER", "O", "B-LOC", "O"]
    assert examples[3].words == ["First", "line", "Paris", "is", "here", "."] and examples[3].tags[2] == "B-LOC"
    # A span whose text matches its offsets under neither count is refused with the record and both strings.
    tasks[1]["annotations"][0]["result"][1]["value"]["text"] = "Rob"
    bad = write_json(tmp_path / "bad.json", tasks)
    with pytest.raises(DataError, match=r"bad\.json:\d+: task 2: the span PER \[10, 13\) covers 'Bob' but its "
                                        r"text is 'Rob'"):
        NerTask(NerOptions()).read(bad)
    # two Text tags in one task: refused unless --text_column names one (then only its labels are read)
    two = {"id": 7, "data": {"title": "Rome news", "body": "Ann is in Rome."}, "annotations": [{"result": [
        {"id": "t", "from_name": "label", "to_name": "title", "type": "labels",
         "value": {"start": 0, "end": 4, "text": "Rome", "labels": ["LOC"]}},
        {"id": "b", "from_name": "label", "to_name": "body", "type": "labels",
         "value": {"start": 0, "end": 3, "text": "Ann", "labels": ["PER"]}}]}]}
    both = write_json(tmp_path / "two.json", [two])
    with pytest.raises(DataError, match=r"two\.json:2: task 7: the labels point at several texts \(to_name body, "
                                        r"title\)"):
        NerTask(NerOptions()).read(both)
    [body] = NerTask(NerOptions(text_column="body")).read(both)
    assert body.tags == ["B-PER", "O", "O", "O", "O"]
    # doccano spans carry no text: with characters outside the BMP the offsets cannot be checked, which is said.
    doccano = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": emoji, "label": [[10, 13, "PER"]]},
                                                 {"id": 2, "text": "Plain.", "label": []}], newline="\r\n")
    assert detect_tool(write_jsonl(tmp_path / "late.jsonl", [{"text": "No entity.", "label": []},
                                                           {"text": "Ann ran.", "label": [[0, 3, "PER"]]}])) == "doccano"
    report = ToolReport("doccano")
    list(read_tool_records(doccano, "doccano", report=report))
    assert report.unchecked == ["line 1"] and any("not checkable in 1 records" in line for line in report.lines())


def test_annotation_choice_first_last_or_annotator(tmp_path):
    text = "Ada met Bob."
    annotations = [
        {"id": 3, "completed_by": {"id": 9, "email": "late@x.org"}, "created_at": "2024-03-01",
         "result": [{"id": "a", "type": "labels", "value": {"start": 8, "end": 11, "text": "Bob", "labels": ["PER"]}}]},
        {"id": 2, "completed_by": 4, "created_at": "2024-01-01",
         "result": [{"id": "a", "type": "labels", "value": {"start": 0, "end": 3, "text": "Ada", "labels": ["PER"]}}]},
        {"id": 1, "completed_by": 5, "created_at": "2023-01-01", "was_cancelled": True, "result": []}]
    path = write_json(tmp_path / "ls.json", [ls_task(1, text, [], annotations=annotations),
                                             ls_task(2, "Only one.", [])])
    chosen = {policy: [[span.text for span in record.spans] for record in
                       read_tool_records(path, "label-studio", annotation=policy)]
              for policy in ("first", "last", "late@x.org", "9")}
    assert chosen == {"first": [["Ada"], []], "last": [["Bob"], []], "late@x.org": [["Bob"]], "9": [["Bob"]]}
    report = ToolReport("label-studio", annotation="late@x.org")
    list(read_tool_records(path, "label-studio", annotation="late@x.org", report=report))
    assert report.skipped == {"no annotation by late@x.org": ["task 2"]}
    assert report.annotations == {3: 1, 1: 1} and report.cancelled == 1


# ---------------------------------------------------------------------------------------------- sentence

def sst2_slice(count: int) -> list[tuple[str, str]]:
    with open(shared_path("sst2", "train.tsv"), encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:count + 1]
    return [(text.strip(), {"0": "negative", "1": "positive"}[label]) for text, label in rows]


def test_sst2_labels_from_label_studio_json_min_and_doccano(tmp_path):
    rows = sst2_slice(30)
    label_studio = write_json(tmp_path / "ls.json", [
        {"id": number, "data": {"review": text}, "annotations": [{"completed_by": 1, "result": [
            {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]}]}
        for number, (text, label) in enumerate(rows, start=1)])
    json_min = write_json(tmp_path / "min.json", [
        {"id": number, "review": text, "sentiment": label, "annotator": 1, "annotation_id": number}
        for number, (text, label) in enumerate(rows, start=1)])
    doccano = write_jsonl(tmp_path / "d.jsonl", [{"id": number, "text": text, "label": [label]}
                                                 for number, (text, label) in enumerate(rows, start=1)])
    with pytest.raises(DataError, match=r"min\.json:2: task 1: cannot tell which data key holds the text "
                                        r"\(string keys: \['review', 'sentiment'\]\)"):
        SentenceTask(SentenceOptions()).read(json_min)  # JSON-MIN writes a single choice as a string, like the text
    for path in (label_studio, json_min, doccano):
        task = SentenceTask(SentenceOptions(text_column="review"))
        examples = task.read(path)
        task.fit_to_data(examples)
        assert task.problem_type == "single_label", path
        assert [(example.text, example.label) for example in examples] == rows, path
    # several classes per text: multi-label
    multi = write_jsonl(tmp_path / "m.jsonl", [{"id": number, "text": text, "label": [label] + (["long"] if
                                                                                            len(text) > 40 else [])}
                                               for number, (text, label) in enumerate(rows, start=1)])
    task = SentenceTask(SentenceOptions())
    examples = task.read(multi)
    task.fit_to_data(examples)
    assert task.problem_type == "multi_label" and all(isinstance(example.label, list) for example in examples)
    with pytest.raises(DataError, match=r"line 1 has 2 classes"):
        SentenceTask(SentenceOptions(problem_type="single_label")).read(
            write_jsonl(tmp_path / "two.jsonl", [{"id": 1, "text": "a b", "label": ["x", "y"]}]))


# ---------------------------------------------------------------------------------------------- relations

def semeval_slice(count: int) -> list[tuple[str, list, list]]:
    """SemEval-2010 training records as (text, two nominal spans, relations by span index)."""
    records = []
    with open(shared_path("semeval2010_task8", "TRAIN_FILE.TXT"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for index in range(0, 4 * count, 4):
        marked = lines[index].split("\t", 1)[1].strip().strip('"')
        label = lines[index + 1].strip()
        text, spans = "", {}
        for part in __import__("re").split(r"(</?e[12]>)", marked):
            if part in ("<e1>", "<e2>"):
                spans[part[1:3]] = [len(text)]
            elif part in ("</e1>", "</e2>"):
                spans[part[2:4]].append(len(text))
            else:
                text += part
        entities = [(spans["e1"][0], spans["e1"][1], "nominal"), (spans["e2"][0], spans["e2"][1], "nominal")]
        relations = []
        if label != "Other":
            name, order = label[:-7], label[-6:-1]
            relations = [(0, 1, name)] if order == "e1,e2" else [(1, 0, name)]
        records.append((text, entities, relations))
    return records


def test_semeval_pairs_from_label_studio_and_doccano_give_every_ordered_pair(tmp_path):
    records = semeval_slice(12)
    label_studio = write_json(tmp_path / "ls.json", [ls_task(number, text, spans, relations) for number,
                                                     (text, spans, relations) in enumerate(records, start=1)])
    doccano = write_jsonl(tmp_path / "d.jsonl", [
        {"id": number, "text": text,
         "entities": [{"id": 100 + i, "start_offset": s, "end_offset": e, "label": t} for i, (s, e, t) in enumerate(spans)],
         "relations": [{"id": 1, "from_id": 100 + head, "to_id": 100 + tail, "type": label}
                       for head, tail, label in relations]}
        for number, (text, spans, relations) in enumerate(records, start=1)])
    expected = []
    for text, spans, relations in records:
        for head, tail in ((0, 1), (1, 0)):
            label = next((name for h, t, name in relations if (h, t) == (head, tail)), "no_relation")
            (hs, he, _), (ts, te, _) = spans[head], spans[tail]
            expected.append((text[hs:he], text[ts:te], label))
    for path in (label_studio, doccano):
        examples = RelationTask(RelationOptions()).read(path)
        found = [(example.text.split("<e1>")[1].split("</e1>")[0], example.text.split("<e2>")[1].split("</e2>")[0],
                  example.label) for example in examples]
        assert found == expected, path
        assert {example.head_type for example in examples} == {"nominal"}


# ---------------------------------------------------------------------------------------------- the way back

def train(task: str, train_file: str, model_dir: str, output_dir, *extra: str) -> str:
    assert main([task, "--train_file", train_file, "--model_name_or_path", model_dir, "--output_dir",
                 str(output_dir), "--num_train_epochs", "1", "--max_seq_length", "64", "--seed", "1", *extra]) == 0
    return str(output_dir / "model")


def predict(model: str, input_file: str, output_format: str, output) -> str:
    assert main(["predict", "--model_dir", model, "--input_file", input_file, "--output_format", output_format,
                 "--output_file", str(output)]) == 0
    return str(output)


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_label_studio_schema(tasks: list[dict], key: str = "text") -> None:
    """The import schema of Label Studio pre-annotations (labelstud.io, "Import pre-annotated data")."""
    for task in tasks:
        assert isinstance(task["data"][key], str)
        (prediction,) = task["predictions"]
        assert isinstance(prediction["model_version"], str) and prediction["model_version"].startswith("bert-ft")
        for item in prediction["result"]:
            if item["type"] == "relation":
                assert {"from_id", "to_id", "direction", "labels"} <= set(item)
            else:
                assert {"from_name", "to_name", "type", "value"} <= set(item)
                assert item["type"] in ("labels", "choices")


def test_round_trip_ner_export_in_predict_pre_annotations_out(tiny_model_dir, tmp_path):
    records = conll_slice(24)
    export = write_json(tmp_path / "ls.json", [ls_task(number, text, spans)
                                               for number, (text, spans) in enumerate(records, start=1)])
    model = train("ner", export, tiny_model_dir, tmp_path / "run", "--learning_rate", "5e-3")
    assert main(["predict", "--model_dir", model, "--input_file", export, "--output_file",
                 str(tmp_path / "plain.jsonl")]) == 0
    predicted = [[(entity["start"], entity["end"], entity["type"]) for entity in result["entities"]]
                 for result in read_lines(tmp_path / "plain.jsonl")]
    assert any(predicted)
    with open(predict(model, export, "label-studio", tmp_path / "pre.json"), encoding="utf-8") as handle:
        tasks = json.load(handle)
    check_label_studio_schema(tasks)
    assert all(0 <= item["score"] <= 1 for task in tasks for item in task["predictions"][0]["result"])
    back = [[(span.start, span.end, span.label) for span in record.spans]
            for record in read_tool_records(str(tmp_path / "pre.json"), "label-studio", source="predictions")]
    assert back == predicted
    doccano = predict(model, export, "doccano", tmp_path / "pre.jsonl")
    assert [[tuple(item) for item in row["label"]] for row in read_lines(doccano)] == predicted
    back = [[(span.start, span.end, span.label) for span in record.spans]
            for record in read_tool_records(doccano, "doccano")]
    assert back == predicted


def test_round_trip_sentence_and_relation_and_check_data(tiny_model_dir, tmp_path, capsys):
    rows = sst2_slice(24)
    export = write_json(tmp_path / "sst.json", [
        {"id": number, "data": {"text": text}, "annotations": [{"completed_by": "ann@x.org", "result": [
            {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]}]}
        for number, (text, label) in enumerate(rows, start=1)])
    model = train("sentence", export, tiny_model_dir, tmp_path / "sent")
    assert main(["predict", "--model_dir", model, "--input_file", export, "--output_file",
                 str(tmp_path / "plain.jsonl")]) == 0
    labels = [result["label"] for result in read_lines(tmp_path / "plain.jsonl")]
    with open(predict(model, export, "label-studio", tmp_path / "pre.json"), encoding="utf-8") as handle:
        tasks = json.load(handle)
    check_label_studio_schema(tasks)
    assert [record.choices for record in read_tool_records(str(tmp_path / "pre.json"), "label-studio",
                                                           source="predictions")] == [[label] for label in labels]
    assert [row["label"] for row in read_lines(predict(model, export, "doccano", tmp_path / "pre.jsonl"))] == \
        [[label] for label in labels]
    # relations: an export's entities are kept, every ordered pair classified, the relations read back as written
    records = semeval_slice(16)
    relation_export = write_json(tmp_path / "rel.json", [ls_task(number, text, spans, relations) for number,
                                                         (text, spans, relations) in enumerate(records, start=1)])
    relation_model = train("relation", relation_export, tiny_model_dir, tmp_path / "rel")
    with open(predict(relation_model, relation_export, "label-studio", tmp_path / "rel-pre.json"),
              encoding="utf-8") as handle:
        written = json.load(handle)
    check_label_studio_schema(written)
    back = list(read_tool_records(str(tmp_path / "rel-pre.json"), "label-studio", source="predictions"))
    assert [[(span.start, span.end, span.label) for span in record.spans] for record in back] == \
        [[(s, e, t) for s, e, t in spans] for _, spans, _ in records]
    assert [record.relations for record in back] == [
        [(item["from_id"], item["to_id"], item["labels"][0]) for item in task["predictions"][0]["result"]
         if item["type"] == "relation"] for task in written]
    doccano = read_lines(predict(relation_model, relation_export, "doccano", tmp_path / "rel-pre.jsonl"))
    assert all({"entities", "relations"} <= set(row) for row in doccano)
    assert [len(row["relations"]) for row in doccano] == [len(record.relations) for record in back]
    # JSON output on an export: every ordered entity pair, named TASK:HEAD->TAIL; a raw marked pair pre-annotated
    assert main(["predict", "--model_dir", relation_model, "--input_file", relation_export, "--output_file",
                 str(tmp_path / "pairs.jsonl")]) == 0
    assert [row["id"] for row in read_lines(tmp_path / "pairs.jsonl")][:2] == ["1:s0->s1", "1:s1->s0"]
    assert len(read_lines(tmp_path / "pairs.jsonl")) == 2 * len(records)
    marked = tmp_path / "marked.txt"
    marked.write_text("The <e1>burst</e1> was caused by the <e2>pressure</e2>.\n", encoding="utf-8")
    [task] = json.loads(open(predict(relation_model, str(marked), "label-studio", tmp_path / "m.json"),
                             encoding="utf-8").read())
    assert task["data"]["text"] == "The burst was caused by the pressure."
    assert [item["value"]["text"] for item in task["predictions"][0]["result"] if item["type"] == "labels"] == \
        ["burst", "pressure"]
    # --check_data on an export: annotations per task, annotators, skipped tasks
    with open(export, encoding="utf-8") as handle:
        tasks = json.load(handle)
    tasks[0]["annotations"].append({"completed_by": "other@x.org", "was_cancelled": True, "result": []})
    tasks.append({"id": 99, "data": {"text": "never annotated"}, "annotations": []})
    write_json(tmp_path / "sst2.json", tasks)
    capsys.readouterr()
    assert main(["sentence", "--train_file", str(tmp_path / "sst2.json"), "--model_name_or_path", tiny_model_dir,
                 "--check_data"]) == 0
    out = capsys.readouterr().out
    assert "25 tasks, 24 used; 25 annotations (1 cancelled), 1 task(s) with several" in out
    assert "annotators (tasks used): ann@x.org: 24" in out and "skipped 1 (no annotation): task 99" in out
