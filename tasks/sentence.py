"""Sentence (and sentence-pair) tasks: TSV / CSV / JSONL input, a [CLS] head, three problem types.

The problem type follows the data, as transformers' run_classification.py infers it (`--problem_type` overrides):
  multi_label   a JSON list of labels per record (TSV/CSV: a label cell split by --label_delimiter); an empty list
                is a text with no label. Binary cross-entropy per label, per-label decision thresholds tuned on
                validation (F1-optimal) or a global --threshold; micro/macro/samples F1, subset accuracy, Hamming
                loss.
  regression    every label a number and at least one of them not an integer ("3.5"; integer labels such as 1-5
                stars stay classes). MSE (or Huber) on targets standardised with the training mean and standard
                deviation; the saved output layer has the standardisation folded in, so the folder predicts in the
                targets' own units. Pearson, Spearman, MSE, MAE, R^2.
  single_label  otherwise: one class per text, softmax cross-entropy; accuracy and macro F1.
"""

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

from bert_ft.annotation import (AnnotationOptions, Prediction, ToolRecord, ToolReport, detect_tool, read_tool_records,
                                tool_prediction, tool_summary)
from bert_ft.check_data import multi_label_notes, regression_notes
from bert_ft.config import flag
from bert_ft.data import check_text_file, first_content_line, iter_text_lines, read_jsonl_records
from bert_ft.errors import DataError, UsageError
from bert_ft.heads import (ClassifierHead, check_batch, encoder_inputs, example_positions, first_token_positions,
                           is_packed, read_first_token_only, reads_first_token_only)
from bert_ft.losses import REGRESSION_LOSSES, multi_label_loss, regression_loss
from bert_ft.metrics import classification_report_dict, confusion_matrix, f1_optimal_threshold, \
    format_classification_report, format_confusion, format_multi_label_report, format_regression_report, \
    multi_label_report_dict, regression_report_dict
from bert_ft.io import atomic_write_lines
from bert_ft.task import INTEGER, ClassificationTask, Evaluation, Features, label_typer, sample_path


PROBLEM_TYPES = ("auto", "single_label", "multi_label", "regression")
# transformers' config.problem_type of each (what pipeline("text-classification") decodes by)
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}


@dataclass
class SentenceOptions(AnnotationOptions):
    text_column: str | None = flag(None, "column (JSONL: key) holding the text to classify (default: 'sentence' if "
                                         "present, else inferred from the non-label columns like run_glue.py)")
    text_pair_column: str | None = flag(None, "column of the second text of a pair, used only when the file has it "
                                              "(default: 'sentence2' if present, else inferred from the non-label "
                                              "columns like run_glue.py)")
    label_column: str = flag("label", "column holding the class label (strings or integers)")
    id_column: str | None = flag(None, "column with an example id for the predictions file "
                                       "(unset: the 1-based row number)")
    problem_type: str = flag("auto", "auto: from the training labels (a JSON list per record: multi_label; all "
                                     "numbers, some not integers: regression; else single_label), or force one",
                             choices=PROBLEM_TYPES)
    label_delimiter: str | None = flag(None, "TSV/CSV multi-label: split each label cell at this string (e.g. "
                                             "'|'); an empty cell is a text with no label")
    threshold: float | None = flag(None, "multi-label: one decision threshold for every label (unset: a threshold "
                                         "per label tuned for F1 on the validation set; 0.5 without one)")
    regression_loss: str = flag("mse", "regression: the loss on standardised targets", choices=REGRESSION_LOSSES)

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
        if self.label_delimiter is not None and not self.label_delimiter:
            found.append("--label_delimiter: must not be empty")
        if self.label_delimiter is not None and self.problem_type in ("single_label", "regression"):
            found.append(f"--label_delimiter: splits multi-label cells; not with --problem_type {self.problem_type}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            found.append(f"--threshold: must lie strictly between 0 and 1, got {self.threshold}")
        if self.problem_type == "regression" and (config.class_weights != "none" or config.loss != "cross_entropy"):
            found.append("--class_weights/--loss: class weights and focal loss are for classes; regression takes "
                         "--regression_loss mse|huber")
        return found


@dataclass
class SentenceExample:
    text: str
    label: str | list[str] | None  # a list: multi-label (possibly empty); None only for raw `predict` inputs
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


def _number(text) -> float | None:
    """The finite number a label spells, else None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


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
        if kind == "label" and (isinstance(value, list) or columns.options.label_delimiter is not None):
            values[kind] = _label_list(value, columns.options.label_delimiter, key, path, line)
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(path, line, f"the {kind} ({key!r}) is {json.dumps(value)}, not a string or number",
                            f"give the {kind} as a string" + (" or an integer" if kind == "label" else "")
                            + (', or a list of labels (["a", "b"]) for multi-label data' if kind == "label" else ""))
        value = str(value).strip()
        if not value:
            raise DataError(path, line, f"empty {kind} in column {key!r}",
                            f"fill in the {kind} or remove the row")
        values[kind] = value
    return SentenceExample(values["text"], values["label"], values.get("id", str(ordinal)), path, line,
                           values.get("second text"))


def _label_list(value, delimiter: str | None, key: str, path: str, line: int) -> list[str]:
    """A multi-label cell: a JSON list of strings/integers, or a string split at `delimiter`; empty means no
    label. Repeats are dropped (a set of labels), order kept."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = value.split(delimiter) if value.strip() else []
    else:
        raise DataError(path, line, f"the label ({key!r}) is {json.dumps(value)}, not a list of labels",
                        'give a list such as ["sports", "politics"] (or [] for none)')
    labels = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataError(path, line, f"the label list ({key!r}) holds {json.dumps(item)}, not a string",
                            'give the labels as strings, e.g. ["sports", "politics"]')
        text = str(item).strip()
        if not text:
            raise DataError(path, line, f"the label list ({key!r}) holds an empty label",
                            "remove the empty entry (an empty list [] is a text with no label)")
        if text not in labels:
            labels.append(text)
    return labels


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


def _tool_choices(record: ToolRecord, options: SentenceOptions, path: str) -> list[str]:
    """The classes of one annotation-tool record: Label Studio choices, doccano labels, or (JSON-MIN, where a single
    choice is a plain string like the text) the string under --label_column, else the row's only other string."""
    if record.choices is not None:
        return record.choices
    if record.spans:
        raise DataError(path, record.line, f"{record.where} holds labelled spans, not classes: an NER or relation "
                        "export", "train it with `run_task.py ner` (or relation); a text-classification export has "
                        "choices (Label Studio) or a list of class names (doccano)")
    strings = record.strings
    if options.label_column in strings:
        return [strings[options.label_column]]
    if len(strings) == 1:
        return [next(iter(strings.values()))]
    if strings:
        raise DataError(path, record.line, f"{record.where}: cannot tell which of the keys {sorted(strings)} holds "
                        "the choice", "name the control with --label_column")
    return []  # an annotation with nothing chosen: no class (multi-label: a text with no label)


def read_tool(path: str, tool: str, options: SentenceOptions) -> Iterator[SentenceExample]:
    """SentenceExamples from a Label Studio or doccano text-classification export. Both tools write every
    annotation's classes as a list; when every record holds exactly one class the file is single-label (one label
    per example), else multi-label (a list each), unless --problem_type says which."""
    report = ToolReport(tool, annotation=options.annotation)
    records = [(record, _tool_choices(record, options, path))
               for record in read_tool_records(path, tool, options.annotation, options.text_column, report=report)]
    single = options.problem_type in ("auto", "single_label") and all(len(labels) == 1 for _, labels in records)
    if options.problem_type == "single_label" and not single:
        record, labels = next((record, labels) for record, labels in records if len(labels) != 1)
        raise DataError(path, record.line, f"{record.where} has {len(labels)} classes {labels} (--problem_type "
                        "single_label)", "give each text one class, or use --problem_type multi_label (or auto)")
    for line in report.lines():
        print(f"{path}: {line}")
    for record, labels in records:
        yield SentenceExample(record.text, labels[0] if single else labels, str(record.task_id), path,
                              record.line or 0)


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


def _output_layer(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(state-dict prefix, layer) of the linear layer that produces the logits: BERT's `classifier`, RoBERTa's
    `classifier.out_proj`, or a `score` layer; None for another layout."""
    modules = dict(model.named_modules())
    for name in ("classifier", "classifier.out_proj", "score"):
        if isinstance(modules.get(name), nn.Linear):
            return name, modules[name]
    return None


class SequenceClassifier(ClassifierHead):
    """Sentence (or sentence-pair) classification or regression: transformers' own pooler + linear head on each
    example's first token ([CLS]), read at its row and offset, so packed rows classify every example they hold.

    `problem_type`: "single_label" (softmax over the classes), "multi_label" (a sigmoid per label, label c on when
    its probability >= thresholds[c]: a global --threshold or the per-label ones `fit_decision` tunes on validation,
    stored in bert_ft.json) or "regression" (one output in the targets' units: the linear layer's output z is
    trained against standardised targets, scores = z * target_scale + target_mean, and the saved folder has that
    folded into the layer's weight and bias, so transformers' pipeline gives the same number)."""

    auto_class = AutoModelForSequenceClassification

    def __init__(self, model: nn.Module, labels: list[str], problem_type: str = "single_label",
                 threshold: float | None = None, target_mean: float = 0.0, target_scale: float = 1.0,
                 regression_loss: str = "mse") -> None:
        options = {} if problem_type == "single_label" else {"problem_type": problem_type}
        if problem_type == "multi_label":
            options["threshold"] = threshold
        elif problem_type == "regression":
            options.update(target_mean=float(target_mean), target_scale=float(target_scale),
                           regression_loss=regression_loss)
        super().__init__(model, labels, **options)
        if problem_type not in HF_PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {', '.join(HF_PROBLEM_TYPES)}, got {problem_type!r}")
        self.problem_type, self.regression_kind = problem_type, regression_loss
        self.target_mean, self.target_scale = float(target_mean), float(target_scale)
        self.global_threshold = threshold
        model.config.problem_type = HF_PROBLEM_TYPES[problem_type]  # saved in config.json: how pipeline decodes
        # (num_labels,) the multi-label decision thresholds; not in the state dict (bert_ft.json holds them)
        self.register_buffer("thresholds", torch.full((len(labels),), 0.5 if threshold is None else threshold),
                             persistent=False)
        # Temperature scaling is fitted to single-label softmax confidences only.
        self.temperature_scaling = problem_type == "single_label"
        # None: an unknown layout; the stock forward is used (one example per row; packing is then refused by the
        # core's start-up check, as it reads position 0 of each row only).
        self.classify_first = _first_state_classifier(model)
        self.first_token_only = self.classify_first is not None and read_first_token_only(
            model, lambda _, batch: self.scores(batch))

    def scores(self, batch: dict) -> torch.Tensor:
        """Class logits (examples, num_labels), or (examples, 1) values in the targets' units: what an exported
        graph computes."""
        logits = self._logits(batch)
        if self.problem_type == "regression":
            return logits * self.target_scale + self.target_mean
        return logits

    def _logits(self, batch: dict) -> torch.Tensor:
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

    # ---------------------------------------------------------------------------------------- training
    def set_loss(self, weights=None, kind: str = "cross_entropy", gamma: float = 2.0) -> None:
        if self.problem_type == "regression" and (weights is not None or kind != "cross_entropy"):
            raise UsageError("--class_weights/--loss: class weights and focal loss are for classes; regression "
                             "takes --regression_loss mse|huber")
        super().set_loss(weights, kind, gamma)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.problem_type == "multi_label":  # logits, targets (examples, L)
            return multi_label_loss(logits, targets, self.class_weights, self.loss_kind, self.focal_gamma)
        if self.problem_type == "regression":  # (examples, 1) and (examples,), standardised for the loss
            return regression_loss((logits[:, 0] - self.target_mean) / self.target_scale,
                                   (targets.float() - self.target_mean) / self.target_scale, self.regression_kind)
        return super().loss(logits, targets)

    # ---------------------------------------------------------------------------------------- decoding
    def decode_scores(self, scores: torch.Tensor, batch: dict, temperature: float | None = None) -> dict:
        if self.problem_type == "multi_label":
            probs = scores.float().sigmoid()  # (examples, L): what pipeline(top_k=None) returns
            thresholds = self.thresholds.to(probs.device)
            return {"pred": (probs >= thresholds).long(), "probs": probs,
                    "thresholds": thresholds.expand_as(probs)}
        if self.problem_type == "regression":
            return {"pred": scores.float()[:, 0]}  # (examples,) in the targets' units
        return super().decode_scores(scores, batch, temperature)

    def prediction_scores(self, scores: torch.Tensor, batch: dict, pred: torch.Tensor) -> torch.Tensor:
        if self.problem_type == "multi_label":
            # Each chosen label's logit above its threshold's logit: two label sets' difference is small exactly
            # when every label they disagree on sits near its threshold.
            cut = torch.logit(self.thresholds.to(scores.device).float())
            return ((scores.float() - cut) * pred.float()).sum(-1)
        if self.problem_type == "regression":
            return scores.float()[:, 0]
        return super().prediction_scores(scores, batch, pred)

    def fit_decision(self, outputs: list[dict], features) -> dict | None:
        """Multi-label without --threshold: each label's F1-optimal threshold on the validation outputs (gathered
        over processes, so every process finds the same ones); set on the head and returned for bert_ft.json."""
        if self.problem_type != "multi_label" or self.global_threshold is not None or not outputs:
            return None
        gold = [features.inputs[index]["labels"] for index in range(len(features))]
        fitted, scores = {}, {}
        for column, label in enumerate(self.labels):
            probabilities = [float(output["probs"][column]) for output in outputs]
            threshold, f1 = f1_optimal_threshold(probabilities, [row[column] > 0.5 for row in gold])
            fitted[label], scores[label] = round(threshold, 6), round(f1, 6)
        self.thresholds = torch.tensor([fitted[label] for label in self.labels], dtype=torch.float32,
                                       device=self.thresholds.device)
        return {"thresholds": fitted, "threshold_fit": {"rule": "per label, F1-optimal on the validation set",
                                                        "validation_f1": scores, "examples": len(outputs)}}

    # ---------------------------------------------------------------------------------------- folders
    def save_pretrained(self, folder: str) -> None:
        if self.problem_type != "regression":
            return super().save_pretrained(folder)
        found = _output_layer(self.model)
        if found is None:
            raise UsageError(f"regression: cannot find the output layer of {type(self.model).__name__} to fold the "
                             "target standardisation into; use a BERT- or RoBERTa-style sequence classifier")
        name = found[0]
        state = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        # y = (W x + b) * scale + mean  ==  (scale W) x + (scale b + mean): the folder predicts in own units.
        state[f"{name}.weight"] = state[f"{name}.weight"] * self.target_scale
        state[f"{name}.bias"] = state[f"{name}.bias"] * self.target_scale + self.target_mean
        self.model.save_pretrained(folder, state_dict=state)

    @classmethod
    def load(cls, folder: str, meta: dict) -> "SequenceClassifier":
        head = super().load(folder, meta)
        if head.problem_type == "regression":  # undo the fold: the head applies scale and mean itself
            found = _output_layer(head.model)
            if found is not None:
                with torch.no_grad():
                    layer = found[1]
                    layer.bias.sub_(head.target_mean).div_(head.target_scale)
                    layer.weight.div_(head.target_scale)
        return head

    def load_extra_modules(self, folder: str, meta: dict) -> None:
        super().load_extra_modules(folder, meta)
        thresholds = meta.get("thresholds")
        if self.problem_type == "multi_label" and isinstance(thresholds, dict):
            self.thresholds = torch.tensor([float(thresholds.get(label, self.thresholds[index]))
                                            for index, label in enumerate(self.labels)], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ the task

class SentenceTask(ClassificationTask):
    name = "sentence"
    description = ("sentence / sentence-pair classification (single- or multi-label) and regression (TSV, CSV, "
                   "JSONL; GLUE SST-2 TSV)")
    options_type = SentenceOptions
    predictions_file = "test_predictions.jsonl"
    head_type = SequenceClassifier
    samples = {split: sample_path(__file__, f"sentence_{name}.tsv")
               for split, name in (("train", "train"), ("validation", "dev"), ("test", "test"))}

    METRICS = {"single_label": "accuracy", "multi_label": "micro_f1", "regression": "pearson", "auto": "accuracy"}

    @property
    def metric(self) -> str:
        """What picks the best epoch: accuracy, micro-F1 (multi-label) or Pearson's r (regression)."""
        return self.METRICS[self.options.problem_type]

    def problems(self, config) -> list[str]:
        return self.options.problems(config)

    @property
    def problem_type(self) -> str:
        return self.options.problem_type

    @property
    def predicts_numbers(self) -> bool:
        """Regression: no classes (the core's class-variety check does not apply)."""
        return self.options.problem_type == "regression"

    def stream(self, path: str) -> Iterator[SentenceExample]:
        check_text_file(path)  # file not found / empty / not UTF-8, anywhere in the file, before parsing
        tool = detect_tool(path)  # a Label Studio or doccano export
        kind = _format(path)
        reader = read_tool(path, tool, self.options) if tool else read_jsonl(path, self.options) \
            if kind == "jsonl" else read_delimited(path, kind, self.options)
        count, first_kind = 0, None
        for example in reader:
            count += 1
            if example.label is not None:
                label_kind = "a list of labels" if isinstance(example.label, list) else "a single label"
                if first_kind is None:
                    first_kind = (label_kind, example.line)
                elif label_kind != first_kind[0] and self.options.problem_type == "auto":
                    raise DataError(path, example.line, f"this record has {label_kind}, but the first one (line "
                                    f"{first_kind[1]}) has {first_kind[0]}",
                                    'give every record a list (["a"], or [] for none) for multi-label data, or '
                                    "a single label for single-label data")
            yield example
        if not count:
            raise DataError(path, None, "no examples found",
                            f"TSV/CSV: a header with {self.options.text_column or 'sentence'!r} and "
                            f"{self.options.label_column!r} "
                            "then one row per example; JSONL: one object per line")

    # ---------------------------------------------------------------------------------------- problem type
    def fit_to_data(self, train_examples) -> None:
        """Settle the problem type from the training labels (unless --problem_type names it), print it and record
        it in the options (saved in config.json and the model folder); for regression, the training targets'
        mean and standard deviation that standardise them."""
        requested = self.options.problem_type
        lists = scalars = numbers = non_integers = 0
        first_list = first_scalar = first_non_number = None
        values = []
        for example in train_examples:
            label = example.label
            if isinstance(label, list):
                lists += 1
                first_list = first_list or example
                continue
            scalars += 1
            first_scalar = first_scalar or example
            value = _number(label)
            if value is None:
                first_non_number = first_non_number or example
                continue
            numbers += 1
            values.append(value)
            non_integers += not INTEGER.fullmatch(label)
        if requested == "auto":
            if lists and scalars:
                example = first_scalar if first_list.line < first_scalar.line else first_list
                raise DataError(example.path, example.line, "the training labels mix lists (multi-label) and single "
                                "labels", 'give every record a list (["a"], or [] for none), or pass --problem_type')
            if lists:
                chosen, why = "multi_label", "a list of labels per example"
            elif non_integers and not first_non_number:
                chosen, why = "regression", "every label is a number and some are not integers"
            elif non_integers and numbers >= 0.9 * scalars:
                example = first_non_number
                raise DataError(example.path, example.line, f"the label {example.label!r} is not a number, while "
                                f"{numbers} of the {scalars} training labels are (regression data?)",
                                "fix or remove the row, or pass --problem_type single_label to treat the labels as "
                                "classes")
            else:
                chosen, why = "single_label", "one label per example" + (
                    " (integer labels are classes: pass --problem_type regression to predict them as numbers)"
                    if numbers == scalars and scalars else "")
            print(f"problem type: {chosen} ({why}; --problem_type chooses another)")
            self.options.problem_type = chosen
        else:
            print(f"problem type: {requested} (--problem_type)")
        if self.options.problem_type == "single_label" and first_list is not None:
            raise DataError(first_list.path, first_list.line, "a list of labels in a single-label file",
                            "give one label per example, or pass --problem_type multi_label (or auto)")
        if self.options.problem_type == "regression":
            if first_list is not None:
                raise DataError(first_list.path, first_list.line, "a list of labels in a regression file",
                                "give one number per example")
            if first_non_number is not None:
                raise DataError(first_non_number.path, first_non_number.line,
                                f"the label {first_non_number.label!r} is not a number (regression)",
                                "give a number such as 3.5, or fix the row")
            mean = sum(values) / len(values)
            spread = (sum((value - mean) ** 2 for value in values) / len(values)) ** 0.5
            if not spread:
                example = first_scalar
                raise DataError(example.path, None, f"every training target is {values[0]:g}: nothing to learn",
                                "check the label column and the file")
            self.target_stats = (mean, spread)
            print(f"regression targets: mean {mean:.6g}, standard deviation {spread:.6g} over {len(values)} "
                  "training examples (trained standardised, reported in these units)")

    def labels_of(self, example) -> list[str]:
        """The example's gold labels: one class, a (possibly empty) list of labels, or none for regression."""
        if self.options.problem_type == "regression":
            return []
        label = example.label
        if isinstance(label, list):
            return list(label)
        return [] if label is None else [label]

    def build_labels(self, train_examples, declared: list[str] | None = None) -> list[str]:
        """Classes (single-label), the labels that occur (multi-label), or the one output named after the label
        column (regression)."""
        if self.options.problem_type == "regression":
            return [self.options.label_column]
        if self.options.problem_type == "multi_label":
            seen = {label for example in train_examples for label in self.labels_of(example)}
            return list(declared) if declared is not None and seen <= set(declared) else self.order_labels(seen)
        return super().build_labels(train_examples, declared)

    def head_options(self) -> dict:
        problem = self.options.problem_type
        if problem == "multi_label":
            return {"problem_type": problem, "threshold": self.options.threshold}
        if problem == "regression":
            mean, scale = getattr(self, "target_stats", (0.0, 1.0))
            return {"problem_type": problem, "target_mean": mean, "target_scale": scale,
                    "regression_loss": self.options.regression_loss}
        return {}

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
                feature["labels"] = self._target(example, label_ids)
            inputs.append(feature)
        return Features(inputs, list(range(len(examples))), [len(feature["input_ids"]) for feature in inputs])

    def _target(self, example: SentenceExample, label_ids: dict[str, int]):
        """The training target: a class id (-100 for a class the model lacks), a 0/1 float per label
        (multi-label), or the number (regression); a label of the wrong kind is a DataError naming its line."""
        problem, label = self.options.problem_type, example.label
        if problem == "multi_label":
            targets = [0.0] * len(label_ids)
            for item in (label if isinstance(label, list) else [label]):
                if item in label_ids:
                    targets[label_ids[item]] = 1.0
            return targets
        if isinstance(label, list):
            kind = "regression" if problem == "regression" else "single-label"
            raise DataError(example.path, example.line, f"a list of labels ({json.dumps(label, ensure_ascii=False)})"
                            f" in a {kind} file", "give one label per example"
                            + (", or train with --problem_type multi_label" if kind == "single-label" else ""))
        if problem == "regression":
            value = _number(label)
            if value is None:
                raise DataError(example.path, example.line, f"the label {label!r} is not a number (this is a "
                                "regression model)", "give a number such as 3.5, or fix the row")
            return value
        return label_ids.get(label, -100)

    # ---------------------------------------------------------------------------------------- scoring
    def evaluate(self, examples, features, outputs, labels, source) -> Evaluation:
        if self.options.problem_type == "multi_label":
            return self._evaluate_multi_label(examples, features, outputs, labels, source)
        if self.options.problem_type == "regression":
            return self._evaluate_regression(examples, features, outputs, source)
        return super().evaluate(examples, features, outputs, labels, source)

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

    def predicted_labels(self, examples, features, outputs, labels) -> list:
        """One class, the list of labels on (multi-label), or the value (regression) per example."""
        rows = self.per_example(examples, features, outputs)
        if self.options.problem_type == "multi_label":
            return [[label for label, on in zip(labels, output["pred"]) if on] for output in rows]
        if self.options.problem_type == "regression":
            return [float(output["pred"]) for output in rows]
        return [labels[int(output["pred"])] for output in rows]

    def _evaluate_multi_label(self, examples, features, outputs, labels, source) -> Evaluation:
        predicted = self.predicted_labels(examples, features, outputs, labels)
        gold = [self.labels_of(example) for example in examples]
        scores = multi_label_report_dict(gold, predicted, labels)
        metrics = {key: value for key, value in scores.items() if key != "per_label"}
        for label, row in scores["per_label"].items():
            metrics.update({f"{label}_{key}": value for key, value in row.items()})
        rows = self.per_example(examples, features, outputs)
        thresholds = [float(value) for value in rows[0]["thresholds"]] if rows else []
        report = "\n".join([
            f"scored file: {source} ({len(examples)} examples; multi-label, {len(labels)} labels)",
            format_multi_label_report(scores), "",
            "decision thresholds (label on when its probability >= the threshold): "
            + ", ".join(f"{label} {value:.3f}" for label, value in zip(labels, thresholds)),
            "temperature calibration: single-label only (multi-label probabilities are the model's own sigmoids)",
        ])
        return Evaluation(metrics, report, predicted, None, None)

    def _evaluate_regression(self, examples, features, outputs, source) -> Evaluation:
        predicted = self.predicted_labels(examples, features, outputs, [])
        gold = [float(_number(example.label)) for example in examples]
        scores = regression_report_dict(gold, predicted)
        report = "\n".join([
            f"scored file: {source} ({len(examples)} examples; regression, in the targets' own units)",
            format_regression_report(scores),
            "temperature calibration: single-label only (a regression output has no probabilities)",
        ])
        return Evaluation(dict(scores), report, predicted, None, None)

    def confidences(self, examples, features, outputs, labels):
        if self.options.problem_type in ("multi_label", "regression"):
            return None  # temperature calibration is for single-label softmax confidences only
        return super().confidences(examples, features, outputs, labels)

    def write_predictions(self, path: str, examples, predictions) -> None:
        if self.options.problem_type not in ("multi_label", "regression"):  # single-label (or not yet resolved)
            return super().write_predictions(path, examples, predictions)
        gold = [float(_number(example.label)) if self.options.problem_type == "regression"
                else self.labels_of(example) for example in examples]
        atomic_write_lines(path, [json.dumps({"id": example.id, "gold": target, "pred": prediction},
                                             ensure_ascii=False)
                                  for example, target, prediction in zip(examples, gold, predictions)])

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
        """Per input: {"text", ("text_pair"), "label", "probabilities": {label: p}} (single-label; integer labels
        stay integers); {"text", "labels": [labels on], "probabilities": {label: p}} (multi-label, the per-label
        sigmoids); {"text", "value": number} (regression, in the targets' units)."""
        results, typed = [], label_typer(labels)
        problem = self.options.problem_type
        for example, output in zip(examples, self.per_example(examples, features, outputs)):
            result = {"text": example.text}
            if example.text_pair is not None:
                result["text_pair"] = example.text_pair
            if problem == "regression":
                result["value"] = float(output["pred"])
            elif problem == "multi_label":
                result["labels"] = [label for label, on in zip(labels, output["pred"]) if on]
                result["probabilities"] = self.probabilities(output, labels)
            else:
                result["label"] = typed(labels[int(output["pred"])])
                result["probabilities"] = self.probabilities(output, labels)
            results.append(result)
        return results

    def pre_annotations(self, inputs: list, predict) -> list[Prediction]:
        """Label Studio / doccano pre-annotations: the predicted class (multi-label: the classes on) as the
        choices; score: the predicted class's probability (multi-label: the least certain on/off decision)."""
        if self.options.problem_type == "regression":
            raise UsageError("--output_format: a regression model predicts numbers, which neither Label Studio "
                             "choices nor doccano labels hold; use --output_format json")
        predictions = []
        for item, result in zip(inputs, predict([{"text": item.text} if isinstance(item, ToolRecord) else item
                                                 for item in inputs])):
            probabilities = result["probabilities"]
            if "labels" in result:
                choices = [str(label) for label in result["labels"]]
                score = min(max(value, 1 - value) for value in probabilities.values())
            else:
                choices = [str(result["label"])]
                score = probabilities[str(result["label"])]
            predictions.append(tool_prediction(item, result["text"], score, choices=choices))
        return predictions

    # ---------------------------------------------------------------------------------------- --check_data
    def data_notes(self, split: str, examples, features, tokenizer) -> list[str]:
        """Multi-label: label cardinality, empty label lists, rare labels, the most frequent co-occurrences.
        Regression: range, distribution and the non-numbers (none: they are refused by line). Annotation-tool
        exports: their report (tasks, annotations, annotators, skipped tasks)."""
        notes = [f"{path}: {line}" for path in dict.fromkeys(example.path for example in examples)
                 for line in tool_summary(path, annotation=self.options.annotation, text_key=self.options.text_column)]
        if self.options.problem_type == "multi_label":
            return notes + multi_label_notes([self.labels_of(example) for example in examples])
        if self.options.problem_type == "regression":
            return notes + regression_notes([_number(example.label) for example in examples])
        return notes
