"""Annotation-tool files: Label Studio and doccano exports in, pre-annotations for them out.

Reading. `detect_tool(path)` tells the exports apart by content (never by a flag):
  label-studio      Label Studio's JSON export: a JSON array of tasks {"id", "data": {key: text},
                    "annotations": [{"result": [...], "was_cancelled", "completed_by", "created_at"}]}; result items
                    of type "labels" ({"id", "value": {"start", "end", "text", "labels"}}), "relation" ({"from_id",
                    "to_id", "direction", "labels"}) and "choices" ({"value": {"choices"}}).
  label-studio-min  its JSON-MIN variant: a JSON array of flat rows, one per annotation: the data keys, "id" (the
                    task), "annotator", "annotation_id", "created_at" and one key per control (its from_name): a
                    list of spans {"start", "end", "text", "labels"}, a choice string, or {"choices": [...]}. JSON-MIN
                    has no relations (Label Studio drops them from it).
  doccano           doccano's JSONL exports: sequence labelling {"text", "label": [[start, end, type], ...]}, the
                    relation export {"text", "entities": [{"id", "start_offset", "end_offset", "label"}],
                    "relations": [{"from_id", "to_id", "type"}]}, text classification {"id", "text", "label": [...]}.
`read_tool_records` turns any of them into `ToolRecord`s (one text, its spans, relations and choices, from the one
annotation chosen per task) and a `ToolReport` (tasks, annotations, annotators, skipped tasks, offset repairs). The
tasks map records onto their own readers: NER onto `bert_ft.spans.tag_spans` through its `entities` layout, the
sentence task onto its examples, relations onto the joint entities/relations layout.

Offsets. Current Label Studio counts Unicode code points; older Label Studio and tools that count like JavaScript
use UTF-16 code units, so after a character outside the Basic Multilingual Plane (an emoji) every span is off by
one per such character. A span that carries its "text" shows which: a span whose text matches only under UTF-16
units is converted (and counted); one that matches under neither is refused with the record and both strings.
Spans without text (doccano) are taken as code points; records whose text holds characters outside the BMP are
counted so the report says their offsets could not be checked.

Writing. `label_studio_task` and `doccano_record` build the import formats (Label Studio tasks with `predictions`:
model_version, score and results; doccano JSONL) from `Prediction`s, which each task builds from its predict results.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .config import flag
from .data import first_content_line, iter_text_lines, read_jsonl_records
from .errors import DataError, UsageError

TOOLS = {"label-studio": "Label Studio JSON export", "label-studio-min": "Label Studio JSON-MIN export",
         "doccano": "doccano JSONL export"}
OUTPUT_FORMATS = ("json", "label-studio", "doccano")
SHOWN = 3  # records named per kind of problem
UNLABELLED_RELATION = "related"  # the label of a Label Studio relation drawn without a label
_ANNOTATION_META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "agreement",
                    "drafts", "predictions", "meta", "Comments", "comments", "annotation_approver"}
_LS_FIX = ("export the project from Label Studio as JSON (or JSON-MIN): a list of tasks with \"data\" and "
           "\"annotations\"")


@dataclass
class AnnotationOptions:
    """The flags of annotation-tool inputs, shared by the tasks that read them (a base of their options)."""

    annotation: str = flag("first", "Label Studio tasks with several annotations: which one to train on: first "
                           "(the earliest completed, non-cancelled one), last, or an annotator's email or user id "
                           "(tasks that annotator did not annotate are skipped and counted)")


@dataclass
class ToolSpan:
    id: str | None
    start: int  # code points, end exclusive (converted from UTF-16 units where the span's text showed them)
    end: int
    label: str
    text: str | None  # the span's own copy of its characters, when the tool writes one


@dataclass
class ToolRecord:
    text: str
    line: int | None  # the line where the task or record starts
    where: str  # how messages name the record: "task 17", "record 3"
    task_id: Any
    spans: list[ToolSpan] = field(default_factory=list)
    relations: list[tuple[str, str, str]] = field(default_factory=list)  # (head span id, tail span id, label)
    choices: list[str] | None = None  # text classification (None: the record has no choices)
    annotator: str | None = None
    data: dict = field(default_factory=dict)  # Label Studio's task data (kept for pre-annotations)
    names: dict = field(default_factory=dict)  # Label Studio control names: {"labels": from_name, "to_name": ...}
    strings: dict = field(default_factory=dict)  # JSON-MIN: string values besides the text (single choices, meta)


@dataclass
class ToolReport:
    tool: str
    tasks: int = 0
    used: int = 0
    annotations: Counter = field(default_factory=Counter)  # annotations per task -> tasks
    cancelled: int = 0
    annotators: Counter = field(default_factory=Counter)  # annotator of the chosen annotation -> tasks
    skipped: dict = field(default_factory=dict)  # reason -> [record names]
    utf16: list = field(default_factory=list)  # records whose spans were converted from UTF-16 units
    unchecked: list = field(default_factory=list)  # records with non-BMP characters and spans without text
    ignored: Counter = field(default_factory=Counter)  # result types not used (e.g. textarea)
    overlaps: list = field(default_factory=list)  # "task 3: LOC 'New York' ~ ORG 'York Times'" per overlapping pair
    annotation: str = "first"

    def skip(self, reason: str, where: str) -> None:
        self.skipped.setdefault(reason, []).append(where)

    def lines(self) -> list[str]:
        """The report: one summary line, then one line per kind of repair or skip (for the screen and
        --check_data)."""
        several = sum(count for number, count in self.annotations.items() if number > 1)
        total = sum(number * count for number, count in self.annotations.items())
        head = f"{TOOLS[self.tool]}: {self.tasks} tasks, {self.used} used"
        if self.tool != "doccano":
            policy = {"first": "the first completed, non-cancelled one", "last": "the last completed, non-cancelled "
                      "one"}.get(self.annotation, f"the one by {self.annotation}")
            head += (f"; {total} annotations ({self.cancelled} cancelled), {several} task(s) with several: "
                     f"{policy} per task (--annotation)")
        lines = [head]
        if self.annotators:
            lines.append("annotators (tasks used): " + ", ".join(
                f"{'user ' + name if name.isdigit() else name}: {count}" for name, count in self.annotators.most_common()))
        if self.annotations and self.tool != "doccano":
            lines.append("annotations per task: " + ", ".join(f"{number}: {count} task(s)" for number, count
                                                            in sorted(self.annotations.items())))
        for reason, where in self.skipped.items():
            lines.append(f"skipped {len(where)} ({reason}): " + ", ".join(where[:SHOWN])
                         + (" ..." if len(where) > SHOWN else ""))
        if self.utf16:
            lines.append(f"UTF-16 offsets converted to characters in {len(self.utf16)} records (the spans' text "
                         "matched only when counting UTF-16 code units, as older Label Studio and JavaScript tools "
                         "do): " + ", ".join(self.utf16[:SHOWN]) + (" ..." if len(self.utf16) > SHOWN else ""))
        if self.unchecked:
            lines.append(f"offsets not checkable in {len(self.unchecked)} records: spans without their text follow "
                         "a character outside the BMP (e.g. an emoji), so code points were assumed (a tool counting "
                         "UTF-16 units would put each such span one place too far per character): "
                         + ", ".join(self.unchecked[:SHOWN]) + (" ..." if len(self.unchecked) > SHOWN else ""))
        if self.overlaps:
            lines.append(f"overlapping or nested spans: {len(self.overlaps)} pairs (NER keeps the longer span of each, "
                         "relations pair only disjoint entities): " + "; ".join(self.overlaps[:SHOWN])
                         + (" ..." if len(self.overlaps) > SHOWN else ""))
        if self.ignored:
            lines.append("result types not used: " + ", ".join(f"{kind} {count}" for kind, count
                                                              in self.ignored.most_common()))
        return lines


# ---------------------------------------------------------------------------------------------- detection

def _json_array(path: str) -> Iterator[tuple[int, Any]]:
    """(line, element) of each element of a JSON array file, parsed one element at a time (so detection reads only
    the first ones, and messages name the line where each task starts)."""
    text = "\n".join(iter_text_lines(path))
    decoder = json.JSONDecoder()
    position, line, counted = text.index("[") + 1, 1, 0

    def skip_space(index: int) -> int:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        return index

    def line_at(index: int) -> int:  # counted incrementally: a large export is scanned once
        nonlocal line, counted
        line += text.count("\n", counted, index)
        counted = index
        return line

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        position = skip_space(position)
        start_line = line_at(position)
        try:
            element, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(path, error.lineno, f"not valid JSON ({error.msg}, column {error.colno})",
                            _LS_FIX) from None
        except RecursionError:
            raise DataError(path, start_line, "JSON nested too deeply to read", _LS_FIX) from None
        yield start_line, element
        position = skip_space(position)
        if position < len(text) and text[position] == ",":
            position += 1
            continue
        if position < len(text) and text[position] == "]":
            if text[position + 1:].strip():
                raise DataError(path, line_at(position), "text after the end of the JSON array", _LS_FIX)
            return
        raise DataError(path, line_at(position), "expected ',' or ']' between the tasks of the JSON array", _LS_FIX)


def _is_doccano(record: dict) -> bool | None:
    """Whether a JSON Lines record is a doccano export's; None when it cannot tell (no span, no label)."""
    if not isinstance(record.get("text"), str):
        return False
    entities = record.get("entities")
    if isinstance(entities, list):
        if not entities:
            return None
        return isinstance(entities[0], dict) and "start_offset" in entities[0]
    label = record.get("label")
    if not isinstance(label, list):
        return False
    if not label:
        return None  # an empty list: spans or classes, from doccano or not, the next records tell
    if all(isinstance(item, list) for item in label):
        return True  # sequence labelling: [[start, end, type], ...]
    # text classification: doccano always writes its integer id and a list of labels
    if isinstance(record.get("id"), int) and not isinstance(record["id"], bool) \
            and all(isinstance(item, str) for item in label):
        return True
    return False


def detect_tool(path: str) -> str | None:
    """"label-studio", "label-studio-min", "doccano" or None (not an annotation-tool export), from the content."""
    first = first_content_line(iter_text_lines(path)).lstrip()
    if first.startswith("["):
        try:
            tasks = [element for _, element in itertools.islice(_json_array(path), 20)]
        except DataError:
            if first.rstrip() == "[" or first[1:].lstrip().startswith("{"):
                raise  # a damaged export: say where
            return None  # e.g. a CoNLL file whose first token is "["
        tasks = [task for task in tasks if isinstance(task, dict)]
        if not tasks:
            return None
        if any("annotations" in task or "completions" in task or ("data" in task and "predictions" in task)
               for task in tasks):
            return "label-studio"
        return "label-studio-min"
    if first.startswith("{"):
        for index, (_, record) in enumerate(read_jsonl_records(path, iter_text_lines(path))):
            found = _is_doccano(record)
            if found is not None or index >= 1000:  # the first record that shows it (unlabelled ones do not)
                return "doccano" if found else None
    return None


# ---------------------------------------------------------------------------------------------- offsets

def utf16_to_code_points(text: str) -> dict[int, int]:
    """UTF-16 code-unit offset -> code-point offset, for every offset that falls between characters."""
    mapping, units = {}, 0
    for index, char in enumerate(text):
        mapping[units] = index
        units += 2 if ord(char) > 0xFFFF else 1
    mapping[units] = len(text)
    return mapping


def has_non_bmp(text: str) -> bool:
    return any(ord(char) > 0xFFFF for char in text)


def _fix_offsets(record: ToolRecord, path: str, report: ToolReport) -> None:
    """Check each span's text against its offsets; convert UTF-16 offsets (see the module docstring)."""
    text = record.text
    mapping = None
    converted = False
    for span in record.spans:
        if not (isinstance(span.start, int) and isinstance(span.end, int)) or isinstance(span.start, bool):
            raise DataError(path, record.line, f"{record.where}: span {span.label!r} has offsets {span.start!r}, "
                            f"{span.end!r}, not two integers", "character offsets, end exclusive")
        if span.text is None or text[span.start:span.end] == span.text:
            continue
        if mapping is None:
            mapping = utf16_to_code_points(text) if has_non_bmp(text) else {}
        start, end = mapping.get(span.start), mapping.get(span.end)
        if start is not None and end is not None and text[start:end] == span.text:
            span.start, span.end, converted = start, end, True
            continue
        raise DataError(path, record.line, f"{record.where}: the span {span.label} [{span.start}, {span.end}) "
                        f"covers {text[span.start:span.end]!r} but its text is {span.text!r}"
                        + (" (also when counting UTF-16 code units)" if mapping else ""),
                        "the export and the text disagree: re-export the task from the tool, or correct the span's "
                        "start/end (0-based characters, end exclusive) or its text")
    if converted:
        report.utf16.append(record.where)
    else:  # only a span after a character outside the BMP can be shifted by UTF-16 counting
        first = next((index for index, char in enumerate(text) if ord(char) > 0xFFFF), None)
        if first is not None and any(span.text is None and span.end > first for span in record.spans):
            report.unchecked.append(record.where)


# ---------------------------------------------------------------------------------------------- Label Studio

def _annotator(annotation: dict) -> str | None:
    who = annotation.get("completed_by", annotation.get("annotator"))
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def _matches(annotation: dict, wanted: str) -> bool:
    who = annotation.get("completed_by", annotation.get("annotator"))
    names = {str(value) for value in (who.values() if isinstance(who, dict) else [who]) if value is not None}
    return wanted in names


def _choose(annotations: list[dict], policy: str) -> dict | None:
    """The annotation `--annotation` picks among a task's non-cancelled ones (ordered by creation time where the
    export says it, else in file order)."""
    ordered = sorted(annotations, key=lambda annotation: str(annotation.get("created_at") or ""))
    if not ordered:
        return None
    if policy == "first":
        return ordered[0]
    if policy == "last":
        return ordered[-1]
    chosen = [annotation for annotation in ordered if _matches(annotation, policy)]
    return chosen[0] if chosen else None


def _text_key(data: dict, text_key: str | None, to_names: set[str], path: str, line: int | None, where: str) -> str:
    if text_key is not None:
        if text_key not in data:
            raise DataError(path, line, f"{where}: no data key {text_key!r} (--text_column; data keys: "
                            f"{sorted(data)})", "name the data key that holds the text")
        return text_key
    strings = [key for key, value in data.items() if isinstance(value, str)]
    if len(strings) == 1:
        return strings[0]
    for key in sorted(to_names) + ["text"]:
        if key in strings:
            return key
    raise DataError(path, line, f"{where}: cannot tell which data key holds the text (string keys: {strings})",
                    "name it with --text_column")


def _label_studio_results(results: list, record: ToolRecord, path: str, report: ToolReport) -> None:
    for item in results:
        if not isinstance(item, dict):
            raise DataError(path, record.line, f"{record.where}: a result item is {json.dumps(item)[:80]}, not an "
                            "object", _LS_FIX)
        kind = str(item.get("type", "")).lower()
        value = item.get("value") if isinstance(item.get("value"), dict) else {}
        if kind in ("labels", "hypertextlabels") or (not kind and "start" in value):
            labels = value.get("labels", value.get("hypertextlabels")) or []
            if not isinstance(labels, list) or not labels:
                raise DataError(path, record.line, f"{record.where}: the span {json.dumps(value)[:80]} has no "
                                "labels", "give every span a label in Label Studio")
            record.names.setdefault("labels", item.get("from_name"))
            record.names.setdefault("to_name", item.get("to_name"))
            for label in labels:
                record.spans.append(ToolSpan(None if item.get("id") is None else str(item.get("id")),
                                             value.get("start"), value.get("end"), str(label), value.get("text")))
        elif kind == "relation":
            head, tail = item.get("from_id"), item.get("to_id")
            labels = item.get("labels") or [UNLABELLED_RELATION]
            pairs = {"left": [(tail, head)], "bi": [(head, tail), (tail, head)]}.get(item.get("direction"),
                                                                                   [(head, tail)])
            for first, second in pairs:
                for label in labels:
                    record.relations.append((str(first), str(second), str(label)))
        elif kind == "choices":
            choices = value.get("choices")
            if not isinstance(choices, list):
                raise DataError(path, record.line, f"{record.where}: choices {json.dumps(value)[:80]} are not a "
                                "list", _LS_FIX)
            record.names.setdefault("choices", item.get("from_name"))
            record.names.setdefault("to_name", item.get("to_name"))
            record.choices = (record.choices or []) + [str(choice) for choice in choices]
        else:
            report.ignored[kind or "untyped"] += 1


def _label_studio(path: str, policy: str, text_key: str | None, source: str, report: ToolReport
                  ) -> Iterator[ToolRecord]:
    for ordinal, (line, task) in enumerate(_json_array(path), start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DataError(path, line, f"task {ordinal} is not an object with a \"data\" object", _LS_FIX)
        where = f"task {task.get('id', ordinal)}"
        report.tasks += 1
        annotations = task.get("predictions", []) if source == "predictions" \
            else task.get("annotations", task.get("completions", []))
        if not isinstance(annotations, list):
            raise DataError(path, line, f"{where}: \"{source}\" is not a list", _LS_FIX)
        live = [annotation for annotation in annotations if isinstance(annotation, dict)
                and not annotation.get("was_cancelled") and not annotation.get("skipped")]
        report.cancelled += len(annotations) - len(live)
        report.annotations[len(annotations)] += 1
        chosen = _choose(live, policy) if source != "predictions" else (live[0] if live else None)
        if chosen is None and source == "any":  # predict: the task's first prediction, else the text alone
            predictions = [item for item in task.get("predictions") or [] if isinstance(item, dict)]
            chosen = predictions[0] if predictions else {"result": []}
        if chosen is None:
            reason = ("no annotation" if not annotations else "every annotation cancelled" if not live
                      else f"no annotation by {policy}")
            report.skip(reason, where)
            continue
        results = chosen.get("result", [])
        if not isinstance(results, list):
            raise DataError(path, line, f"{where}: \"result\" is not a list", _LS_FIX)
        to_names = {str(item.get("to_name")) for item in results if isinstance(item, dict) and item.get("to_name")
                    and str(item.get("type", "")).lower() in ("labels", "hypertextlabels", "choices")}
        key = _text_key(task["data"], text_key, to_names, path, line, where)
        text = task["data"][key]
        if not isinstance(text, str):
            raise DataError(path, line, f"{where}: data.{key} is {json.dumps(text)[:60]}, not a text",
                            "name the data key that holds the text with --text_column")
        if len(to_names) > 1:  # several Text tags: keep the labels of the one read (its tag named like its key)
            if text_key is None or key not in to_names:
                raise DataError(path, line, f"{where}: the labels point at several texts (to_name "
                                f"{', '.join(sorted(to_names))}); bert-ft reads one text per task",
                                "name the text with --text_column, its data key being the name of its Text tag, or "
                                "label one text per task")
            results = [item for item in results if not isinstance(item, dict) or item.get("to_name") in (None, key)]
        record = ToolRecord(text, line, where, task.get("id", ordinal), annotator=_annotator(chosen),
                            data=task["data"])
        record.names["text_key"] = key
        _label_studio_results(results, record, path, report)
        yield record


def _json_min_value(value, name: str, record: ToolRecord, path: str) -> None:
    """One control's value in a JSON-MIN row: a list of spans, a choice, or {"choices": [...]}."""
    if isinstance(value, list) and value and all(isinstance(item, dict) and "start" in item for item in value):
        record.names.setdefault("labels", name)
        for item in value:
            labels = item.get("labels") or []
            if not labels:
                raise DataError(path, record.line, f"{record.where}: the span {json.dumps(item)[:80]} has no labels",
                                "give every span a label in Label Studio")
            for label in labels:
                record.spans.append(ToolSpan(None, item.get("start"), item.get("end"), str(label), item.get("text")))
    elif isinstance(value, dict) and isinstance(value.get("choices"), list):
        record.names.setdefault("choices", name)
        record.choices = (record.choices or []) + [str(choice) for choice in value["choices"]]


def _label_studio_min(path: str, policy: str, text_key: str | None, report: ToolReport) -> Iterator[ToolRecord]:
    """JSON-MIN: rows are annotations; rows of one task (its "id") are grouped, then one is chosen. A single
    choice is a plain string there, like the text: string keys other than the text are kept in `strings` for the
    sentence task to pick its label from."""
    groups: dict[Any, list[tuple[int, dict]]] = {}
    for ordinal, (line, row) in enumerate(_json_array(path), start=1):
        if not isinstance(row, dict):
            raise DataError(path, line, f"row {ordinal} is {json.dumps(row)[:60]}, not an object", _LS_FIX)
        groups.setdefault(row.get("id", f"row {ordinal}"), []).append((line, row))
    for task_id, rows in groups.items():
        report.tasks += 1
        report.annotations[len(rows)] += 1
        where = f"task {task_id}"
        chosen = _choose([dict(row, _line=line) for line, row in rows], policy)
        if chosen is None:
            report.skip(f"no annotation by {policy}", where)
            continue
        line = chosen.pop("_line")
        data = {key: value for key, value in chosen.items() if key not in _ANNOTATION_META}
        strings = {key: value for key, value in data.items() if isinstance(value, str)}
        if not strings:
            raise DataError(path, line, f"{where}: no text in the row (keys: {sorted(chosen)})", _LS_FIX)
        key = _text_key(strings, text_key, set(), path, line, where)
        record = ToolRecord(data[key], line, where, task_id, annotator=_annotator(chosen), data={key: data[key]})
        record.names["text_key"] = key
        record.strings = {name: value for name, value in strings.items() if name != key}
        for name, value in data.items():
            if not isinstance(value, str):
                _json_min_value(value, name, record, path)
        yield record


# ---------------------------------------------------------------------------------------------- doccano

def _doccano(path: str, report: ToolReport) -> Iterator[ToolRecord]:
    fix = ('doccano exports: {"text", "label": [[start, end, "TYPE"], ...]}, {"text", "entities": [{"id", '
           '"start_offset", "end_offset", "label"}], "relations": [{"from_id", "to_id", "type"}]} or {"text", '
           '"label": ["class", ...]}')
    for number, row in read_jsonl_records(path, iter_text_lines(path)):
        report.tasks += 1
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(path, number, "'text' must be a string", fix)
        record = ToolRecord(text, number, f"line {number}", row.get("id", number), data={"text": text})
        if isinstance(row.get("entities"), list):
            for entity in row["entities"]:
                if not (isinstance(entity, dict) and {"start_offset", "end_offset", "label"} <= set(entity)):
                    raise DataError(path, number, f"entity {json.dumps(entity)[:80]} is not {{\"id\", "
                                    "\"start_offset\", \"end_offset\", \"label\"}", fix)
                record.spans.append(ToolSpan(str(entity.get("id")), entity["start_offset"], entity["end_offset"],
                                             str(entity["label"]), None))
            for relation in row.get("relations") or []:
                if not (isinstance(relation, dict) and {"from_id", "to_id", "type"} <= set(relation)):
                    raise DataError(path, number, f"relation {json.dumps(relation)[:80]} is not {{\"from_id\", "
                                    "\"to_id\", \"type\"}", fix)
                record.relations.append((str(relation["from_id"]), str(relation["to_id"]), str(relation["type"])))
        else:
            labels = row.get("label", row.get("labels", []))
            if not isinstance(labels, list):
                raise DataError(path, number, f"'label' is {json.dumps(labels)[:80]}, not a list", fix)
            if labels and all(isinstance(item, list) for item in labels):
                for item in labels:
                    if not (len(item) == 3 and isinstance(item[2], str)):
                        raise DataError(path, number, f"label {json.dumps(item)[:80]} is not [start, end, \"TYPE\"]",
                                        fix)
                    record.spans.append(ToolSpan(None, item[0], item[1], item[2], None))
            elif all(isinstance(item, (str, int)) and not isinstance(item, bool) for item in labels):
                record.choices = [str(item) for item in labels]
            else:
                raise DataError(path, number, f"'label' {json.dumps(labels)[:80]} mixes spans and classes", fix)
        yield record


def _count_overlaps(record: ToolRecord, report: ToolReport) -> None:
    spans = sorted({(span.start, span.end, span.label) for span in record.spans})
    for index, (start, end, label) in enumerate(spans):
        for other_start, other_end, other_label in spans[index + 1:]:
            if other_start >= end:
                break
            report.overlaps.append(f"{record.where}: {label} {record.text[start:end]!r} ~ {other_label} "
                                   f"{record.text[other_start:other_end]!r}")


# ---------------------------------------------------------------------------------------------- entry point

def read_tool_records(path: str, tool: str, annotation: str = "first", text_key: str | None = None,
                      source: str = "annotations",
                      report: ToolReport | None = None) -> Iterator[ToolRecord]:
    """The records of an annotation-tool export (see the module docstring), offsets checked and converted to
    code points; records with an empty text are skipped and counted in `report`. `source` "predictions" reads a
    Label Studio file's predictions instead of its annotations (pre-annotations read back); "any" (predict's
    input) keeps every task: its chosen annotation, else its first prediction, else its text alone."""
    report = report if report is not None else ToolReport(tool, annotation=annotation)
    if tool == "label-studio":
        records = _label_studio(path, annotation, text_key, source, report)
    elif tool == "label-studio-min":
        records = _label_studio_min(path, annotation, text_key, report)
    elif tool == "doccano":
        records = _doccano(path, report)
    else:
        raise UsageError(f"unknown annotation tool {tool!r}")
    for record in records:
        if not record.text.strip():
            report.skip("empty text", record.where)
            continue
        _fix_offsets(record, path, report)
        _count_overlaps(record, report)
        if record.annotator is not None:
            report.annotators[record.annotator] += 1
        report.used += 1
        yield record
    if not report.used and source != "any":
        raise DataError(path, None, f"no usable task in this {TOOLS[tool]}: " + "; ".join(report.lines()[1:]),
                        "export tasks that were annotated (a cancelled or skipped annotation is not used); with "
                        "--annotation ANNOTATOR, check the annotator's email or user id")


def tool_summary(path: str, **read_options) -> list[str]:
    """The report lines of a file (what --check_data prints; it reads the file again, which is cheap next to
    encoding it)."""
    tool = detect_tool(path)
    if tool is None:
        return []
    report = ToolReport(tool, annotation=read_options.get("annotation", "first"))
    for _ in read_tool_records(path, tool, report=report, **read_options):
        pass
    return report.lines()


def joint_layout(record: ToolRecord) -> dict:
    """The record in the joint layout {"id", "text", "entities": [{"id", "start", "end", "type"}], "relations":
    [{"head", "tail", "label"}]} that the relation task reads (bert_ft_tasks.joint): a span with several labels
    is one entity with its first label; a span without an id gets one ("s1", "s2", ...)."""
    entities, seen = [], set()
    for number, span in enumerate(record.spans, start=1):
        span_id = span.id if span.id is not None else f"s{number}"
        if span_id in seen:
            continue
        seen.add(span_id)
        entities.append({"id": span_id, "start": span.start, "end": span.end, "type": span.label})
    relations = [{"head": head, "tail": tail, "label": label} for head, tail, label in record.relations]
    return {"id": record.task_id, "text": record.text, "entities": entities, "relations": relations}


# ---------------------------------------------------------------------------------------------- writing

@dataclass
class Prediction:
    """What a task predicted for one text, in the tools' terms: spans (start, end, label, score) with ids,
    relations (head id, tail id, label, score), choices (labels, score)."""

    text: str
    spans: list[tuple[str, int, int, str, float | None]] = field(default_factory=list)  # (id, start, end, label, p)
    relations: list[tuple[str, str, str, float | None]] = field(default_factory=list)
    choices: list[str] | None = None
    score: float | None = None  # the whole prediction's score (Label Studio sorts tasks by it)
    data: dict | None = None  # the input's Label Studio data (kept as it was), else {"text": text}
    names: dict = field(default_factory=dict)  # Label Studio control names found in the input
    extra: dict = field(default_factory=dict)  # keys of the input kept in a doccano record (id, meta)
    relation_layout: bool = False  # doccano: write the relation layout (entities + relations) even without relations


def tool_prediction(item: Any, text: str, score: float | None, **parts: Any) -> Prediction:
    """A Prediction for one predict input: an export's record keeps its data, control names and id; a raw
    input keeps its "id" (and "meta") for doccano."""
    if isinstance(item, ToolRecord):
        extra = {"id": item.task_id} if item.task_id is not None else {}
        return Prediction(text, score=score, data=item.data, names=item.names, extra=extra, **parts)
    extra = {key: item[key] for key in ("id", "meta") if isinstance(item, dict) and key in item}
    return Prediction(text, score=score, extra=extra, **parts)


DEFAULT_NAMES = {"labels": "label", "choices": "sentiment", "to_name": "text"}


def label_studio_task(prediction: Prediction, model_version: str) -> dict:
    """A Label Studio task to import: its data and one prediction (model_version, score, result items)."""
    names = {**DEFAULT_NAMES, **{key: value for key, value in prediction.names.items() if value}}
    text_key = names.get("text_key", "text")
    data = dict(prediction.data) if prediction.data else {text_key: prediction.text}
    result = []
    for span_id, start, end, label, score in prediction.spans:
        item = {"id": span_id, "from_name": names["labels"], "to_name": names["to_name"], "type": "labels",
                "value": {"start": start, "end": end, "text": prediction.text[start:end], "labels": [label]}}
        if score is not None:
            item["score"] = round(score, 6)
        result.append(item)
    for head, tail, label, score in prediction.relations:
        item = {"from_id": head, "to_id": tail, "type": "relation", "direction": "right", "labels": [label]}
        if score is not None:
            item["score"] = round(score, 6)
        result.append(item)
    if prediction.choices is not None:
        item = {"from_name": names["choices"], "to_name": names["to_name"], "type": "choices",
                "value": {"choices": list(prediction.choices)}}
        if prediction.score is not None:
            item["score"] = round(prediction.score, 6)
        result.append(item)
    predicted = {"model_version": model_version, "result": result}
    if prediction.score is not None:
        predicted["score"] = round(prediction.score, 6)
    return {"data": data, "predictions": [predicted]}


def doccano_record(prediction: Prediction) -> dict:
    """A doccano JSONL record to import: sequence labelling {"text", "label": [[s, e, type]]}; with relations the
    relation layout {"text", "entities", "relations"}; text classification {"text", "label": [...]}."""
    record = {**prediction.extra, "text": prediction.text}
    if prediction.relations or prediction.relation_layout:
        numbers = {span_id: number for number, (span_id, *_rest) in enumerate(prediction.spans, start=1)}
        record["entities"] = [{"id": numbers[span_id], "start_offset": start, "end_offset": end, "label": label}
                              for span_id, start, end, label, _ in prediction.spans]
        record["relations"] = [{"id": number, "from_id": numbers[head], "to_id": numbers[tail], "type": label}
                               for number, (head, tail, label, _) in enumerate(prediction.relations, start=1)]
    elif prediction.choices is not None:
        record["label"] = list(prediction.choices)
    else:
        record["label"] = [[start, end, label] for _, start, end, label, _ in prediction.spans]
    return record


def tool_output(predictions: Iterable[Prediction], output_format: str, model_version: str) -> list[str]:
    """The lines of the file to import: Label Studio takes one JSON array of tasks, doccano JSON Lines."""
    if output_format == "label-studio":
        tasks = [json.dumps(label_studio_task(prediction, model_version), ensure_ascii=False)
                 for prediction in predictions]
        return ["["] + [task + ("," if number < len(tasks) else "") for number, task in enumerate(tasks, start=1)] + ["]"]
    return [json.dumps(doccano_record(prediction), ensure_ascii=False) for prediction in predictions]
