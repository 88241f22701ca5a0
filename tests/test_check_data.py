"""--check_data: the report on small fake tasks (hand-counted numbers), and the command on the shipped sample."""

from __future__ import annotations

from dataclasses import dataclass

from bert_ft.check_data import data_report, percentile


@dataclass
class Example:
    text: str
    label: str


class FakeTask:
    name = "fake"

    def labels_of(self, example):
        return [example.label]

    def example_text(self, example):
        return example.text

    def word_count(self, example):
        return len(example.text.split())

    def data_notes(self, split, examples, features, tokenizer):
        return [f"{len(features)} features checked"] if split == "train" else []


class FakeFeatures:
    def __init__(self, example_index, lengths):
        self.example_index, self.lengths = example_index, lengths

    def __len__(self):
        return len(self.lengths)


class FakeTokenizer:
    name_or_path = "fake-tokenizer"


TRAIN = [Example("the cat", "pos"), Example("a dog barks", "neg"), Example("the cat", "neg"),
         Example("birds", "pos"), Example("the cat", "mid")]
TEST = [Example("a dog barks", "neg"), Example("fresh words here", "pos")]


def report(**changes) -> str:
    arguments = dict(
        task=FakeTask(), splits={"train": TRAIN, "test": TEST},
        sources={"train": "train.tsv", "test": "test.tsv"},
        features={"train": FakeFeatures([0, 1, 1, 2, 3, 4], [4, 10, 6, 4, 3, 5]),
                  "test": FakeFeatures([0, 1], [5, 7])},
        labels=["neg", "pos", "mid"], tokenizer=FakeTokenizer(), max_seq_length=10)
    arguments.update(changes)
    return data_report(**arguments)


def section(text: str, title: str) -> str:
    """The lines of one '== title ...' section."""
    start = text.index(f"== {title}")
    end = text.find("\n\n", start)
    return text[start:end if end >= 0 else None]


def test_percentile_is_nearest_rank():
    assert percentile([3, 4, 4, 5, 6, 10], 50) == 4
    assert percentile([3, 4, 4, 5, 6, 10], 90) == 10
    assert percentile([7], 99) == 7
    assert percentile(list(range(1, 101)), 90) == 90
    assert percentile(list(range(1, 101)), 99) == 99


def test_counts_per_split():
    text = report()
    assert text.startswith("data check: max_seq_length 10, tokenizer fake-tokenizer\n")
    train = section(text, "train: train.tsv")
    assert "examples                   5\n" in train
    assert "words                      10\n" in train  # 2 + 3 + 2 + 1 + 2
    assert "features (model inputs)    6\n" in train
    assert "sub-words per feature      p50 4, p90 10, p99 10, max 10\n" in train  # sorted: 3 4 4 5 6 10
    assert "examples over one window   1 (20.0 %)\n" in train  # example 2 has two features
    test = section(text, "test: test.tsv")
    assert "examples                   2\n" in test and "words                      6\n" in test
    assert "sub-words per feature      p50 5, p90 7, p99 7, max 7\n" in test
    assert "examples over one window   0 (0.0 %)" in test
    assert "duplicates                 none" in test


def test_duplicates_within_a_split():
    train = section(report(), "train: train.tsv")
    assert ('  duplicates                 2 examples repeat an earlier one (1 distinct texts, 1 of them with different '
            'labels), first:\n'
            '    example 3 = example 1: "the cat"\n'
            '    example 5 = example 1: "the cat"') in train


def test_duplicates_show_the_file_line_and_at_most_three():
    @dataclass
    class Lined:
        text: str
        label: str
        line: int

    train = [Lined("same", "pos", 10 * number) for number in range(1, 7)] + [Lined("other", "neg", 99)]
    text = report(splits={"train": train}, sources={"train": "t.txt"},
                  features={"train": FakeFeatures(list(range(7)), [3] * 7)})
    assert ("5 examples repeat an earlier one (1 distinct texts, 0 of them with different labels), first:\n"
            '    example 2 (line 20) = example 1 (line 10): "same"\n'
            '    example 3 (line 30) = example 1 (line 10): "same"\n'
            '    example 4 (line 40) = example 1 (line 10): "same"\n\n') in text
    assert "overlap" not in text and "labels only in one split" not in text  # a single split


def test_label_table_and_labels_in_one_split():
    labels = section(report(), "labels")
    lines = labels.splitlines()
    assert lines[1].split() == ["label", "train", "%", "test", "%"]
    assert lines[2].split() == ["neg", "2", "40.0", "%", "1", "50.0", "%"]
    assert lines[3].split() == ["pos", "2", "40.0", "%", "1", "50.0", "%"]
    assert lines[4].split() == ["mid", "1", "20.0", "%", "0", "0.0", "%"]
    assert lines[5].split() == ["total", "5", "2"]
    assert lines[6] == "  labels only in one split: 'mid' only in train"


def test_overlap_with_train():
    overlap = section(report(), "overlap")
    assert overlap.splitlines()[1:] == ["  train/test: 1 of 2 test examples (50.0 %) also occur in train, first:",
                                        '    test example 1 = train example 2: "a dog barks"']
    assert "train/validation" not in overlap
    validation = [Example("birds", "pos"), Example("the cat", "pos"), Example("new", "neg")]
    text = report(splits={"train": TRAIN, "validation": validation, "test": TEST},
                  sources={"train": "a", "validation": "b", "test": "c"},
                  features={"train": FakeFeatures([0, 1, 2, 3, 4], [1] * 5),
                            "validation": FakeFeatures([0, 1, 2], [1] * 3), "test": FakeFeatures([0, 1], [1] * 2)})
    overlap = section(text, "overlap")
    assert overlap.index("train/validation: 2 of 3 validation examples (66.7 %)") < overlap.index("train/test")
    assert text.index("== train: a") < text.index("== validation: b") < text.index("== test: c")


def test_notes_then_the_last_line():
    text = report()
    notes = section(text, "notes from the fake task")
    assert notes.splitlines()[1:] == ["  train:", "    6 features checked"]
    assert text.endswith("\ndata check passed: the data would train")


def test_token_labels_and_plain_feature_dicts():
    """A tagging task counts every tag; a list of feature dicts works as well as a Features object."""

    @dataclass
    class Sentence:
        words: list
        tags: list

    class Tagger:
        def labels_of(self, example):
            return example.tags

    train = [Sentence(["EU", "rejects", "it"], ["B-ORG", "O", "O"]), Sentence(["Peter"], ["B-PER"])]
    features = {"train": [{"example_index": 0, "input_ids": [1, 2, 3, 4, 5]}, {"example_index": 1, "input_ids": [1, 2, 3]}]}
    text = report(task=Tagger(), splits={"train": train}, sources={"train": "t.txt"}, features=features,
                  labels=["O", "B-ORG", "I-ORG", "B-PER", "I-PER"])
    assert "words                      4\n" in text
    assert "sub-words per feature      p50 3, p90 5, p99 5, max 5" in text
    table = section(text, "labels").splitlines()
    assert table[2].split() == ["O", "2", "50.0", "%"]
    assert table[3].split() == ["B-ORG", "1", "25.0", "%"]
    assert table[4].split() == ["I-ORG", "0", "0.0", "%"]
    assert "duplicates                 none" in text
    assert text.endswith("data check passed: the data would train")


# ------------------------------------------------------------------------------------------------ the command

def test_check_data_command_on_the_sample(tiny_model_dir, tmp_path, capsys):
    from bert_ft.cli import main

    output_dir = tmp_path / "run"
    code = main(["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir),
                        "--check_data"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "== train: " in captured.out and "ner_train.txt" in captured.out
    assert "== labels: count and share per split ==" in captured.out
    assert captured.out.rstrip().endswith("data check passed: the data would train")
    assert "epoch 1" not in captured.out
    assert not output_dir.exists(), "--check_data writes nothing"


def test_check_data_command_on_a_broken_file(tiny_model_dir, tmp_path, capsys):
    from bert_ft.cli import main

    broken = tmp_path / "train.txt"
    broken.write_text("EU B-ORG\nrejects\n", encoding="utf-8")
    output_dir = tmp_path / "run"
    code = main(["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir),
                        "--train_file", str(broken), "--check_data"])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.txt:2" in errors[0], captured.err
    assert "Traceback" not in captured.err
    assert "data check passed" not in captured.out
    assert not output_dir.exists()
