"""NER document context (FLERT, --context_size): documents from -DOCSTART- and doc_id, context attached as a stream,
unlabelled context tokens, limits, windows, CRF, packing, and predict equal to evaluation on the same text."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bert_ft.cli import main
from bert_ft.data import Collator
from bert_ft.encoder import load_tokenizer
from bert_ft.errors import DataError
from bert_ft.plugins import registered_tasks
from bert_ft_tasks.ner import NerExample, NerOptions, NerTask, with_document_context

TASKS = registered_tasks()

CITIES = ["Paris", "Berlin", "Madrid", "Ouagadougou"]
FILLER = ["the", "a", "we", "walked", "to", "and", "then", "saw", "big", "river", "unbelievably", "."]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def document_sentences(count: int, seed: int, longest: int = 12) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.randint(1, longest)):
            city = rng.random() < 0.25
            words.append(rng.choice(CITIES if city else FILLER))
            tags.append("B-LOC" if city else "O")
        sentences.append((words, tags))
    return sentences


def conll(documents: list[list[tuple[list[str], list[str]]]], preamble: list | None = None) -> str:
    """A CoNLL file: optional sentences before any -DOCSTART-, then one -DOCSTART- block per document."""
    blocks = ["\n".join(f"{w} {t}" for w, t in zip(words, tags)) for words, tags in preamble or []]
    for document in documents:
        blocks.append("-DOCSTART- -X- -X- O")
        blocks.extend("\n".join(f"{w} {t}" for w, t in zip(words, tags)) for words, tags in document)
    return "\n\n".join(blocks) + "\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


# -------------------------------------------------------------------------------------------------- reading

def test_conll_docstart_marks_documents_and_context_stays_inside_them(tmp_path):
    documents = [[(["a1", "a2", "a3"], ["O"] * 3), (["b1", "b2"], ["O"] * 2), (["c1"], ["B-LOC"])],
                 [(["d1", "d2"], ["O", "O"]), (["e1", "e2", "e3", "e4"], ["O"] * 4)]]
    path = write(tmp_path, "d.txt", conll(documents, preamble=[(["p1", "p2"], ["O", "O"]), (["q1"], ["O"])]))
    plain = NerTask().read(path)
    assert [e.document for e in plain] == [None, None, 0, 0, 0, 1, 1]
    assert all(e.left_context == e.right_context == [] for e in plain), "context_size 0: nothing attached"
    examples = NerTask(NerOptions(context_size=3)).read(path)
    assert list(NerTask(NerOptions(context_size=3)).stream(path)) == examples  # the streamed reader: the same
    assert [e.words for e in examples] == [e.words for e in plain]
    contexts = [(e.left_context, e.right_context) for e in examples]
    assert contexts == [([], []), ([], []),  # before the first -DOCSTART-: no document, no context
                        ([], ["b1", "b2", "c1"]),  # a document's first sentence: right context only
                        (["a1", "a2", "a3"], ["c1"]),
                        (["a3", "b1", "b2"], []),  # its last sentence: left context only
                        ([], ["e1", "e2", "e3"]),  # never across -DOCSTART-
                        (["d1", "d2"], [])]


def test_file_without_docstart_has_no_context(tmp_path):
    path = write(tmp_path, "n.txt", "a O\nb O\n\nc O\n")
    assert all(e.document is None and not e.left_context and not e.right_context
               for e in NerTask(NerOptions(context_size=8)).read(path))


def test_jsonl_doc_id_groups_consecutive_records(tmp_path):
    records = [{"tokens": ["a"], "tags": ["O"], "doc_id": "x"}, {"tokens": ["b"], "tags": ["O"], "doc_id": "x"},
               {"tokens": ["c"], "tags": ["O"], "doc_id": 7}, {"tokens": ["d"], "tags": ["O"]},
               {"tokens": ["e"], "tags": ["O"], "doc_id": "x"},  # x again, not consecutive: a new document
               {"text": "fg", "label": {}, "doc_id": "x"}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(record) for record in records) + "\n")
    examples = NerTask(NerOptions(context_size=4)).read(path)
    assert [e.document for e in examples] == [0, 0, 1, None, 2, 2]
    assert [(e.left_context, e.right_context) for e in examples] == [
        ([], ["b"]), (["a"], []), ([], []), ([], []), ([], ["fg"]), (["e"], [])]  # span text: split_words


@pytest.mark.parametrize("doc_id", [1.5, True, ["a"], {"a": 1}])
def test_bad_doc_id_is_refused_with_its_line(tmp_path, doc_id):
    path = write(tmp_path, "b.jsonl", json.dumps({"tokens": ["a"], "tags": ["O"]}) + "\n"
                 + json.dumps({"tokens": ["a"], "tags": ["O"], "doc_id": doc_id}) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl:2: 'doc_id' must be a string or an integer"):
        NerTask().read(path)


def test_context_is_a_stream_that_buffers_one_document():
    consumed = []

    def examples():
        for index, document in enumerate([0, 0, 0, None, 1, 1]):
            consumed.append(index)
            yield NerExample([f"w{index}"], ["O"], "mem", index, document=document)

    stream = with_document_context(examples(), 2)
    first = [next(stream) for _ in range(3)]
    assert [e.words for e in first] == [["w0"], ["w1"], ["w2"]] and consumed == [0, 1, 2, 3]
    assert [(e.left_context, e.right_context) for e in first] == [([], ["w1", "w2"]), (["w0"], ["w2"]),
                                                                     (["w0", "w1"], [])]
    rest = list(stream)
    assert [e.words for e in rest] == [["w3"], ["w4"], ["w5"]] and rest[0].left_context == []
    assert rest[1].right_context == ["w5"] and rest[2].left_context == ["w4"]


def test_context_size_is_validated():
    assert NerOptions(context_size=-1).problems(None) == ["--context_size: must be >= 0, got -1"]
    assert NerOptions(context_size=64).problems(None) == []


# ------------------------------------------------------------------------------------------------- encoding

def document_examples(count: int, seed: int, context_size: int, longest: int = 12) -> list[NerExample]:
    examples = [NerExample(words, tags, "mem", index, document=index // 7)  # documents of 7 sentences
                for index, (words, tags) in enumerate(document_sentences(count, seed, longest))]
    return list(with_document_context(examples, context_size))


@pytest.mark.parametrize("context_size, max_seq_length", [(4, 64), (16, 64), (64, 32), (64, 128)])
def test_context_tokens_carry_no_labels_and_respect_both_limits(tokenizer, context_size, max_seq_length):
    examples = document_examples(40, seed=1, context_size=context_size)
    task, plain = NerTask(NerOptions(context_size=context_size)), NerTask()
    labels = ["O", "B-LOC", "I-LOC"]
    features, reference = (t.encode(examples, tokenizer, max_seq_length, labels) for t in (task, plain))
    assert features.example_index == reference.example_index and features.meta == reference.meta
    with_context = 0
    for feature, base in zip(features.inputs, reference.inputs):
        ids = feature["input_ids"]
        assert len(ids) <= max_seq_length and len(feature["labels"]) == len(feature["word_starts"]) == len(ids)
        # The window's own sub-words sit in one block, from its first word start; the rest inside [CLS] ... [SEP]
        # is context.
        own, left = base["input_ids"][1:-1], feature["word_starts"].index(1)
        assert ids[left:left + len(own)] == own and ids[0] == base["input_ids"][0] and ids[-1] == base["input_ids"][-1]
        assert feature["word_starts"][left:left + len(own)] == base["word_starts"][1:-1]
        right = len(ids) - 1 - left - len(own)
        assert feature["labels"][left:left + len(own)] == base["labels"][1:-1]
        context_positions = list(range(1, left)) + list(range(left + len(own), len(ids) - 1))
        assert all(feature["labels"][p] == -100 and feature["word_starts"][p] == 0 for p in context_positions)
        assert left - 1 <= context_size and right <= context_size
        with_context += bool(context_positions)
    assert with_context > len(features) // 2


def test_context_is_the_nearest_neighbour_words_split_evenly(tokenizer):
    words = lambda prefix, n: [f"{prefix}{index}" for index in range(n)]  # noqa: E731
    doc = [NerExample(words("x", 30), ["O"] * 30, "mem", 1, document=0),
           NerExample(["Paris", "is", "big"], ["B-LOC", "O", "O"], "mem", 2, document=0),
           NerExample(words("y", 30), ["O"] * 30, "mem", 3, document=0)]
    doc = list(with_document_context(doc, 100))
    task = NerTask(NerOptions(context_size=100))
    feature = task.encode(doc[1:2], tokenizer, 24, ["O", "B-LOC", "I-LOC"]).inputs[0]
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    own = tokenizer.tokenize("Paris is big")
    at = next(i for i in range(len(tokens)) if tokens[i:i + len(own)] == own)
    left, right = tokens[1:at], tokens[at + len(own):-1]
    assert len(tokens) <= 24 and abs(len(left) - len(right)) <= 3, (left, right)  # both sides share the room
    assert tokenizer.convert_tokens_to_string(left).replace(" ", "").endswith("x29")  # the nearest words
    assert tokenizer.convert_tokens_to_string(right).replace(" ", "").startswith("y0")
    # A document's first and last sentences: context on one side only, which may take all the room.
    middle = NerExample(["Paris"], ["B-LOC"], "mem", 2, document=0)
    first, _, last = list(with_document_context([NerExample(["a", "b"], ["O", "O"], "mem", 1, document=0), middle,
                                                 NerExample(["c", "d"], ["O", "O"], "mem", 3, document=0)], 100))
    first, last = (tokenizer.convert_ids_to_tokens(feature["input_ids"])
                   for feature in task.encode([first, last], tokenizer, 48, ["O", "B-LOC", "I-LOC"]).inputs)
    assert first == ["[CLS]", "a", "b", "paris", "c", "d", "[SEP]"]
    assert last == ["[CLS]", "a", "b", "paris", "c", "d", "[SEP]"]


def test_encode_is_batch_local(tokenizer):
    """Any slice of the examples encodes exactly as inside the whole list (Dataset.map batches)."""
    examples = document_examples(30, seed=2, context_size=16, longest=40)
    task = NerTask(NerOptions(context_size=16, doc_stride=4))
    labels = ["O", "B-LOC", "I-LOC"]
    whole = task.encode(examples, tokenizer, 32, labels)
    for start, end in ((0, 1), (5, 6), (3, 17), (29, 30)):
        part = task.encode(examples[start:end], tokenizer, 32, labels)
        chosen = [index for index, example in enumerate(whole.example_index) if start <= example < end]
        assert list(part.inputs) == [whole.inputs[index] for index in chosen]
        assert part.meta == [whole.meta[index] for index in chosen]


def test_every_word_is_scored_exactly_once_with_windows_and_context(tokenizer):
    """Long sentences in windows, each window completed by context: the merge returns each word once, from
    outputs that hold its gold label only at its own labelled positions and garbage everywhere else."""
    examples = document_examples(24, seed=3, context_size=8, longest=60)
    task = NerTask(NerOptions(context_size=8, doc_stride=6))
    labels = ["O", "B-LOC", "I-LOC"]
    features = task.encode(examples, tokenizer, 24, labels)
    assert len(features) > len(examples) + 10, "some sentences need several windows"
    windowed = 0
    for example_index, indices in enumerate(features.by_example(len(examples))):
        windows = [features.meta[index] for index in indices]
        labelled = sum(sum(features.inputs[index]["word_starts"]) for index in indices)
        assert labelled == sum(end - start for start, end in windows)  # each window labels exactly its words
        windowed += len(windows) > 1
    assert windowed >= 3
    outputs = []
    for feature in features.inputs:
        starts = torch.tensor(feature["word_starts"]).bool()
        gold = torch.tensor(feature["labels"]).clamp(min=0)
        outputs.append({"pred": torch.where(starts, gold, 2).numpy(), "score": torch.ones(len(gold)).numpy()})
    merged = task.word_predictions(examples, features, outputs, labels)
    assert [[tag for tag, _ in words] for words in merged] == [example.tags for example in examples]
    evaluation = task.evaluate(examples, features, outputs, labels, "mem")
    assert evaluation.metrics["f1"] == 1.0 and evaluation.predictions == [example.tags for example in examples]


@pytest.mark.parametrize("crf", [False, True])
def test_model_never_labels_or_predicts_context_tokens(tiny_model_dir, tokenizer, crf):
    examples = document_examples(12, seed=4, context_size=16, longest=30)
    task = NerTask(NerOptions(context_size=16, crf=crf))
    labels = ["O", "B-LOC", "I-LOC"]
    torch.manual_seed(0)
    model = task.build_model(tiny_model_dir, labels, tokenizer, False).eval()
    features = task.encode(examples, tokenizer, 32, labels)
    batch = Collator(task.pad_values(tokenizer), pack=True, row_capacity=64)(list(enumerate(features.inputs)))
    batch.pop("feature_index")
    with torch.no_grad():
        loss = model(**batch)["loss"]
        decoded = model(**batch, decode=True)
    assert torch.isfinite(loss)
    for index, feature in enumerate(features.inputs):
        starts = torch.tensor(feature["word_starts"]).bool()
        pred, score = decoded["pred"][index, :len(starts)], decoded["score"][index, :len(starts)]
        assert (pred[~starts] == -1).all() and (score[~starts] == 0).all()  # context: no prediction, no score
        assert (pred[starts] >= 0).all()
    if crf:  # the CRF runs over the sentence's words only: its word sequence has exactly the window's words
        _, word_labels, word_mask, _ = model._word_emissions(model.scores(batch), batch["word_starts"],
                                                                      batch, batch["labels"])
        assert word_mask.sum(dim=1).tolist() == [end - start for start, end in features.meta]
        for row, (start, end) in enumerate(features.meta):
            gold = [labels.index(tag) for tag in examples[features.example_index[row]].tags[start:end]]
            assert word_labels[row, :end - start].tolist() == gold


# -------------------------------------------------------------------------------------------------- predict

def train_city_tagger(tiny_model_dir: str, output_dir: str, train: str, context_size: int, crf: bool) -> None:
    args = ["ner", "--model_name_or_path", tiny_model_dir, "--train_file", train, "--test_file", train,
            "--output_dir", output_dir, "--num_train_epochs", "4", "--max_seq_length", "32",
            "--learning_rate", "3e-3", "--head_learning_rate", "3e-3", "--per_device_train_batch_size", "8",
            "--context_size", str(context_size), "--doc_stride", "4", "--crf", str(crf)]
    assert main(args) == 0


@pytest.mark.parametrize("crf", [False, True])
def test_predict_on_a_document_equals_evaluation_on_the_same_sentences(tiny_model_dir, tmp_path, crf):
    """Train with context (saved in the model folder), evaluate on a CoNLL document, then predict on the same
    sentences as lines of one document: the same entities in every sentence (windows included: some sentences
    are longer than max_seq_length)."""
    documents = [document_sentences(12, seed=5, longest=40), document_sentences(9, seed=6)]
    train = write(tmp_path, "doc.txt", conll(documents))
    output_dir = str(tmp_path / "run")
    train_city_tagger(tiny_model_dir, output_dir, train, context_size=8, crf=crf)
    with open(tmp_path / "run" / "model" / "bert_ft.json", encoding="utf-8") as handle:
        assert json.load(handle)["task_options"]["context_size"] == 8
    with open(tmp_path / "run" / "test_predictions.txt", encoding="utf-8") as handle:
        evaluated = [[line.split()[2] for line in block.split("\n")]
                     for block in handle.read().strip("\n").split("\n\n")]
    predicted = []
    for number, document in enumerate(documents):
        lines = tmp_path / f"doc{number}.txt"
        lines.write_text("\n".join(" ".join(words) for words, _ in document) + "\n", encoding="utf-8")
        out = tmp_path / f"out{number}.jsonl"
        assert main(["predict", "--model_dir", output_dir + "/model", "--input_file", str(lines),
                            "--input_is_document", "--output_file", str(out)]) == 0
        for (words, _), line in zip(document, out.read_text(encoding="utf-8").splitlines()):
            result = json.loads(line)
            starts = [len(" ".join(words[:index])) + (index > 0) for index in range(len(words))]
            tags = ["O"] * len(words)
            for entity in result["entities"]:
                first = starts.index(entity["start"])
                last = max(index for index, start in enumerate(starts) if start < entity["end"])
                tags[first:last + 1] = [f"B-{entity['type']}"] + [f"I-{entity['type']}"] * (last - first)
            predicted.append(tags)
    assert any(tag != "O" for tags in evaluated for tag in tags), "the model predicts some entities"
    # Compare entities (seqeval's reading of the evaluated tags), as predict reports entities, not tags.
    from seqeval.metrics.sequence_labeling import get_entities
    assert [get_entities(tags) for tags in predicted] == [get_entities(tags) for tags in evaluated]


def test_predict_document_flag_needs_a_context_model(tiny_model_dir, tmp_path, capsys):
    train = write(tmp_path, "doc.txt", conll([document_sentences(6, seed=7)]))
    train_city_tagger(tiny_model_dir, str(tmp_path / "run"), train, context_size=0, crf=False)
    capsys.readouterr()
    assert main(["predict", "--model_dir", str(tmp_path / "run" / "model"), "We saw Paris .",
                        "--input_is_document"]) == 2
    assert "--input_is_document" in capsys.readouterr().err


def test_predict_inputs_with_doc_id_and_the_document_flag():
    task = NerTask(NerOptions(context_size=4))
    examples = task.input_examples([{"text": "a b", "doc_id": 1}, {"text": "c", "doc_id": 1}, "d e", "f"],
                                   document=True)
    assert [e.document for e in examples] == [0, 0, 1, 1]
    assert [(e.left_context, e.right_context) for e in examples] == [
        ([], ["c"]), (["a", "b"], []), ([], ["f"]), (["d", "e"], [])]
    assert all(e.document is None and not e.left_context for e in task.input_examples(["a b", "c"]))


def test_document_flag_is_refused_for_tasks_without_document_context():
    from bert_ft.errors import UsageError
    from bert_ft.prediction import predict_examples

    sentence = TASKS["sentence"](TASKS["sentence"].options_type())
    with pytest.raises(UsageError, match="the sentence task has no document context"):
        predict_examples(sentence, None, None, ["a text"], 32, 1, document=True)


def test_check_data_counts_the_sentences_that_get_context(tmp_path, tokenizer):
    path = write(tmp_path, "d.txt", conll([document_sentences(3, seed=8)], preamble=document_sentences(2, seed=9)))
    task = NerTask(NerOptions(context_size=8))
    examples = task.read(path)
    notes = task.data_notes("train", examples, task.encode(examples, tokenizer, 64, ["O", "B-LOC", "I-LOC"]),
                            tokenizer)
    assert any("3 of 5 sentences are in a document" in line for line in notes)
    assert not any("document" in line for line in NerTask().data_notes("train", examples, None, tokenizer))
