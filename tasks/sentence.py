"""Sentence (and sentence-pair) classification: TSV / CSV / JSONL input, [CLS] head, accuracy and macro F1."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass

from bert_ft.config import flag
from bert_ft.data import read_jsonl_records, read_text_lines
from bert_ft.errors import DataError
from bert_ft.heads import SequenceClassifier
from bert_ft.io import atomic_write_lines
from bert_ft.metrics import classification_report_dict, confusion_matrix, format_classification_report, \
    format_confusion
from bert_ft.predict import run_model

SAMPLES = os.path.join(os.path.dirname(__file__), "samples")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class SentenceOptions:
    text_column: str = flag("sentence", "column (JSONL: key) holding the text to classify")
    text_pair_column: str = flag("sentence2", "column of the second text of a pair (used only when the file has it)")
    label_column: str = flag("label", "column holding the class label (strings or integers)")
    id_column: str | None = flag(None, "column with an example id for the predictions file "
                                       "(unset: the 1-based row number)")

    def problems(self, config) -> list[str]:
        found = []
        names = {"text_column": self.text_column, "label_column": self.label_column,
                 "text_pair_column": self.text_pair_column}
        for name, value in names.items():
            if not value or not value.strip():
                found.append(f"--{name}: must not be empty")
        if self.text_column == self.label_column:
            found.append(f"--label_column: is the same column as --text_column ({self.text_column!r})")
        return found


@dataclass
class SentenceExample:
    text: str
    label: str | None  # None only for raw `predict` inputs
    id: str
    path: str  # the file, for messages
    line: int  # line of the row (first line of a multi-line CSV record) or of the JSON record
    text_pair: str | None = None


# -------------------------------------------------------------------------------------------------- readers

def _read_text(path: str) -> str:
    """The whole file as text with its original line breaks (read_text_lines gives the clear errors)."""
    read_text_lines(path)  # file not found / empty / not UTF-8
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return handle.read()


def _format(path: str, text: str) -> str:
    """"jsonl", "tsv" or "csv" (delimiter ','/';'/'|'): by extension, else by the first non-blank line."""
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if extension == ".tsv":
        return "tsv"
    if extension == ".csv":
        return ","
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    if "\t" in first:
        return "tsv"
    try:
        return csv.Sniffer().sniff(first, delimiters=",;|").delimiter
    except csv.Error:
        return ","  # one column only: the header check below names what is missing


def _missing_column(path: str, line: int, kind: str, name: str, found: list[str], option: str) -> DataError:
    shown = ", ".join(repr(column) for column in found) or "none"
    fix = f"name the {kind} column with {option} (one of the columns found)"
    if kind == "label":
        fix += ("; a file without labels (like GLUE's test.tsv) cannot be used for training or scoring: "
                "use a labelled file (for SST-2, pass dev.tsv as --test_file) or `run_task.py predict` for raw text")
    return DataError(path, line, f"no {kind} column {name!r} (columns found: {shown})", fix)


class _Columns:
    """Positions (or keys) of the text/pair/label/id columns, checked against the header."""

    def __init__(self, options: SentenceOptions, header: list[str], path: str, line: int) -> None:
        self.header = header
        if options.label_column not in header:
            raise _missing_column(path, line, "label", options.label_column, header, "--label_column")
        if options.text_column not in header:
            raise _missing_column(path, line, "text", options.text_column, header, "--text_column")
        if options.id_column is not None and options.id_column not in header:
            raise _missing_column(path, line, "id", options.id_column, header, "--id_column")
        self.text, self.label, self.id = options.text_column, options.label_column, options.id_column
        pair = options.text_pair_column
        self.pair = pair if pair in header and pair not in (options.text_column, options.label_column) else None


def _example(record: dict, columns: _Columns, path: str, line: int, ordinal: int) -> SentenceExample:
    """One example from a row's {column: value}; empty text or label is an error."""
    values = {}
    for key, kind in ((columns.text, "text"), (columns.pair, "second text"), (columns.label, "label"),
                      (columns.id, "id")):
        if key is None:
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(path, line, f"the {kind} ({key!r}) is {json.dumps(value)}, not a string or number",
                            f"give the {kind} as a string" + (" or an integer" if kind == "label" else ""))
        value = str(value).strip()
        if not value:
            raise DataError(path, line, f"empty {kind} in column {key!r}",
                            f"fill in the {kind} or remove the row")
        values[kind] = value
    return SentenceExample(values["text"], values["label"], values.get("id", str(ordinal)), path, line,
                           values.get("second text"))


def read_delimited(path: str, text: str, delimiter: str, options: SentenceOptions) -> list[SentenceExample]:
    """TSV (GLUE style: no quoting, a quote is text) or CSV (RFC 4180 quoting) with a header row."""
    if delimiter == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        name = "TSV"
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        name = "CSV" if delimiter == "," else f"{delimiter!r}-separated"
    columns, header_line, examples = None, 0, []
    line = 1
    try:
        for row in reader:
            line_of_row, line = line, reader.line_num + 1  # a quoted CSV field may span several lines
            if not row or all(not cell.strip() for cell in row):
                continue
            if columns is None:
                header, header_line = [cell.strip() for cell in row], line_of_row
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    raise DataError(path, header_line, f"the header repeats the column name(s) {repeated}",
                                    "give every column a distinct name")
                columns = _Columns(options, header, path, header_line)
                continue
            if len(row) != len(columns.header):
                raise DataError(path, line_of_row, f"expected {len(columns.header)} {name} fields "
                                f"({', '.join(columns.header)}), got {len(row)}: {_preview(row)}",
                                _field_fix(delimiter))
            examples.append(_example(dict(zip(columns.header, row)), columns, path, line_of_row, len(examples) + 1))
    except csv.Error as error:
        raise DataError(path, reader.line_num, f"malformed {name} ({error})", _field_fix(delimiter)) from None
    if columns is not None and not examples:
        raise DataError(path, header_line, "the file has a header but no examples",
                        "add at least one row below the header")
    return examples


def _preview(row: list[str]) -> str:
    text = repr(row)
    return text if len(text) <= 120 else text[:117] + "..."


def _field_fix(delimiter: str) -> str:
    if delimiter == "tsv":
        return ("one row per line with a tab between the fields and no tab inside the text (TSV is read "
                "without quoting, like GLUE); use .csv with quoted fields for text that holds tabs")
    return (f"separate the fields with {delimiter!r}; quote a field that holds {delimiter!r}, a quote or a line "
            'break ("like, this"), doubling quotes inside it ("")')


def read_jsonl(path: str, text: str, options: SentenceOptions) -> list[SentenceExample]:
    examples, columns = [], None
    # Split on "\n" only: str.splitlines would also break at U+2028 and friends, which JSON strings may hold raw.
    for number, record in read_jsonl_records(path, text.split("\n")):
        # Each record is checked against its own keys; the first one's message names the file's columns.
        row_columns = _Columns(options, list(record), path, number)
        if columns is None:
            columns = row_columns
        elif row_columns.pair != columns.pair:
            raise DataError(path, number, f"the record {'lacks' if columns.pair else 'has'} the second-text key "
                            f"{options.text_pair_column!r}, unlike the first record",
                            "give every record the same keys")
        examples.append(_example(record, row_columns, path, number, len(examples) + 1))
    return examples


def label_order(labels) -> list[str]:
    """Numeric order when every label is an integer ("2" < "10"), else alphabetical."""
    unique = set(labels)
    if unique and all(_INTEGER.fullmatch(label) for label in unique):
        return sorted(unique, key=lambda label: (int(label), label))
    return sorted(unique)


# ------------------------------------------------------------------------------------------------ the task

class SentenceTask:
    name = "sentence"
    description = "sentence / sentence-pair classification (TSV, CSV, JSONL; GLUE SST-2 TSV); accuracy, macro F1"
    options_type = SentenceOptions
    metric = "accuracy"
    predictions_file = "test_predictions.jsonl"

    def __init__(self, options: SentenceOptions | None = None) -> None:
        self.options = options or SentenceOptions()
        self.hub_labels: list[str] | None = None  # class names of a Hub ClassLabel, in id order

    def default_files(self) -> dict:
        return {split: os.path.join(SAMPLES, f"sentence_{name}.tsv")
                for split, name in (("train", "train"), ("validation", "dev"), ("test", "test"))}

    def read(self, path: str) -> list[SentenceExample]:
        text = _read_text(path)
        kind = _format(path, text)
        if kind == "jsonl":
            examples = read_jsonl(path, text, self.options)
        else:
            examples = read_delimited(path, text, kind, self.options)
        if not examples:
            raise DataError(path, None, "no examples found",
                            f"TSV/CSV: a header with {self.options.text_column!r} and {self.options.label_column!r} "
                            "then one row per example; JSONL: one object per line")
        return examples

    def from_hub(self, dataset, split: str) -> list[SentenceExample]:
        """A `datasets` split, e.g. glue/sst2 (sentence, label as ClassLabel ids, idx). GLUE test splits hide
        their labels (-1): such a split is skipped with a warning (score dev with --test_file instead)."""
        options = self.options
        columns = list(dataset.column_names)
        source = f"{split} split"
        if options.label_column not in columns and split not in ("train",):
            print(f"warning: the {split} split has no {options.label_column!r} column; it is not scored")
            return []
        checked = _Columns(options, columns, source, None)
        feature = dataset.features[options.label_column]
        names = list(feature.names) if hasattr(feature, "names") else None
        if names is not None:
            self.hub_labels = names
        keys = [key for key in (checked.text, checked.pair, checked.label, checked.id) if key is not None]
        examples, hidden = [], 0
        for index, row in enumerate(dataset):
            record = {key: row[key] for key in keys}
            label = record[checked.label]
            if names is not None and isinstance(label, int) and not isinstance(label, bool):
                if label < 0:  # GLUE's hidden test labels
                    hidden += 1
                    continue
                record[checked.label] = names[label]
            examples.append(_example(record, checked, source, index + 1, index + 1))
        if not examples and len(dataset):
            print(f"warning: the {split} split has no labels (GLUE hides its test labels); it is not scored. "
                  "To score held-out data, pass files: --train_file ... --test_file DEV_FILE")
        elif hidden:
            print(f"warning: the {split} split: {hidden} rows without a label (-1) were left out")
        return examples

    def labels_of(self, example: SentenceExample) -> list[str]:
        return [example.label]

    def build_labels(self, train_examples: list[SentenceExample]) -> list[str]:
        seen = {example.label for example in train_examples}
        if self.hub_labels is not None and seen <= set(self.hub_labels):
            return list(self.hub_labels)  # the dataset's own class-id order
        return label_order(seen)

    def prepare_tokenizer(self, tokenizer) -> None:
        pass

    def pad_values(self, tokenizer) -> dict:
        return {"input_ids": tokenizer.pad_token_id, "labels": -100}

    def build_model(self, model_path: str, labels: list[str], tokenizer, trust_remote_code: bool) -> SequenceClassifier:
        return SequenceClassifier.create(model_path, labels, trust_remote_code, len(tokenizer))

    # ---------------------------------------------------------------------------------------- features
    def encode(self, examples: list[SentenceExample], tokenizer, max_seq_length: int, labels: list[str]) -> list[dict]:
        """One feature per example: [CLS] text [SEP] (pair [SEP]), truncated to max_seq_length (longest first)."""
        if not examples:
            return []
        label_ids = {label: index for index, label in enumerate(labels)}
        texts = [example.text for example in examples]
        pairs = [example.text_pair or "" for example in examples]
        has_pairs = any(example.text_pair is not None for example in examples)
        encoded = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_seq_length)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        features = []
        for example_index, example in enumerate(examples):
            feature = {key: encoded[key][example_index] for key in keys}
            if example.label is not None:
                feature["labels"] = label_ids.get(example.label, -100)
            feature["example_index"] = example_index
            features.append(feature)
        return features

    def _example_outputs(self, examples, features, outputs) -> list[dict]:
        by_example: list[dict | None] = [None] * len(examples)
        for feature, output in zip(features, outputs):
            by_example[feature["example_index"]] = output
        return by_example

    # ---------------------------------------------------------------------------------------- scoring
    def evaluate(self, examples, features, outputs, labels, source):
        from bert_ft.task import Evaluation

        per_example = self._example_outputs(examples, features, outputs)
        predicted = [labels[int(output["pred"])] for output in per_example]
        gold = [example.label for example in examples]
        scores = classification_report_dict(gold, predicted, labels)
        metrics = {key: scores[key] for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall",
                                                "weighted_f1")}
        matrix = confusion_matrix(gold, predicted, labels)
        report = "\n".join([
            f"scored file: {source} ({len(examples)} examples)",
            format_classification_report(scores), "",
            "confusion matrix (rows: gold, columns: predicted)",
            format_confusion(matrix, labels),
        ])
        return Evaluation(metrics, report, predicted, (list(labels), matrix))

    def write_predictions(self, path: str, examples: list[SentenceExample], predictions: list[str]) -> None:
        atomic_write_lines(path, [json.dumps({"id": example.id, "gold": example.label, "pred": prediction},
                                             ensure_ascii=False)
                                  for example, prediction in zip(examples, predictions)])

    # ---------------------------------------------------------------------------------------- raw text
    def _input_example(self, number: int, item) -> SentenceExample:
        if isinstance(item, str):
            text, pair = item, None
        elif isinstance(item, dict):
            text = item.get("text", item.get(self.options.text_column))
            pair = item.get("text_pair", item.get(self.options.text_pair_column))
            if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
                raise DataError("input", number, f"record with keys {sorted(item)} has no string 'text'",
                                'give {"text": "..."} or {"text": "...", "text_pair": "..."}')
        else:
            raise DataError("input", number, f"expected a string or an object, got {type(item).__name__}")
        if not text.strip():
            raise DataError("input", number, "empty text", "give a non-empty text")
        return SentenceExample(text, None, str(number), "input", number, pair)

    def predict(self, model, tokenizer, inputs: list, max_seq_length: int, batch_size: int) -> list[dict]:
        """{"text", "label", "probabilities": {label: p}} per input (a string or {"text", "text_pair"})."""
        if not inputs:
            return []
        examples = [self._input_example(number, item) for number, item in enumerate(inputs, start=1)]
        labels = model.labels
        features = self.encode(examples, tokenizer, max_seq_length, labels)
        outputs = self._example_outputs(examples, features, run_model(model, features, self.pad_values(tokenizer),
                                                                      batch_size))
        results = []
        for example, output in zip(examples, outputs):
            result = {"text": example.text}
            if example.text_pair is not None:
                result["text_pair"] = example.text_pair
            result["label"] = labels[int(output["pred"])]
            result["probabilities"] = {label: round(float(p), 6) for label, p in zip(labels, output["probs"])}
            results.append(result)
        return results
