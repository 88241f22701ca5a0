"""Sentence (and sentence-pair) classification: TSV / CSV / JSONL input, [CLS] head, accuracy and macro F1."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from bert_ft.config import flag
from bert_ft.data import check_text_file, first_content_line, iter_text_lines, read_jsonl_records
from bert_ft.errors import DataError
from bert_ft.heads import (ClassifierHead, check_batch, encoder_inputs, example_positions, first_token_positions,
                           is_packed, read_first_token_only, reads_first_token_only)
from bert_ft.metrics import classification_report_dict, confusion_matrix, format_classification_report, \
    format_confusion
from bert_ft.task import INTEGER, ClassificationTask, Features, label_typer, sample_path


@dataclass
class SentenceOptions:
    text_column: str | None = flag(None, "column (JSONL: key) holding the text to classify (default: 'sentence' if "
                                         "present, else inferred from the non-label columns like run_glue.py)")
    text_pair_column: str | None = flag(None, "column of the second text of a pair, used only when the file has it "
                                              "(default: 'sentence2' if present, else inferred from the non-label "
                                              "columns like run_glue.py)")
    label_column: str = flag("label", "column holding the class label (strings or integers)")
    id_column: str | None = flag(None, "column with an example id for the predictions file "
                                       "(unset: the 1-based row number)")

    def problems(self, config) -> list[str]:
        found = []
        names = {"text_column": self.text_column, "label_column": self.label_column,
                 "text_pair_column": self.text_pair_column}
        for name, value in names.items():
            if value is None and name != "label_column":
                continue  # the default: 'sentence'/'sentence2' if present, else inferred from the header
            if not value or not value.strip():
                found.append(f"--{name}: must not be empty")
        if self.text_column is not None and self.text_column == self.label_column:
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

def _format(path: str) -> str:
    """"jsonl", "tsv" or "csv" (delimiter ','/';'/'|'): by extension, else by the first non-blank line."""
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if extension == ".tsv":
        return "tsv"
    if extension == ".csv":
        return ","
    first = first_content_line(iter_text_lines(path))
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


ID_NAMES = {"id", "idx", "index", "guid", "uid", "row_id", "example_id"}


def _is_identifier(name: str, integer_columns: set[str] | None) -> bool:
    """An id column: named like one (id, idx, index, ..._id), or (delimited files) unique integers on every row."""
    folded = name.strip().lower()
    return folded in ID_NAMES or folded.endswith("_id") or name in (integer_columns or ())


def _unique_integer_columns(records: Iterable[dict], names: list[str]) -> tuple[set[str], int]:
    """(the columns whose value is a distinct integer on every row, rows seen), in one streaming pass (only the
    integer keys of the columns still in the running are kept)."""
    alive, seen, count = set(names), {name: set() for name in names}, 0
    for record in records:
        count += 1
        for name in list(alive):
            value = record[name]
            if not (isinstance(value, str) and INTEGER.fullmatch(value.strip())):
                alive.discard(name)
                continue
            key = _integer_key(value)
            if key in seen[name]:
                alive.discard(name)
            seen[name].add(key)
    return (alive if count else set()), count


def _integer_key(value: str) -> tuple[bool, str]:
    """The integer an integer string means ("007" == "+7"), without int() (which refuses thousands of digits)."""
    text = value.strip()
    digits = text.lstrip("+-").lstrip("0") or "0"
    return text.startswith("-") and digits != "0", digits


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names) or "none"


class _Columns:
    """Keys of the text/pair/label/id columns, checked against the header.

    Without --text_column and without a 'sentence' column, the text columns are inferred like run_glue.py: the
    columns other than the label (and --id_column), identifier columns skipped, in header order: text, text pair.
    `defer=True` leaves that to `infer(rows)` (a delimited file's rows show which columns hold unique integers).
    """

    def __init__(self, options: SentenceOptions, header: list[str], path: str, line: int | None,
                 defer: bool = False) -> None:
        self.header, self.path, self.line, self.options = header, path, line, options
        if options.label_column not in header:
            raise _missing_column(path, line, "label", options.label_column, header, "--label_column")
        if options.text_column is not None and options.text_column not in header:
            raise _missing_column(path, line, "text", options.text_column, header, "--text_column")
        if options.id_column is not None and options.id_column not in header:
            raise _missing_column(path, line, "id", options.id_column, header, "--id_column")
        self.label, self.id = options.label_column, options.id_column
        self.text = options.text_column if options.text_column is not None else (
            "sentence" if "sentence" in header else None)
        self.pair = None
        if self.text is not None:
            pair = options.text_pair_column if options.text_pair_column is not None else "sentence2"
            self.pair = pair if pair in header and pair not in (self.text, self.label) else None
        elif not defer:
            self.infer(None)

    def infer(self, integer_columns: set[str] | None) -> None:
        """Text (and text pair) from the non-label columns in header order, identifier columns skipped; a clear
        refusal when that is ambiguous. Prints the choice."""
        pair = self.options.text_pair_column
        pair = pair if pair in self.header and pair != self.label else None
        candidates, skipped = [], []
        for name in self.header:
            if name in (self.label, self.id, pair):
                continue
            if _is_identifier(name, integer_columns):
                skipped.append(name)
            else:
                candidates.append(name)
        most = 1 if pair else 2
        skipped_text = (f"skipped identifier column{'s' if len(skipped) > 1 else ''} {_quoted(skipped)}"
                        if skipped else "")
        if not 1 <= len(candidates) <= most:
            if candidates:
                problem = (f"cannot tell which columns hold the text: {len(candidates)} candidate text columns "
                           f"{_quoted(candidates)} besides the label column {self.label!r} (at most {most}: "
                           + ("the text, as --text_pair_column is given)" if pair else "text and text pair)"))
            else:
                problem = f"no text column besides the label column {self.label!r}"
            if skipped:
                problem += f"; {skipped_text}"
            raise DataError(self.path, self.line, f"{problem} (columns found: {_quoted(self.header)})",
                            "name the text column with --text_column (and a second text with --text_pair_column), "
                            "or name it 'sentence' (and 'sentence2') in the header")
        self.text = candidates[0]
        self.pair = pair or (candidates[1] if len(candidates) > 1 else None)
        notes = "; ".join(note for note in (skipped_text, "inferred: pass --text_column to choose") if note)
        print(f"{self.path}: columns: text={self.text!r}, text pair={repr(self.pair) if self.pair else 'none'}, "
              f"label={self.label!r} ({notes})")

    def fixed(self) -> SentenceOptions:
        """Options naming the columns chosen here (later JSONL records are checked against them)."""
        return dataclasses.replace(self.options, text_column=self.text, text_pair_column=self.pair)


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


def _delimited_rows(path: str, delimiter: str) -> Iterator[tuple[str, int, list[str] | None]]:
    """("header", line, cells) once, then ("row", line, cells) per non-blank row, streamed from the file."""
    name = "TSV" if delimiter == "tsv" else ("CSV" if delimiter == "," else f"{delimiter!r}-separated")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        if delimiter == "tsv":
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        else:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
        header, line = None, 1
        try:
            for row in reader:
                line_of_row, line = line, reader.line_num + 1  # a quoted CSV field may span several lines
                if not row or all(not cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [cell.strip() for cell in row]
                    yield "header", line_of_row, header
                    continue
                if len(row) != len(header):
                    raise DataError(path, line_of_row, f"expected {len(header)} {name} fields "
                                    f"({', '.join(header)}), got {len(row)}: {_preview(row)}", _field_fix(delimiter))
                yield "row", line_of_row, row
        except csv.Error as error:
            if "field limit" in str(error):  # usually an unclosed quote that swallowed the rest of the file
                raise DataError(path, line, f"a {name} field longer than {csv.field_size_limit()} characters in the "
                                "row starting here" + (" (an unclosed quote?)" if delimiter != "tsv" else ""),
                                "close the quote that opens the field (double any quote inside it)"
                                if delimiter != "tsv" else
                                "split the text: one row per example, a tab between the fields") from None
            raise DataError(path, reader.line_num, f"malformed {name} ({error})", _field_fix(delimiter)) from None


def read_delimited(path: str, delimiter: str, options: SentenceOptions) -> Iterator[SentenceExample]:
    """TSV (GLUE style: no quoting, a quote is text) or CSV (RFC 4180 quoting) with a header row, streamed. When
    the text column must be inferred, a first pass finds the identifier columns (unique integers)."""
    columns, header_line, count = None, 0, 0
    for kind, line, cells in _delimited_rows(path, delimiter):
        if kind == "header":
            header, header_line = cells, line
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise DataError(path, header_line, f"the header repeats the column name(s) {repeated}",
                                "give every column a distinct name")
            columns = _Columns(options, header, path, header_line, defer=True)
            if columns.text is None:  # no --text_column and no 'sentence' column: infer it from all the rows
                rows = (dict(zip(header, row)) for row_kind, _, row in _delimited_rows(path, delimiter)
                        if row_kind == "row")
                candidates = [name for name in header if name not in (columns.label, columns.id)]
                integer_columns, rows_seen = _unique_integer_columns(rows, candidates)
                if not rows_seen:
                    raise DataError(path, header_line, "the file has a header but no examples",
                                    "add at least one row below the header")
                columns.infer(integer_columns)
            continue
        count += 1
        yield _example(dict(zip(columns.header, cells)), columns, path, line, count)
    if columns is not None and not count:
        raise DataError(path, header_line, "the file has a header but no examples",
                        "add at least one row below the header")


def _preview(row: list[str]) -> str:
    text = repr(row)
    return text if len(text) <= 120 else text[:117] + "..."


def _field_fix(delimiter: str) -> str:
    if delimiter == "tsv":
        return ("one row per line with a tab between the fields and no tab inside the text (TSV is read "
                "without quoting, like GLUE); use .csv with quoted fields for text that holds tabs")
    return (f"separate the fields with {delimiter!r}; quote a field that holds {delimiter!r}, a quote or a line "
            'break ("like, this"), doubling quotes inside it ("")')


def read_jsonl(path: str, options: SentenceOptions) -> Iterator[SentenceExample]:
    columns, chosen, count = None, options, 0
    for number, record in read_jsonl_records(path, iter_text_lines(path)):
        # Each record is checked against its own keys; the first one's message names the file's columns (and, with
        # no --text_column and no 'sentence' key, its keys give the inferred text columns for all the records).
        row_columns = _Columns(chosen, list(record), path, number)
        if columns is None:
            columns, chosen = row_columns, row_columns.fixed()
        elif row_columns.pair != columns.pair:
            raise DataError(path, number, f"the record {'lacks' if columns.pair else 'has'} the second-text key "
                            f"{columns.pair or row_columns.pair!r}, unlike the first record",
                            "give every record the same keys")
        count += 1
        yield _example(record, row_columns, path, number, count)


# ------------------------------------------------------------------------------------------------ the head

def _pooler_classifier(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """BERT layout: pooler (dense + tanh on the [CLS] state), dropout, linear. first: (examples, hidden)."""
    pooled = model.base_model.pooler(first[:, None])  # the pooler reads position 0 of what it is given
    return model.classifier(model.dropout(pooled))


def _sequence_classifier(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """RoBERTa-style layout: the classifier takes a sequence and reads its position 0 itself."""
    return model.classifier(first[:, None])


def _context_pooler_classifier(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """DeBERTa layout: the task model's own ContextPooler (reads position 0), dropout, linear."""
    return model.classifier(model.dropout(model.pooler(first[:, None])))


def _pre_classifier(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """DistilBERT layout: pre-classifier, ReLU, dropout, linear on the first state."""
    return model.classifier(model.dropout(torch.relu(model.pre_classifier(first))))


def _linear_pooler_classifier(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """ALBERT layout: the encoder's linear pooler and its activation on the first state, dropout, linear."""
    encoder = model.base_model
    return model.classifier(model.dropout(encoder.pooler_activation(encoder.pooler(first))))


def _prediction_head_classifier(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """ModernBERT layout (classifier_pooling "cls"): prediction head, dropout, linear on the first state."""
    if getattr(model.config, "classifier_pooling", "cls") != "cls":
        raise ValueError("mean pooling reads every token")
    return model.classifier(model.drop(model.head(first)))


FIRST_STATE_LAYOUTS = (_pooler_classifier, _sequence_classifier, _context_pooler_classifier, _pre_classifier,
                       _linear_pooler_classifier, _prediction_head_classifier)


def _first_state_classifier(model: nn.Module):
    """Which layout turns the first token's state into this model's logits exactly as its own forward does (None
    also for a model that cannot run the check, such as the encoder-less stand-in of an export folder)."""
    was_training = model.training
    model.eval()
    found = None
    try:
        batch = check_batch(model)
        with torch.no_grad():
            expected = model(**encoder_inputs(batch, model)).logits
            hidden = model.base_model(**encoder_inputs(batch, model))[0]  # (rows, seq, hidden)
            for layout in FIRST_STATE_LAYOUTS:
                try:
                    got = layout(model, hidden[:, 0])
                except Exception:  # not this layout
                    continue
                if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
                    found = layout
                    break
    except Exception:  # no encoder to check with: the stock forward
        found = None
    finally:
        model.train(was_training)
    return found


class SequenceClassifier(ClassifierHead):
    """Sentence (or sentence-pair) classification: transformers' own pooler + linear head on each example's first
    token ([CLS]), read at its row and offset, so packed rows classify every example they hold."""

    auto_class = AutoModelForSequenceClassification

    def __init__(self, model: nn.Module, labels: list[str]) -> None:
        super().__init__(model, labels)
        # None: an unknown layout; the stock forward is used (one example per row; packing is then refused by the
        # core's start-up check, as it reads position 0 of each row only).
        self.classify_first = _first_state_classifier(model)
        self.first_token_only = self.classify_first is not None and read_first_token_only(
            model, lambda _, batch: self.scores(batch))

    def scores(self, batch: dict) -> torch.Tensor:
        """Class logits (examples, num_labels): what an exported graph computes."""
        if self.classify_first is None:
            return self.model(**encoder_inputs(batch, self.model)).logits
        rows, offsets = example_positions(batch)
        if is_packed(batch) and reads_first_token_only(self.model):
            # The [CLS]-only top layer, told where each packed example starts: (examples, 1, hidden).
            with first_token_positions(self.model, rows, offsets):
                first = self.model.base_model(**encoder_inputs(batch, self.model))[0][:, 0]
        else:
            hidden = self.model.base_model(**encoder_inputs(batch, self.model))[0]  # (rows, seq, hidden); (rows, 1, hidden) fast
            first = hidden[rows, offsets]  # (examples, hidden)
        return self.classify_first(self.model, first)  # (examples, num_labels)



# ------------------------------------------------------------------------------------------------ the task

class SentenceTask(ClassificationTask):
    name = "sentence"
    description = "sentence / sentence-pair classification (TSV, CSV, JSONL; GLUE SST-2 TSV); accuracy, macro F1"
    options_type = SentenceOptions
    metric = "accuracy"
    predictions_file = "test_predictions.jsonl"
    head_type = SequenceClassifier
    samples = {split: sample_path(__file__, f"sentence_{name}.tsv")
               for split, name in (("train", "train"), ("validation", "dev"), ("test", "test"))}

    def problems(self, config) -> list[str]:
        return self.options.problems(config)

    def stream(self, path: str) -> Iterator[SentenceExample]:
        check_text_file(path)  # file not found / empty / not UTF-8, anywhere in the file, before parsing
        kind = _format(path)
        reader = read_jsonl(path, self.options) if kind == "jsonl" else read_delimited(path, kind, self.options)
        count = 0
        for example in reader:
            count += 1
            yield example
        if not count:
            raise DataError(path, None, "no examples found",
                            f"TSV/CSV: a header with {self.options.text_column or 'sentence'!r} and "
                            f"{self.options.label_column!r} "
                            "then one row per example; JSONL: one object per line")

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

    def hub_label_names(self, dataset) -> list[str] | None:
        if self.options.label_column not in dataset.column_names:
            return None
        return list(getattr(dataset.features[self.options.label_column], "names", None) or []) or None

    def example_text(self, example: SentenceExample) -> str:
        return example.text if example.text_pair is None else f"{example.text}\t{example.text_pair}"

    # ---------------------------------------------------------------------------------------- features
    def encode(self, examples: list[SentenceExample], tokenizer, max_seq_length: int, labels: list[str]) -> Features:
        """One feature per example: [CLS] text [SEP] (pair [SEP]), truncated to max_seq_length (longest first)."""
        if not examples:
            return Features([], [], [])
        label_ids = {label: index for index, label in enumerate(labels)}
        texts = [example.text for example in examples]
        pairs = [example.text_pair or "" for example in examples]
        has_pairs = any(example.text_pair is not None for example in examples)
        encoded = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_seq_length)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        inputs = []
        for index, example in enumerate(examples):
            feature = {key: encoded[key][index] for key in keys}
            if example.label is not None:
                feature["labels"] = label_ids.get(example.label, -100)
            inputs.append(feature)
        return Features(inputs, list(range(len(examples))), [len(feature["input_ids"]) for feature in inputs])

    # ---------------------------------------------------------------------------------------- scoring
    def score_labels(self, gold, predicted, labels, source, features) -> tuple[dict, str]:
        scores = classification_report_dict(gold, predicted, labels)
        metrics = {key: scores[key] for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall",
                                                "weighted_f1")}
        matrix = confusion_matrix(gold, predicted, labels)
        report = "\n".join([
            f"scored file: {source} ({len(gold)} examples)",
            format_classification_report(scores), "",
            "confusion matrix (rows: gold, columns: predicted)",
            format_confusion(matrix, labels),
        ])
        return metrics, report

    # ---------------------------------------------------------------------------------------- raw text
    def _input_example(self, number: int, item) -> SentenceExample:
        if isinstance(item, str):
            text, pair = item, None
        elif isinstance(item, dict):
            text = item.get("text", item.get(self.options.text_column or "sentence"))
            pair = item.get("text_pair", item.get(self.options.text_pair_column or "sentence2"))
            if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
                raise DataError("input", number, f"record with keys {sorted(item)} has no string 'text'",
                                'give {"text": "..."} or {"text": "...", "text_pair": "..."}')
        else:
            raise DataError("input", number, f"expected a string or an object, got {type(item).__name__}")
        if not text.strip():
            raise DataError("input", number, "empty text", "give a non-empty text")
        return SentenceExample(text, None, str(number), "input", number, pair)

    def input_examples(self, inputs: list) -> list[SentenceExample]:
        return [self._input_example(number, item) for number, item in enumerate(inputs, start=1)]

    def results(self, examples, features, outputs, labels) -> list[dict]:
        """{"text", ("text_pair"), "label", "probabilities": {label: p}} per input."""
        results, typed = [], label_typer(labels)
        for example, output in zip(examples, self.per_example(examples, features, outputs)):
            result = {"text": example.text}
            if example.text_pair is not None:
                result["text_pair"] = example.text_pair
            result["label"] = typed(labels[int(output["pred"])])
            result["probabilities"] = self.probabilities(output, labels)
            results.append(result)
        return results
