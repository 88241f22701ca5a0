"""Relation classification: SemEval-2010 Task 8 / JSONL span input, entity-marker tokens, official SemEval scoring.

The two entities are marked in the text with `<e1>…</e1>` (the head) and `<e2>…</e2>` (the tail). The markers are
added to the tokenizer as special tokens (never split; kept by save_pretrained), so each is one token whose position
the entity-pair head reads (`e1_start`, `e2_start`, `e1_end`, `e2_end`). Sentences longer than --max_seq_length keep a
window around the two entities instead of losing a marker.

Scoring: on SemEval-2010 Task 8's labels, its official macro-F1 (directed, Other excluded, averaged over the relation
types present in gold). On any other label set, the macro-F1 over the user's relation types, the negative label
(--negative_label: Other, no_relation, NA or none found in the training labels, or given) excluded, with the micro-F1
and the per-type scores beside it (`bert_ft.metrics.relation_f1`).
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from bert_ft.annotation import (AnnotationOptions, Prediction, ToolRecord, ToolReport, detect_tool, joint_layout,
                                read_tool_records, tool_prediction, tool_summary)
from bert_ft.config import flag
from bert_ft.data import check_text_file, iter_text_lines, looks_like_jsonl, read_jsonl_records, special_tokens_around
from bert_ft.errors import DataError, UsageError
from bert_ft.heads import ClassifierHead, encoder_inputs, example_positions, example_tokens
from bert_ft.metrics import (confusion_matrix, format_confusion, format_table, relation_f1, relation_type,
                            semeval_official_score)
from bert_ft.task import ClassificationTask, Features, label_typer, sample_path

from .joint import JointRecord, candidate_pairs, is_joint, joint_record
from .ner import entity_list_spans

POOLINGS = ("entity_start", "entity_mean", "cls")
MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")
MARKER_PATTERN = re.compile(r"</?e[12]>")
OTHER = "Other"
NEGATIVE_LABELS = (OTHER, "no_relation", "NA", "none")  # what --negative_label auto looks for
SEMEVAL_TYPES = ("Cause-Effect", "Component-Whole", "Content-Container", "Entity-Destination", "Entity-Origin",
                 "Instrument-Agency", "Member-Collection", "Message-Topic", "Product-Producer")
SEMEVAL_LABELS = frozenset([OTHER] + [f"{name}({order})" for name in SEMEVAL_TYPES for order in ("e1,e2", "e2,e1")])
DIRECTED = re.compile(r"^(.+)\((e1,e2|e2,e1)\)$")
_FORMAT_FIX = ('SemEval format: 4 lines per record: ID<TAB>"sentence with <e1>..</e1> and <e2>..</e2>", the label '
               "(e.g. Cause-Effect(e2,e1) or Other), 'Comment:' (optional), a blank line")
_MARKER_FIX = ("mark each entity exactly once, not nested or overlapping, e.g. "
               '"The <e1>juice</e1> came from the <e2>oranges</e2>."')


@dataclass
class RelationOptions(AnnotationOptions):
    pooling: str = flag("entity_start", "entity-pair representation: hidden states at <e1> and <e2> "
                        "(entity_start), [CLS] + mean of each entity (entity_mean), or [CLS] alone (cls)",
                        choices=POOLINGS)
    negative_label: str = flag("auto", "the label meaning 'no relation', left out of the scores: auto = whichever of "
                               f"{', '.join(NEGATIVE_LABELS)} the training labels hold; none = every label is a "
                               "relation; or a training label. Joint files (entities + relations): the label of "
                               "the entity pairs without a relation (auto: no_relation; none: such pairs are left "
                               "out)")
    max_negatives_per_record: int | None = flag(None, "joint files: keep at most N of each record's entity pairs "
                                                "without a relation (a seeded sample; default: all), so that "
                                                "texts dense with entities do not drown the relations")
    text_column: str | None = flag(None, "Label Studio exports: the data key that holds the text (default: the "
                                         "task data's only text, else the key the labels point at, else 'text')")

    def problems(self, config) -> list[str]:
        if self.max_negatives_per_record is not None and self.max_negatives_per_record < 0:
            return [f"--max_negatives_per_record: must be >= 0, got {self.max_negatives_per_record}"]
        return []


def resolve_negative_label(option: str, labels: list[str] | set[str]) -> str | None:
    """The negative label that --negative_label `option` means for these training labels (None: no negative
    class). Raises UsageError where auto finds two candidates or a given label is not among the labels."""
    if option == "auto":
        found = [label for label in NEGATIVE_LABELS if label in labels]
        if len(found) > 1:
            raise UsageError(f"--negative_label auto: the training labels hold both {found[0]!r} and {found[1]!r}; "
                             f"say which one means 'no relation': --negative_label {found[0]} (or none: every "
                             "label is a relation)")
        return found[0] if found else None
    if option == "none":
        return None
    if option not in labels:
        raise UsageError(f"--negative_label {option}: not a training label (labels: {', '.join(sorted(labels))}); "
                         "give one of them, auto or none")
    return option


def is_semeval(labels: list[str] | set[str], negative: str | None) -> bool:
    """Whether the labels are SemEval-2010 Task 8's (so its official scorer and headline apply)."""
    return negative == OTHER and set(labels) <= SEMEVAL_LABELS


@dataclass
class RelationExample:
    id: str
    text: str  # the marked text the model reads: exactly one <e1>..</e1> and one <e2>..</e2>
    label: str | None  # None for unlabelled inputs (predict)
    path: str  # the file, for messages
    line: int  # line of the record (SemEval: its ID line; JSONL: its line)
    raw: dict | None = None  # the predict input it came from (its text, id and spans are echoed in the result)
    # Joint input (entities + relations): the entity types of the head and the tail, recorded in the model folder
    # (which type pairs the model saw) so that extraction can skip pairs it never saw.
    head_type: str | None = None
    tail_type: str | None = None


# --------------------------------------------------------------------------------------------- markers

def _excerpt(text: str, limit: int = 90) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def check_markers(text: str, path: str, line: int | None) -> dict[str, int]:
    """Character offset of each marker; DataError for missing, duplicated, unclosed, empty, nested or crossing ones."""
    found: dict[str, list[int]] = {marker: [] for marker in MARKERS}
    for match in MARKER_PATTERN.finditer(text):
        found[match.group()].append(match.start())
    where = f"in {_excerpt(text)}"
    for marker in MARKERS:
        if len(found[marker]) > 1:
            raise DataError(path, line, f"duplicated entity marker {marker} ({len(found[marker])} times) {where}",
                            _MARKER_FIX)
    for entity in ("e1", "e2"):
        opening, closing = found[f"<{entity}>"], found[f"</{entity}>"]
        if opening and not closing:
            raise DataError(path, line, f"unclosed entity marker <{entity}> (no </{entity}>) {where}", _MARKER_FIX)
        if closing and not opening:
            raise DataError(path, line, f"</{entity}> without <{entity}> {where}", _MARKER_FIX)
        if not opening:
            raise DataError(path, line, f"missing entity marker <{entity}>..</{entity}> {where}",
                            _MARKER_FIX + " (markers are lower case)")
        if closing[0] < opening[0]:
            raise DataError(path, line, f"</{entity}> comes before <{entity}> {where}", _MARKER_FIX)
        if not text[opening[0] + len(entity) + 2:closing[0]].strip():
            raise DataError(path, line, f"empty entity <{entity}></{entity}> {where}", "mark at least one word")
    positions = {marker: found[marker][0] for marker in MARKERS}
    (first, first_end), (second, second_end) = sorted(
        [(positions["<e1>"], positions["</e1>"]), (positions["<e2>"], positions["</e2>"])])
    if second < first_end:
        outer, inner = ("e1", "e2") if first == positions["<e1>"] else ("e2", "e1")
        problem = (f"nested entity markers: <{inner}>..</{inner}> lies inside <{outer}>..</{outer}>"
                   if second_end < first_end else f"overlapping entity markers: <{inner}> opens before </{outer}>")
        raise DataError(path, line, f"{problem} {where}",
                        "the two entities must not overlap: close the first one before the second opens")
    return positions


def mark_spans(text: str, head: tuple[int, int], tail: tuple[int, int]) -> str:
    """Insert <e1>..</e1> around the head and <e2>..</e2> around the tail (character spans, end exclusive)."""
    inserts = [(head[0], 1, "<e1>"), (head[1], 0, "</e1>"), (tail[0], 1, "<e2>"), (tail[1], 0, "</e2>")]
    parts, previous = [], 0
    for position, _, marker in sorted(inserts):  # at one offset a closing marker goes first: "</e1><e2>"
        parts.append(text[previous:position])
        parts.append(marker)
        previous = position
    parts.append(text[previous:])
    return "".join(parts)


def unmark(text: str, path: str = "input", line: int | None = None) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """The inverse of `mark_spans`: (text without the four markers, head span, tail span), character spans of the
    plain text, end exclusive. The markers are checked first (`check_markers`)."""
    check_markers(text, path, line)
    plain, spans, open_at, previous = [], {}, {}, 0
    length = 0
    for match in MARKER_PATTERN.finditer(text):
        piece = text[previous:match.start()]
        plain.append(piece)
        length += len(piece)
        marker = match.group()
        if marker.startswith("</"):
            spans[marker[2:4]] = (open_at[marker[2:4]], length)
        else:
            open_at[marker[1:3]] = length
        previous = match.end()
    plain.append(text[previous:])
    return "".join(plain), spans["e1"], spans["e2"]


def _span(record: dict, key: str, text: str, path: str, line: int) -> tuple[int, int]:
    span = record[key]
    if not (isinstance(span, (list, tuple)) and len(span) == 2
            and all(isinstance(value, int) and not isinstance(value, bool) for value in span)):
        raise DataError(path, line, f"'{key}' must be [start, end] (two integers), got {span!r}",
                        "character offsets into 'text', 0-based, end exclusive")
    start, end = span
    if not 0 <= start < end <= len(text):
        raise DataError(path, line, f"'{key}' span [{start}, {end}] lies outside the text ({len(text)} characters) "
                        "or is empty", "character offsets into 'text', 0-based, end exclusive: text[start:end]")
    if not text[start:end].strip():
        raise DataError(path, line, f"'{key}' span [{start}, {end}] covers only whitespace "
                        f"({text[start:end]!r})", "character offsets into 'text', 0-based, end exclusive")
    return start, end


def example_from_record(record: dict, path: str, line: int, need_label: bool = True) -> RelationExample:
    """A JSON object: {"id"?, "text", "head": [s, e], "tail": [s, e], "label"} or {"text" with markers, "label"}."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, line, "'text' must be a non-empty string",
                        '{"text": "...", "head": [start, end], "tail": [start, end], "label": "..."}')
    label = record.get("label")
    if need_label:
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(path, line, "missing label ('label' is absent or empty)",
                            'give every training/test record a "label", e.g. "Cause-Effect(e1,e2)" or "Other"')
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(path, line, f"'label' must be a string, got {label!r}")
        label = str(label).strip()
    has_spans = [key for key in ("head", "tail") if key in record]
    if len(has_spans) == 1:
        missing = "tail" if has_spans == ["head"] else "head"
        raise DataError(path, line, f"'{has_spans[0]}' is given but '{missing}' is missing",
                        "give both 'head' and 'tail' spans, or neither (then mark the text with <e1>/<e2>)")
    if has_spans:
        if MARKER_PATTERN.search(text):
            raise DataError(path, line, f"the text already contains entity markers and also has head/tail spans "
                            f"{_excerpt(text)}", "give either spans or markers, not both")
        head, tail = _span(record, "head", text, path, line), _span(record, "tail", text, path, line)
        if max(head[0], tail[0]) < min(head[1], tail[1]):
            raise DataError(path, line, f"head {list(head)} ({text[head[0]:head[1]]!r}) and tail {list(tail)} "
                            f"({text[tail[0]:tail[1]]!r}) overlap", "the two entity spans must be disjoint "
                            "(end offsets are exclusive)")
        text = mark_spans(text, head, tail)
    check_markers(text, path, line)
    record_id = record.get("id", line)
    return RelationExample(str(record_id), text, label if need_label else None, path, line)


# ----------------------------------------------------------------------------------------------- readers

def _unquote(sentence: str) -> str:
    sentence = sentence.strip()
    if len(sentence) >= 2 and sentence[0] == sentence[-1] == '"':
        return sentence[1:-1]
    return sentence


_RECORD_START = re.compile(r"^\s*(\S+)\t(.*\S)\s*$")
_RECORD_START_SPACES = re.compile(r'^\s*(\S+)\s+(".*")\s*$')


def _record_start(line: str) -> tuple[str, str] | None:
    match = _RECORD_START.match(line) or _RECORD_START_SPACES.match(line)
    return (match.group(1), _unquote(match.group(2))) if match else None


def read_semeval(path: str, lines: Iterable[str]) -> Iterator[RelationExample]:
    """The SemEval-2010 Task 8 release layout (TRAIN_FILE.TXT, TEST_FILE_FULL.TXT), streamed: a record is its
    start line, a label line, an optional Comment line and a blank line."""
    window = _Lookahead(lines)
    while window.get(0) is not None:
        if not window.get(0).strip():
            window.advance(1)
            continue
        number = window.number
        start = _record_start(window.get(0))
        if start is None:
            raise DataError(path, number, f"record structure broken: expected a record start "
                            f"'ID<TAB>\"sentence\"', got {_excerpt(window.get(0))}", _FORMAT_FIX)
        record_id, sentence = start
        check_markers(sentence, path, number)
        raw_label = window.get(1)
        label_line = raw_label.strip() if raw_label is not None else ""
        if (not label_line or label_line.lower().startswith("comment")
                or _record_start(raw_label)):  # a label never holds a tab or a quoted sentence
            what = "the file ends" if raw_label is None else f"line {number + 1} is {_excerpt(label_line)}"
            raise DataError(path, number, f"missing label: record {record_id} has no label line ({what})",
                            _FORMAT_FIX + "; unlabelled text goes to `run_task.py predict`")
        if MARKER_PATTERN.search(label_line):
            raise DataError(path, number + 1, f"record structure broken: expected the label of record "
                            f"{record_id} (line {number}), got {_excerpt(label_line)}", _FORMAT_FIX)
        after = 2
        if window.get(after) is not None and window.get(after).strip().lower().startswith("comment"):
            after += 1
        if window.get(after) is not None and window.get(after).strip():
            raise DataError(path, number + after, f"record structure broken: expected a blank line ending record "
                            f"{record_id} (line {number}), got {_excerpt(window.get(after))}", _FORMAT_FIX)
        yield RelationExample(record_id, sentence, label_line, path, number)
        window.advance(after)


class _Lookahead:
    """A line iterator that can look a few lines ahead: `get(k)` is the line k after the current one (None past
    the end), `number` the current line's 1-based number."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines, self.buffer, self.number = iter(lines), [], 1

    def get(self, ahead: int) -> str | None:
        while len(self.buffer) <= ahead:
            line = next(self.lines, None)
            if line is None:
                return None
            self.buffer.append(line)
        return self.buffer[ahead]

    def advance(self, count: int) -> None:
        self.get(count - 1)
        del self.buffer[:count]
        self.number += count


JOINT_NEGATIVE = "no_relation"  # the label of unrelated entity pairs of joint files under --negative_label auto


def joint_negative_label(option: str) -> str | None:
    """The label that entity pairs without a relation get in joint files under --negative_label `option` (None:
    they are left out)."""
    return {"auto": JOINT_NEGATIVE, "none": None}.get(option, option)


def joint_examples(record: JointRecord, negative_label: str | None, max_negatives: int | None = None,
                   seed: int = 0) -> list[RelationExample]:
    """The marked relation examples of a validated joint record (`bert_ft_tasks.joint.candidate_pairs`): one per
    ordered entity pair, `<e1>` around the head and `<e2>` around the tail, labelled with the pair's relation or
    `negative_label`; each carries the entity types of its head and tail."""
    examples = []
    for head, tail, label in candidate_pairs(record, negative_label, max_negatives, seed):
        first, second = record.entities[head], record.entities[tail]
        text = mark_spans(record.text, (first.start, first.end), (second.start, second.end))
        examples.append(RelationExample(f"{record.id}:{first.id or head}->{second.id or tail}", text, label,
                                        record.path, record.line, head_type=first.type, tail_type=second.type))
    return examples


def read_joint(record: dict, path: str, line: int) -> JointRecord:
    """A joint JSON object validated: its spans through the one entities reader, then its ids and relations."""
    if not isinstance(record.get("text"), str) or not record["text"].strip():
        raise DataError(path, line, "'text' must be a non-empty string", "a joint record is {\"text\", "
                        "\"entities\", \"relations\"}")
    return joint_record(record, entity_list_spans(record, path, line), path, line)


def read_jsonl(path: str, lines: Iterable[str], negative_label: str | None = JOINT_NEGATIVE,
               max_negatives: int | None = None) -> Iterator[RelationExample]:
    """One-pair records (head/tail spans or marked text), or joint records (an `entities` list with ids and
    `relations` naming them): every ordered pair of a joint record's entities becomes an example."""
    for number, record in read_jsonl_records(path, lines):
        if is_joint(record):
            yield from joint_examples(read_joint(record, path, number), negative_label, max_negatives)
        else:
            yield example_from_record(record, path, number)


def read_tool(path: str, tool: str, options: RelationOptions) -> Iterator[RelationExample]:
    """Relation examples from a Label Studio or doccano relation export: each record becomes a joint record
    (`bert_ft.annotation.joint_layout`), read and validated as joint JSONL is, then every ordered entity pair an
    example (`joint_examples`: the relation's label, else the negative label)."""
    report = ToolReport(tool, annotation=options.annotation)
    negative = joint_negative_label(options.negative_label)
    for record in read_tool_records(path, tool, options.annotation, options.text_column, report=report):
        joint = read_joint(joint_layout(record), path, record.line or 0)
        yield from joint_examples(joint, negative, options.max_negatives_per_record)
    for line in report.lines():
        print(f"{path}: {line}")


def _record_pairs(record: ToolRecord, number: int) -> tuple[JointRecord, list[tuple[int, int, str]], list[dict]]:
    """An export record for predict: its joint record, every ordered pair of its entities (`candidate_pairs`), and
    each pair as a predict input {"id": "TASK:HEAD->TAIL", "text", "head", "tail"}."""
    joint = read_joint(joint_layout(record), "input", record.line or number)
    pairs = candidate_pairs(joint, "")
    items = [{"id": f"{record.task_id}:{joint.entities[head].id}->{joint.entities[tail].id}", "text": record.text,
              "head": [joint.entities[head].start, joint.entities[head].end],
              "tail": [joint.entities[tail].start, joint.entities[tail].end]} for head, tail, _ in pairs]
    return joint, pairs, items


# ------------------------------------------------------------------------------------------ long inputs

def choose_tokens(length: int, markers: list[int], budget: int) -> tuple[list[int], str]:
    """Which content-token positions to keep (ascending) when `length` tokens must fit in `budget`.

    `markers` are the positions of <e1>, </e1>, <e2>, </e2>. Returns (positions, kind) with kind
      "full"      everything fits;
      "truncated" the tail is cut, all four markers lie before it;
      "window"    a window of `budget` tokens covering all four markers, centred between the two entities;
      "split"     the entities are too far apart for one window: each entity is kept whole with its markers, and
                  the context around each fills the rest (the text between them is cut);
      "split_cut" not even the two entities fit: each keeps its markers and the first tokens of its text that fit.
    No kind ever loses a marker.
    """
    if budget < 4:
        raise UsageError(f"--max_seq_length leaves room for {budget} tokens; the 4 entity markers need at least 4")
    if length <= budget:
        return list(range(length)), "full"
    low, high = min(markers), max(markers)
    if high < budget:
        return list(range(budget)), "truncated"
    if high - low + 1 <= budget:
        lowest, highest = max(0, high - budget + 1), min(low, length - budget)
        start = min(max(round((low + high) / 2 - (budget - 1) / 2), lowest), highest)
        return list(range(start, start + budget)), "window"
    e1_start, e1_end, e2_start, e2_end = markers
    (first_start, first_end), (second_start, second_end) = sorted([(e1_start, e1_end), (e2_start, e2_end)])
    sizes = [first_end - first_start - 1, second_end - second_start - 1]  # entity text tokens, markers excluded
    room = budget - 4
    kind = "split"
    if sum(sizes) > room:  # share the room fairly; a short entity leaves its unused share to the other
        kind = "split_cut"
        first_size = min(sizes[0], max(room // 2, room - sizes[1]))
        sizes = [first_size, min(sizes[1], room - first_size)]
    keep = set(markers)
    keep.update(range(first_start + 1, first_start + 1 + sizes[0]))
    keep.update(range(second_start + 1, second_start + 1 + sizes[1]))
    # Context, one token at a time round the four frontiers: before/after the first and the second entity.
    frontiers = [[first_start - 1, -1, 0], [first_end + 1, 1, second_start - 1],
                 [second_start - 1, -1, first_end + 1], [second_end + 1, 1, length - 1]]
    while len(keep) < budget and frontiers:
        for frontier in list(frontiers):
            position, step, limit = frontier
            if len(keep) >= budget:
                break
            if (position - limit) * step > 0 or position in keep:
                frontiers.remove(frontier)
                continue
            keep.add(position)
            frontier[0] += step
    return sorted(keep), kind


LONG_KINDS = {
    "truncated": "text after the entities cut (all markers kept)",
    "window": "window around both entities (all markers kept)",
    "split": "entities too far apart: each kept whole with its context, text between them cut",
    "split_cut": "not even both entities fit: each kept with its markers and as much of its text as fits",
}


# ----------------------------------------------------------------------------------------------- the head

class EntityPairClassifier(ClassifierHead):
    """Relation classification over a marked entity pair.

    pooling "entity_start": hidden states at the two start markers, concatenated ("matching the blanks");
    "entity_mean": [CLS] + mean of each entity's tokens (R-BERT); "cls": the [CLS] state alone.
    The batch gives `e1_start`, `e2_start` (marker positions) and `e1_end`, `e2_end` (end-marker positions), each
    relative to the example's first token; the head adds the example's offset in its row.
    """

    model_kwargs = {"add_pooling_layer": False}
    extra_modules = ("norm", "classifier")

    def __init__(self, model: nn.Module, labels: list[str], pooling: str = "entity_start", dropout: float = 0.1) -> None:
        if pooling not in POOLINGS:
            raise UsageError(f"--pooling: must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__(model, labels, pooling=pooling)
        self.pooling = pooling
        hidden = model.config.hidden_size
        parts = {"entity_start": 2, "entity_mean": 3, "cls": 1}[pooling]
        self.norm = nn.LayerNorm(parts * hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(parts * hidden, len(labels))

    def scores(self, batch: dict) -> torch.Tensor:
        """Class logits (examples, num_labels): what an exported graph computes."""
        hidden = self.model(**encoder_inputs(batch, self.model)).last_hidden_state  # (rows, seq, hidden)
        first = hidden[example_positions(batch)]  # (examples, hidden): each example's [CLS]
        if self.pooling == "entity_start":
            pooled = torch.cat([hidden[example_positions(batch, batch["e1_start"])],
                                hidden[example_positions(batch, batch["e2_start"])]], dim=-1)
        elif self.pooling == "cls":
            pooled = first
        else:
            tokens, _ = example_tokens(hidden, batch)  # (examples, longest, hidden)
            positions = torch.arange(tokens.size(1), device=hidden.device)  # (longest,)
            means = [first]
            for start, end in (("e1_start", "e1_end"), ("e2_start", "e2_end")):
                # Tokens strictly between the start and end markers: (examples, longest) float mask.
                inside = ((positions > batch[start][:, None]) & (positions < batch[end][:, None])).to(tokens.dtype)
                means.append((tokens * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp(min=1))
            pooled = torch.cat(means, dim=-1)
        return self.classifier(self.dropout(self.norm(pooled)))  # (examples, num_labels)



# ----------------------------------------------------------------------------------------------- the task

def _short_names(labels: list[str]) -> list[str]:
    """The Perl scorer's column names (Cause-Effect(e1,e2) -> C-E1, Other -> _O_), or the labels if they clash."""
    names = []
    for label in labels:
        match = re.match(r"^(\w)[^-(]*-(\w)[^(]*\(e([12]),e[12]\)$", label)
        names.append("_O_" if label == OTHER else f"{match.group(1)}-{match.group(2)}{match.group(3)}" if match
                     else label)
    return names if len(set(names)) == len(names) else list(labels)


class RelationTask(ClassificationTask):
    name = "relation"
    description = ("relation classification between <e1>/<e2>-marked entities (SemEval-2010 Task 8 format or JSONL "
                   "spans); official SemEval macro-F1 on SemEval labels, else macro-F1 without the negative label")
    options_type = RelationOptions
    metric = "macro_f1"
    predictions_file = "test_predictions.jsonl"

    head_type = EntityPairClassifier
    # No shipped dev file: the core keeps the last epoch, or --validation_split carves a seeded dev set.
    samples = {"train": sample_path(__file__, "relation_train.txt"), "test": sample_path(__file__, "relation_test.txt")}

    def stream(self, path: str) -> Iterator[RelationExample]:
        check_text_file(path)  # encoding problems anywhere in the file are reported before parse errors
        tool = detect_tool(path)  # a Label Studio or doccano export
        if tool is not None:
            examples = read_tool(path, tool, self.options)
        elif looks_like_jsonl(iter_text_lines(path)):
            examples = read_jsonl(path, iter_text_lines(path), joint_negative_label(self.options.negative_label),
                                  self.options.max_negatives_per_record)
        else:
            examples = read_semeval(path, iter_text_lines(path))
        count = 0
        for example in examples:
            count += 1
            yield example
        if not count:
            raise DataError(path, None, "no examples found", _FORMAT_FIX)

    def problems(self, config) -> list[str]:
        return self.options.problems(config)

    def model_meta(self, train_examples, labels: list[str]) -> dict:
        """Joint training data: the entity types the model saw, and each (head type, tail type) pair with how many
        training pairs of that kind carried a relation (the negative label excluded) and how many did not;
        `extract` skips candidate pairs of a type pair that never carried a relation."""
        negative = resolve_negative_label(self.options.negative_label, labels)
        types, pairs = set(), Counter()
        for example in train_examples:
            if example.head_type is None:
                continue
            types.update((example.head_type, example.tail_type))
            pairs[example.head_type, example.tail_type, example.label != negative] += 1
        if not types:
            return {}
        seen = sorted({(head, tail) for head, tail, _ in pairs})
        return {"entity_types": sorted(types), "negative_label": negative,
                "type_pairs": [{"head": head, "tail": tail, "relations": pairs[head, tail, True],
                                "negatives": pairs[head, tail, False]} for head, tail in seen]}

    def from_hub(self, dataset, split: str) -> list[RelationExample]:
        """The Hub `sem_eval_2010_task_8` layout: columns `sentence` (marked) and `relation` (class ids)."""
        columns = set(dataset.column_names)
        if not {"sentence", "relation"} <= columns:
            raise DataError(split, None, f"expected columns 'sentence' and 'relation', found {sorted(columns)}",
                            "use the sem_eval_2010_task_8 dataset, or convert the data to a file (README formats)")
        feature = dataset.features["relation"]
        names = getattr(feature, "names", None)
        examples = []
        for index, row in enumerate(dataset):
            label = row["relation"]
            if isinstance(label, int) and names:
                if not 0 <= label < len(names):
                    raise DataError(f"{split} split", index + 1, f"missing label (class id {label})")
                label = names[label]
            record = {"id": index + 1, "text": _unquote(str(row["sentence"])), "label": label}
            examples.append(example_from_record(record, f"{split} split", index + 1))
        return examples

    def build_labels(self, train_examples: list[RelationExample], declared: list[str] | None = None) -> list[str]:
        """Sorted labels, the negative label (--negative_label) last. A directed label brings its mirror (X(e1,e2)
        -> X(e2,e1)): a small training slice may lack a rare direction (Entity-Destination(e2,e1) occurs once in
        SemEval train)."""
        labels = {example.label for example in train_examples}
        negative = resolve_negative_label(self.options.negative_label, labels)
        for label in list(labels):
            match = DIRECTED.match(label)
            if match:
                labels.add(f"{match.group(1)}({'e2,e1' if match.group(2) == 'e1,e2' else 'e1,e2'})")
        return sorted(labels, key=lambda label: (label == negative, label))

    def prepare_tokenizer(self, tokenizer) -> None:
        """The four markers become special tokens: never split, never lower-cased, saved with the tokenizer."""
        try:  # transformers 5
            tokenizer.add_special_tokens({"extra_special_tokens": list(MARKERS)}, replace_extra_special_tokens=False)
        except TypeError:  # transformers 4
            tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)},
                                         replace_additional_special_tokens=False)

    def head_options(self) -> dict:
        return {"pooling": self.options.pooling}

    def data_notes(self, split, examples, features, tokenizer) -> list[str]:
        kinds = Counter(features.meta)
        notes = []
        if split == "train":
            labels = {example.label for example in examples}
            negative = resolve_negative_label(self.options.negative_label, labels)
            scored = ("the official SemEval-2010 Task 8 macro-F1" if is_semeval(labels, negative) else
                      f"macro-F1 over the {len(labels - {negative})} other labels")
            notes.append(f"negative label (--negative_label {self.options.negative_label}): "
                         f"{negative if negative else 'none, every label is a relation'}; scored by {scored}")
        notes += [f"{path}: {line}" for path in dict.fromkeys(example.path for example in examples)
                  for line in tool_summary(path, annotation=self.options.annotation, text_key=self.options.text_column)]
        return notes + [f"sentences over --max_seq_length: "
                        f"{sum(count for kind, count in kinds.items() if kind != 'full')}"] \
            + [f"  {kinds[kind]:>5}  {text}" for kind, text in LONG_KINDS.items()]

    # ---------------------------------------------------------------------------------------- features
    @staticmethod
    def marker_ids(tokenizer) -> list[int]:
        ids = []
        for marker in MARKERS:
            pieces = tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
                raise UsageError(f"the tokenizer splits the entity marker {marker} into {len(pieces)} tokens; "
                                 "RelationTask.prepare_tokenizer must run first (a bert-ft relation model folder "
                                 "already has them)")
            ids.append(pieces[0])
        return ids

    def encode(self, examples: list[RelationExample], tokenizer, max_seq_length: int, labels: list[str]) -> Features:
        """One feature per example; e*_start/e*_end are the positions of the marker tokens in input_ids."""
        label_ids = {label: index for index, label in enumerate(labels)}
        marker_ids = self.marker_ids(tokenizer)
        before, after = special_tokens_around(tokenizer)
        budget = max_seq_length - len(before) - len(after)
        with_types = "token_type_ids" in tokenizer.model_input_names
        encoded = tokenizer([example.text for example in examples], add_special_tokens=False)["input_ids"] \
            if examples else []
        inputs, kinds = [], []
        for example, content in zip(examples, encoded):
            positions = []
            for marker, marker_id in zip(MARKERS, marker_ids):
                found = [position for position, token in enumerate(content) if token == marker_id]
                if len(found) != 1:  # the text was checked for exactly one of each, so the tokenizer misbehaved
                    raise DataError(example.path, example.line, f"{marker} became {len(found)} tokens in "
                                    f"{_excerpt(example.text)}", "please report this with the sentence")
                positions.extend(found)
            kept, kind = choose_tokens(len(content), positions, budget)
            input_ids = before + [content[position] for position in kept] + after
            feature = {"input_ids": input_ids}
            for key, marker_id in zip(("e1_start", "e1_end", "e2_start", "e2_end"), marker_ids):
                feature[key] = input_ids.index(marker_id)
            if with_types:
                feature["token_type_ids"] = [0] * len(input_ids)
            if example.label is not None:
                feature["labels"] = label_ids[example.label]
            inputs.append(feature)
            kinds.append(kind)
        return Features(inputs, list(range(len(inputs))), [len(feature["input_ids"]) for feature in inputs], kinds)

    # ---------------------------------------------------------------------------------------- scoring
    def score_labels(self, gold, predicted, labels, source, features) -> tuple[dict, str]:
        negative = resolve_negative_label(self.options.negative_label, labels)
        official = is_semeval(labels, negative)
        directed = any(DIRECTED.match(label) for label in labels)
        score = semeval_official_score(gold, predicted, OTHER) if official else relation_f1(gold, predicted, negative)
        metrics = {"macro_f1": score["macro_f1"], "accuracy": score["accuracy"], "micro_f1": score["micro_f1"],
                   "micro_precision": score["micro_precision"], "micro_recall": score["micro_recall"]}
        types = len(score["per_type"])
        excluded = f"{negative} excluded" if negative else "no negative label"
        if official:
            headline = (f"official SemEval-2010 Task 8 score ((9+1)-way, directionality taken into account, "
                        f"macro-averaged over the {types} relation types in gold, {OTHER} excluded): macro-F1 = "
                        f"{score['macro_f1']:.4f}")
        else:
            headline = (f"relation score: macro-F1 over the {types} relation types in gold or predicted "
                        f"({excluded}{'; a hit needs the right direction' if directed else ''}) = "
                        f"{score['macro_f1']:.4f}")
        accuracy = f"accuracy (exact label{f', {negative} included' if negative else ''}) = {score['accuracy']:.4f}"
        columns = ["relation", "P", "R", "F1", "support"]
        rows = [[name, values["precision"], values["recall"], values["f1"], values["support"]]
                for name, values in score["per_type"].items()]
        rows.append(["micro (types above)", score["micro_precision"], score["micro_recall"], score["micro_f1"],
                     sum(values["support"] for values in score["per_type"].values())])
        if directed:
            wrong_direction = Counter(relation_type(g) for g, p in zip(gold, predicted)
                                      if g != p and relation_type(g) == relation_type(p) and g != negative)
            for row in rows[:-1]:
                row.append(wrong_direction[row[0]])
            rows[-1].append(sum(wrong_direction.values()))
            columns.append("wrong dir")
        matrix = confusion_matrix(gold, predicted, labels)
        short = _short_names(labels) if official else list(labels)
        legend = ", ".join(f"{name} = {label}" for name, label in zip(short, labels) if name != label)
        kinds = Counter(features.meta)
        long_total = sum(count for kind, count in kinds.items() if kind != "full")
        long_lines = [f"long sentences (over the max_seq_length): {long_total} of {len(features)}"]
        long_lines += [f"  {kinds[kind]:>5}  {text}" for kind, text in LONG_KINDS.items()]
        per_type_title = ("per relation type (a hit needs the right direction; 'wrong dir' = right type, wrong "
                          "direction):" if directed else "per relation type:")
        report = "\n".join([
            headline,
            f"{accuracy}; micro-F1 ({excluded}) = {score['micro_f1']:.4f}",
            "",
            per_type_title,
            format_table(rows, columns),
            "",
            "confusion matrix (rows gold, columns predicted)" + (":" if not legend else ";"),
            *(textwrap.wrap(legend, 116, initial_indent="  ", subsequent_indent="  ") if legend else []),
            format_confusion(matrix, short),
            "",
            *long_lines,
        ])
        return metrics, report

    # ---------------------------------------------------------------------------------------- raw text
    def input_examples(self, inputs: list) -> list[RelationExample]:
        """Strings with <e1>..</e1> <e2>..</e2>, or {"text", "head": [s, e], "tail": [s, e]} (or a marked "text")."""
        examples = []
        for number, item in enumerate(inputs, start=1):
            record = {"text": item} if isinstance(item, str) else item
            if not isinstance(record, dict):
                raise DataError("input", number, f"expected a marked string or a JSON object, got {item!r}")
            example = example_from_record(record, "input", number, need_label=False)
            example.raw = record
            examples.append(example)
        return examples

    def tool_inputs(self, inputs: list) -> list:
        """An export's records as marked pairs: every ordered pair of each record's entities (`candidate_pairs`),
        with the id "TASK:HEAD->TAIL" (entity ids of the export)."""
        return [pair for number, item in enumerate(inputs, start=1)
                for pair in (_record_pairs(item, number)[2] if isinstance(item, ToolRecord) else [item])]

    def pre_annotations(self, inputs: list, predict) -> list[Prediction]:
        """Label Studio / doccano pre-annotations. An export's record: its entities are kept, every ordered pair of
        them (`candidate_pairs`) is classified, and the pairs predicted as a relation (not the negative label) are
        written with their probability as score (the record's score: the lowest of them). A raw input is one
        marked pair: its two spans (typed by the input's "head_type"/"tail_type", else "entity") and the relation
        unless it is the negative label."""
        groups = [_record_pairs(item, number) if isinstance(item, ToolRecord) else None
                  for number, item in enumerate(inputs, start=1)]
        items = [pair for item, group in zip(inputs, groups) for pair in (group[2] if group else [item])]
        results = iter(predict(items) if items else [])
        predictions = []
        for item, group in zip(inputs, groups):
            if group is None:
                result = next(results)
                record = {"text": item} if isinstance(item, str) else item
                if "head" in record and "tail" in record:
                    text, head, tail = record["text"], tuple(record["head"]), tuple(record["tail"])
                else:
                    text, head, tail = unmark(record["text"])  # valid: predict has just read it
                spans = [("head", head[0], head[1], str(record.get("head_type", "entity")), None),
                         ("tail", tail[0], tail[1], str(record.get("tail_type", "entity")), None)]
                relations = [("head", "tail", str(result["label"]), result["probability"])] \
                    if self._is_relation(result) else []
                predictions.append(tool_prediction(record, text, result["probability"], spans=spans,
                                                   relations=relations, relation_layout=True))
                continue
            joint, pairs, _ = group
            spans = [(entity.id, entity.start, entity.end, entity.type, None) for entity in joint.entities]
            relations = []
            for head, tail, _ in pairs:
                result = next(results)
                if self._is_relation(result):
                    relations.append((joint.entities[head].id, joint.entities[tail].id, str(result["label"]),
                                      result["probability"]))
            score = min((relation[3] for relation in relations), default=None)
            predictions.append(tool_prediction(item, item.text, score, spans=spans, relations=relations,
                                               relation_layout=True))
        return predictions

    def _is_relation(self, result: dict) -> bool:
        """Whether a predicted label is a relation (not the negative label of the model's labels)."""
        return str(result["label"]) != resolve_negative_label(self.options.negative_label, set(result["probabilities"]))

    def results(self, examples, features, outputs, labels) -> list[dict]:
        """Per input {"text", "label", "probability", "probabilities": {label: p}} (+ its id/head/tail)."""
        results, typed = [], label_typer(labels)
        for example, output in zip(examples, self.per_example(examples, features, outputs)):
            best = int(output["pred"])
            result = {"text": example.raw["text"], "label": typed(labels[best]),
                      "probability": round(float(output["probs"][best]), 6),
                      "probabilities": self.probabilities(output, labels)}
            result.update({key: example.raw[key] for key in ("id", "head", "tail") if key in example.raw})
            results.append(result)
        return results
