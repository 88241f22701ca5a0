"""Named-entity recognition: CoNLL / JSONL / CLUENER span input, sub-word alignment, windows, seqeval scoring."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2
import torch
from torch import nn
from transformers import AutoModelForTokenClassification

from bert_ft.annotation import (AnnotationOptions, Prediction, ToolRecord, ToolReport, detect_tool, read_tool_records,
                                tool_prediction, tool_summary)
from bert_ft.config import flag
from bert_ft.crf import CRF, iob2_transition_mask
from bert_ft.data import (best_window_per_word, check_text_file, iter_text_lines, looks_like_jsonl, read_jsonl_records,
                          special_tokens_around, word_windows)
from bert_ft.errors import DataError, UsageError
from bert_ft.families import prefix_space_for_words, word_prefix_ids
from bert_ft.heads import Head, encoder_inputs, example_tokens
from bert_ft.io import atomic_write_lines
from bert_ft.losses import sequence_weights, weighted_mean
from bert_ft.metrics import format_table
from bert_ft.spans import SpanError, SpanProblem, SpanTally, split_words, tag_spans
from bert_ft.task import Evaluation, Features, Task, sample_path
from bert_ft.verbosity import counted_warnings

from .joint import joint_record
SCHEMES = ("auto", "iob1", "iob2", "iobes")
FOCAL_WITH_CRF = ("--loss focal: not defined with --crf (the CRF's loss is the likelihood of the whole tag "
                  "sequence, not a probability per word to focus on); use --loss cross_entropy with --crf "
                  "(--class_weights works with both heads), or drop --crf")


@dataclass
class NerOptions(AnnotationOptions):
    crf: bool = flag(False, "add a CRF layer over the token logits (Viterbi decoding)")
    doc_stride: int = flag(32, "sub-word overlap of windows over long sentences (at most half a window)")
    tag_scheme: str = flag("auto", "tag scheme of the input files (auto-detected by default)", choices=SCHEMES)
    strict_tags: bool = flag(False, "refuse IOB2 files with I-X after O (default: repair them with a warning)")
    strict_spans: bool = flag(False, "refuse span records whose spans cut a word (default: widen them to whole "
                              "words with a counted warning)")
    context_size: int = flag(0, "document context (FLERT): up to N sub-words of the neighbouring sentences of the "
                             "same document on each side, unlabelled, within --max_seq_length (0 = off)")
    text_column: str | None = flag(None, "Label Studio exports: the data key that holds the text (default: the "
                                         "task data's only text, else the key the labels point at, else 'text')")

    def problems(self, config) -> list[str]:
        found = []
        if self.doc_stride < 0:
            found.append(f"--doc_stride: must be >= 0, got {self.doc_stride}")
        if self.crf and getattr(config, "loss", "cross_entropy") == "focal":
            found.append(FOCAL_WITH_CRF)
        if self.context_size < 0:
            found.append(f"--context_size: must be >= 0, got {self.context_size}")
        return found


@dataclass
class NerExample:
    words: list[str]
    tags: list[str]  # IOB2
    path: str  # the file, for messages
    line: int  # line of the sentence's first word (CoNLL) or of the JSON record
    text: str | None = None  # raw text (span-annotated input); words are then its `split_words`
    offsets: list[tuple[int, int]] | None = None  # character [start, end) of each word in `text`
    # Document context (--context_size): the document's ordinal in its file (None: no document, so no context) and
    # the words of the neighbouring sentences of that document nearest to this one, at most context_size per side
    # (each word gives at least one sub-word, so that many words always suffice). Never labelled or scored.
    document: int | None = None
    left_context: list[str] = field(default_factory=list)
    right_context: list[str] = field(default_factory=list)
    # Span input: each span that was repaired to fit one layer of word tags ("snapped: ...", "overlap: ..."), for
    # --check_data (`NerTask.data_notes`).
    span_notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- tag schemes

def _split_tag(tag: str, path: str, line: int) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, dash, entity_type = tag.partition("-")
    if not dash or prefix not in ("B", "I", "E", "S") or not entity_type:
        raise DataError(path, line, f"tag {tag!r} is not O or B-/I-/E-/S-TYPE",
                        "use IOB1, IOB2 or IOBES tags such as B-PER, I-PER, O")
    return prefix, entity_type


def detect_scheme(sentences: Iterable[list[str]]) -> str:
    """IOBES if E-/S- occur; IOB1 if most entities start with I- (B- only separates neighbours); else IOB2."""
    prefixes = Counter()
    starts_with_inside = 0
    for tags in sentences:
        previous = "O"
        for tag in tags:
            prefixes[tag[:1]] += 1
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                starts_with_inside += 1
            previous = tag
    if prefixes["E"] or prefixes["S"]:
        return "iobes"
    return "iob1" if starts_with_inside > prefixes["B"] else "iob2"


def to_iob2(tags: list[str], scheme: str) -> tuple[list[str], list[int]]:
    """IOB2 tags and the positions of entities that started with I- (repaired violations, for IOB2 input)."""
    result, repaired, previous = [], [], "O"
    for tag in tags:
        prefix, entity_type = tag[:1], tag[2:]
        if scheme == "iobes":
            new = {"S": "B", "E": "I"}.get(prefix, prefix) + tag[1:] if tag != "O" else "O"
        elif prefix == "I" and previous[2:] != entity_type:
            new = "B-" + entity_type  # an entity starting with I-: normal in IOB1, a violation in IOB2
            if scheme == "iob2":
                repaired.append(len(result))
        else:
            new = tag
        result.append(new)
        previous = tag if scheme != "iobes" else new
    return result, repaired


# -------------------------------------------------------------------------------------------------- readers

def read_conll(path: str, lines: Iterable[str]) -> Iterator[tuple[list[str], list[str], int, int | None]]:
    """(words, tags, first line, document) per sentence, streamed; token in the first column, tag in the last. Each
    `-DOCSTART-` line starts a new document (0, 1, ...); sentences before the first one have document None."""
    words, tags, first_line, document = [], [], 0, None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("-DOCSTART-"):
            if words:
                yield words, tags, first_line, document
                words, tags = [], []
            if stripped:
                document = 0 if document is None else document + 1
            continue
        columns = stripped.split()
        if len(columns) < 2:
            raise DataError(path, number, f"expected 'token ... tag' (2 or more columns), got {line!r}",
                            "separate the token and its tag with a space or tab; blank lines separate sentences")
        _split_tag(columns[-1], path, number)
        if not words:
            first_line = number
        words.append(columns[0])
        tags.append(columns[-1])
    if words:
        yield words, tags, first_line, document


_SPAN_LAYOUTS = ('use {"tokens", "tags"}; {"text", "entities": [{"start", "end", "label"}]} (character offsets, end '
                 'exclusive); or CLUENER {"text", "label": {type: {mention: [[start, end]]}}} (end inclusive); '
                 "unlabelled text goes to `run_task.py predict`")
_ENTITIES_FIX = ('write {"text": "...", "entities": [{"start": 0, "end": 5, "label": "PER"}, ...]}: 0-based '
                 "character offsets, end exclusive (text[start:end] is the entity)")


def _is_offset(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def entity_list_spans(record: dict, path: str, number: int) -> list[tuple[int, int, str]]:
    """The (start, end exclusive, label) spans of the `entities` layout: a list of objects with integer
    "start"/"end" and a "label" (or "type"); an optional "text" must equal text[start:end]; other keys (an "id")
    are left for the readers that use them."""
    text, entities = record["text"], record["entities"]
    if not isinstance(text, str):
        raise DataError(path, number, f"'text' must be a string, got {json.dumps(text)[:80]}", _ENTITIES_FIX)
    if not isinstance(entities, list):
        raise DataError(path, number, f"'entities' must be a list, got {json.dumps(entities)[:80]}", _ENTITIES_FIX)
    spans = []
    for position, entity in enumerate(entities, start=1):
        label = entity.get("label", entity.get("type")) if isinstance(entity, dict) else None
        if not (isinstance(entity, dict) and _is_offset(entity.get("start")) and _is_offset(entity.get("end"))
                and isinstance(label, str) and label.strip()):
            raise DataError(path, number, f"entity {position} {json.dumps(entity)[:80]} is not "
                            '{"start": int, "end": int, "label": "TYPE"} ("type" may replace "label")', _ENTITIES_FIX)
        start, end = entity["start"], entity["end"]
        if not 0 <= start < end <= len(text):
            raise DataError(path, number, f"entity {position} [{start}, {end}) lies outside the text "
                            f"({len(text)} characters) or is empty", _ENTITIES_FIX)
        if "text" in entity and entity["text"] != text[start:end]:
            raise DataError(path, number, f"entity {position} [{start}, {end}) covers {text[start:end]!r}, not its "
                            f"\"text\" {entity['text']!r}", _ENTITIES_FIX)
        spans.append((start, end, label.strip()))
    return spans


def cluener_spans(record: dict, path: str, number: int) -> list[tuple[int, int, str]]:
    """The spans of a CLUENER2020 record, as (start, end exclusive, type): CLUENER's own ends are inclusive."""
    text = record["text"]
    if not isinstance(text, str) or not isinstance(record["label"], dict):
        raise DataError(path, number, "'text' must be a string and 'label' an object {type: {mention: [[s, e]]}}",
                        _SPAN_LAYOUTS)
    spans = []
    for entity_type, mentions in record["label"].items():
        if not entity_type.strip() or not isinstance(mentions, dict):
            raise DataError(path, number, f"label {entity_type!r}: {json.dumps(mentions)[:80]} is not an entity "
                            "type mapped to {mention: [[start, end], ...]}",
                            'CLUENER labels look like {"name": {"叶老桂": [[9, 11]]}}')
        for mention, mention_spans in mentions.items():
            if not isinstance(mention_spans, list):
                raise DataError(path, number, f"the spans of {mention!r} are {json.dumps(mention_spans)[:80]}, "
                                "not a list of [start, end]", 'write {"mention": [[start, end], ...]}')
            for span in mention_spans:
                if not (isinstance(span, list) and len(span) == 2 and all(_is_offset(value) for value in span)):
                    raise DataError(path, number, f"span {span!r} of {mention!r} is not [start, end]",
                                    "two integers: 0-based character offsets with an inclusive end")
                start, end = span
                if not 0 <= start <= end < len(text):
                    raise DataError(path, number, f"span [{start}, {end}] of {mention!r} lies outside the text "
                                    f"({len(text)} characters)", "CLUENER spans are 0-based with inclusive ends")
                if text[start:end + 1] != mention:
                    raise DataError(path, number, f"span [{start}, {end}] covers {text[start:end + 1]!r}, "
                                    f"not the mention {mention!r}", "CLUENER spans are 0-based with inclusive ends")
                spans.append((start, end + 1, entity_type))
    return spans


def span_example(record: dict, path: str, number: int, document: int | None, strict_spans: bool
                 ) -> tuple[NerExample, list[SpanProblem]]:
    """A span-annotated record (the `entities` list or CLUENER's `label` map) -> words of its text (split_words)
    with IOB2 tags (`bert_ft.spans.tag_spans`); the problems that were repaired are kept in `span_notes`."""
    spans = entity_list_spans(record, path, number) if "entities" in record else cluener_spans(record, path, number)
    if "relations" in record:  # a joint file (entities + relations): its ids and relations must hold too
        joint_record(record, spans, path, number)
    try:
        tagged = tag_spans(record["text"], spans)
    except SpanError as error:
        raise DataError(path, number, str(error), _ENTITIES_FIX if "entities" in record else
                        "CLUENER spans are 0-based with inclusive ends") from None
    if strict_spans:
        for problem in tagged.problems:
            if problem.kind == "snapped":
                raise DataError(path, number, f"span {problem.label} {problem.text!r} [{problem.start}, "
                                f"{problem.end}) cuts a word (--strict_spans): its whole words are {problem.words!r}",
                                "move the span's ends to word boundaries (words as `run_task.py predict` splits "
                                "them: whitespace, each punctuation mark and each CJK character), or drop "
                                "--strict_spans to widen such spans to whole words with a counted warning")
    notes = [f"{problem.kind}: {problem.describe()}" for problem in tagged.problems]
    return NerExample(tagged.words, tagged.tags, path, number, record["text"], tagged.offsets, document,
                      span_notes=notes), tagged.problems


ONE_DOCUMENT = object()  # the doc_id of predict inputs that --input_is_document puts in one document


class DocumentGrouper:
    """Document ordinals from `doc_id` values in file order: consecutive records with the same doc_id are one
    document; a doc_id that comes back after another one starts a new document (documents are read as streams,
    one at a time, so a file must keep each document's sentences together and in order). No doc_id: None."""

    def __init__(self) -> None:
        self.previous, self.ordinal = None, -1

    def __call__(self, doc_id: object) -> int | None:
        if doc_id is None:
            self.previous = None
            return None
        if doc_id != self.previous:
            self.previous, self.ordinal = doc_id, self.ordinal + 1
        return self.ordinal


def _doc_id(record: dict, path: str, number: int) -> str | int | None:
    doc_id = record.get("doc_id")
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
        raise DataError(path, number, f"'doc_id' must be a string or an integer, got {json.dumps(doc_id)[:80]}",
                        'consecutive records of one document share a doc_id, e.g. "doc_id": "news-17"')
    return doc_id


def read_jsonl(path: str, lines: Iterable[str], warn: bool = True, strict_spans: bool = False
               ) -> Iterator[NerExample]:
    """NerExamples from JSON Lines, streamed: {"tokens", "tags"} records, or span records ({"text", "entities"}
    with end-exclusive offsets, CLUENER's {"text", "label"} with inclusive ones) whose text is split into words as
    predict splits it; spans that had to be repaired are counted and warned about at the end (`SpanTally`).
    A `doc_id` groups consecutive records into a document (see DocumentGrouper)."""
    tally, documents = SpanTally(), DocumentGrouper()
    for number, record in read_jsonl_records(path, lines):
        document = documents(_doc_id(record, path, number))
        if "tokens" in record:
            tokens, tags = record["tokens"], record.get("tags", record.get("ner_tags"))
            if not isinstance(tokens, list) or not all(isinstance(word, str) for word in tokens):
                raise DataError(path, number, f"'tokens' must be a list of strings, got {json.dumps(tokens)[:80]}",
                                'write {"tokens": ["word", ...], "tags": ["O", ...]}')
            if not isinstance(tags, list) or len(tags) != len(tokens):
                raise DataError(path, number, "'tags' must be a list with one tag per token",
                                'write {"tokens": [...], "tags": [...]} with equal lengths')
            for tag in tags:
                _split_tag(str(tag), path, number)
            yield NerExample([str(word) for word in record["tokens"]], [str(tag) for tag in tags], path, number,
                             document=document)
        elif "text" in record and ("entities" in record or "label" in record):
            example, problems = span_example(record, path, number, document, strict_spans)
            tally.add(f"line {number}", problems)
            yield example
        else:
            raise DataError(path, number, f"unknown record with keys {sorted(record)}", _SPAN_LAYOUTS)
    if warn:
        for line in tally.warnings(path):
            print(line)


def read_tool(path: str, tool: str, options: NerOptions, warn: bool = True) -> Iterator[NerExample]:
    """NerExamples from an annotation-tool export (`bert_ft.annotation`): each record's spans go through the
    `entities` layout onto `tag_spans`, so the words, the widened and the overlapping spans are those of the span
    JSONL; the export's report (tasks, annotations, skipped) and the span warnings are printed at the end."""
    report, tally = ToolReport(tool, annotation=options.annotation), SpanTally()
    for record in read_tool_records(path, tool, options.annotation, options.text_column, report=report):
        entities = [{"start": span.start, "end": span.end, "label": span.label} for span in record.spans]
        example, problems = span_example({"text": record.text, "entities": entities}, path, record.line, None,
                                         options.strict_spans)
        tally.add(record.where, problems)
        yield example
    if warn:
        for line in report.lines():
            print(f"{path}: {line}")
        for line in tally.warnings(path):
            print(line)


def with_document_context(examples: Iterable[NerExample], context_size: int) -> Iterator[NerExample]:
    """The examples in order, each with the words of its document's neighbouring sentences nearest to it (at most
    `context_size` per side) in `left_context` / `right_context`. A stream: one document is buffered at a time
    (consecutive examples with the same `document`); an example without a document gets no context, and a
    document's first and last sentences get context on one side only."""
    document: list[NerExample] = []
    for example in examples:
        if document and example.document != document[0].document:
            yield from _fill_context(document, context_size)
            document = []
        if example.document is None:
            yield example
        else:
            document.append(example)
    yield from _fill_context(document, context_size)


def _fill_context(document: list[NerExample], context_size: int) -> list[NerExample]:
    for index, example in enumerate(document):
        left: list[str] = []
        before = index - 1
        while before >= 0 and len(left) < context_size:
            words = document[before].words
            left = words[max(0, len(words) - (context_size - len(left))):] + left
            before -= 1
        right: list[str] = []
        after = index + 1
        while after < len(document) and len(right) < context_size:
            right += document[after].words[:context_size - len(right)]
            after += 1
        example.left_context, example.right_context = left, right
    return document


# ------------------------------------------------------------------------------------------------ the task

def entity_spans(tag_ids: list[int], labels: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of the entities in a tag-id sequence, as seqeval (default mode) reads them."""
    return [(entity_type, first, last) for entity_type, first, last in get_entities([labels[tag] for tag in tag_ids])]


class TokenTagger(Head):
    """Token classification: a linear layer per token (transformers' own), optionally followed by a CRF.

    Only the first sub-word of each word is labelled (`word_starts`); the CRF runs per example over those
    positions, compacted to the front, so its transitions are between consecutive words of one sentence and never
    cross from one packed example into the next.
    """

    auto_class = AutoModelForTokenClassification
    extra_modules = ("crf",)

    def __init__(self, model: nn.Module, labels: list[str], use_crf: bool = False) -> None:
        super().__init__(model, labels, use_crf=use_crf)
        self.crf = CRF(len(labels)) if use_crf else None
        if self.crf is not None and all(label == "O" or label[:2] in ("B-", "I-") for label in labels):
            self.crf.constrain(*iob2_transition_mask(self.labels))

    def scores(self, batch: dict) -> torch.Tensor:
        """Token logits (rows, seq, num_labels): what an exported graph computes."""
        return self.model(**encoder_inputs(batch, self.model)).logits

    def decode_scores(self, scores: torch.Tensor, batch: dict, temperature: float | None = None) -> dict:
        return self._decode(scores.float(), batch["word_starts"], batch, temperature)

    def calibration_nll(self, scores: torch.Tensor, batch: dict, temperature: float) -> tuple[torch.Tensor, int]:
        """Linear head: per-word cross-entropy. CRF: the negative log-likelihood of each window's gold tag sequence
        with every potential divided by the temperature; a window whose gold path breaks the IOB2 constraints (it
        starts inside an entity) is left out, as its penalty would swamp the fit."""
        if self.crf is None:
            return super().calibration_nll(scores, batch, temperature)
        emissions, word_labels, word_mask, _ = self._word_emissions(scores.float(), batch["word_starts"], batch,
                                                                    batch["labels"])
        tags = word_labels.clamp(min=0)
        allowed = (self.crf.start_penalty[tags[:, 0]] == 0) & ~(
            (self.crf.transition_penalty[tags[:, :-1], tags[:, 1:]] != 0) & word_mask[:, 1:]).any(dim=1)
        keep = allowed & word_mask.any(dim=1)
        if not bool(keep.any()):
            return scores.new_zeros((), dtype=torch.float), 0
        crf = self.crf.scaled(temperature)
        count = int(keep.sum())
        return crf(emissions[keep] / temperature, tags[keep], word_mask[keep]) * count, count

    def prediction_scores(self, scores: torch.Tensor, batch: dict, pred: torch.Tensor) -> torch.Tensor:
        """Linear head: the summed logits of the predicted tags; CRF: the score of the predicted tag path."""
        if self.crf is None:
            return super().prediction_scores(scores, batch, pred)
        emissions, _, word_mask, positions = self._word_emissions(scores.float(), batch["word_starts"], batch)
        tags = pred.long().clamp(min=0).gather(1, positions)  # (examples, words): pred at the word starts
        return self.crf._path_score(emissions, tags * word_mask, word_mask)

    def forward(self, labels: torch.Tensor | None = None, word_starts: torch.Tensor | None = None,
                decode: bool = False, **batch: torch.Tensor) -> dict:
        logits = self.scores(batch)  # (rows, seq, num_labels)
        if decode:
            return self._decode(logits.float(), word_starts, batch)  # at the head's temperature
        if labels is None:
            return {"logits": logits}
        if self.crf is None:  # every labelled token of every example, wherever it sits in the rows
            loss = self.loss(logits, labels)
        else:
            emissions, word_labels, word_mask, _ = self._word_emissions(logits, word_starts, batch, labels)
            loss = self.crf_loss(emissions, word_labels.clamp(min=0), word_mask)
        return {"loss": loss, "logits": logits}

    def set_loss(self, weights=None, kind: str = "cross_entropy", gamma: float = 2.0) -> None:
        if self.crf is not None and kind == "focal":
            raise UsageError(FOCAL_WITH_CRF)
        super().set_loss(weights, kind, gamma)

    def crf_loss(self, emissions: torch.Tensor, tags: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """The CRF's training loss: the mean negative log-likelihood of the examples' gold tag sequences; with class
        weights, a weighted mean in which each example's weight is the mean class weight of its gold word tags:

            loss = sum_s w_s * NLL_s / sum_s w_s,   w_s = mean over the words t of s of weight[tag_t]

        The CRF's likelihood is one normalised score of the whole tag sequence, so no per-word loss exists to weight
        as the linear head does; weighting whole sentences keeps it a (weighted) maximum-likelihood objective,
        leaves the transitions and the partition function as they are, equals the unweighted loss when every
        weight is the same, and raises the share of the sentences that hold rare tags in proportion to how many of
        their words carry them."""
        if self.class_weights is None:
            return self.crf(emissions, tags, word_mask)
        nll = self.crf(emissions, tags, word_mask, reduction="none")  # (examples,)
        return weighted_mean(nll, sequence_weights(self.class_weights, tags, word_mask))

    @staticmethod
    def _word_emissions(logits: torch.Tensor, word_starts: torch.Tensor, batch: dict,
                        labels: torch.Tensor | None = None):
        """Each example's word-start positions moved to its front: (rows, seq, L) -> (examples, words, L), plus
        their labels, a (examples, words) prefix mask, and the positions within the example's tokens."""
        tokens, _ = example_tokens(logits, batch)  # (examples, longest, L)
        starts = example_tokens(word_starts, batch, fill=0)[0].bool()  # (examples, longest)
        # A stable sort on "is not a start" lists the start positions first, in order.
        positions = torch.argsort((~starts).to(torch.int8), dim=1, stable=True)
        num_words = int(starts.sum(dim=1).max().item()) if starts.numel() else 0
        positions = positions[:, :max(num_words, 1)]  # (examples, words)
        word_mask = torch.gather(starts, 1, positions)  # (examples, words): a contiguous prefix of True
        emissions = torch.gather(tokens, 1, positions.unsqueeze(-1).expand(-1, -1, tokens.size(-1)))
        word_labels = None
        if labels is not None:
            word_labels = torch.gather(example_tokens(labels, batch, fill=-100)[0], 1, positions)
        return emissions.float(), word_labels, word_mask, positions

    def _decode(self, logits: torch.Tensor, word_starts: torch.Tensor, batch: dict,
                temperature: float | None = None) -> dict:
        """Per example and token (relative to the example's first token): label id (-1 off word starts), score
        (the word's probability of that label), span (at the first word of each predicted entity: the probability
        of exactly that entity, see `entity_spans`; 0 elsewhere). Probabilities at `temperature`."""
        temperature = self.temperature if temperature is None else temperature
        tokens, _ = example_tokens(logits, batch)  # (examples, longest, L)
        starts = example_tokens(word_starts, batch, fill=0)[0].bool()  # (examples, longest)
        emissions, _, word_mask, positions = self._word_emissions(logits, word_starts, batch)
        word_probabilities = None
        if self.crf is None:
            predictions = tokens.argmax(-1)  # (examples, longest): the temperature never changes a prediction
            probabilities = (tokens / temperature).softmax(-1)  # (examples, longest, L)
            scores = probabilities.gather(-1, predictions.unsqueeze(-1)).squeeze(-1)
            word_predictions = predictions.gather(1, positions) * word_mask  # (examples, words)
            word_scores = scores.gather(1, positions)
            word_probabilities = probabilities.gather(1, positions.unsqueeze(-1).expand(-1, -1, tokens.size(-1)))
        else:
            word_predictions, _ = self.crf.decode(emissions, word_mask)  # (examples, words); any temperature
            crf = self.crf if temperature == 1.0 else self.crf.scaled(temperature)
            marginals = crf.marginals(emissions / temperature, word_mask)  # (examples, words, num_labels)
            word_scores = marginals.gather(-1, word_predictions.unsqueeze(-1)).squeeze(-1)
            predictions = torch.zeros_like(starts, dtype=torch.long)
            scores = torch.zeros_like(starts, dtype=torch.float)
            predictions.scatter_(1, positions, word_predictions * word_mask)
            scores.scatter_(1, positions, word_scores * word_mask)
        spans = self._span_probabilities(emissions, word_mask, word_predictions, word_scores, word_probabilities,
                                         temperature)
        span = torch.zeros_like(starts, dtype=torch.float).scatter_(1, positions, spans * word_mask)
        return {"pred": torch.where(starts, predictions, -1), "score": torch.where(starts, scores, 0.0),
                "span": torch.where(starts, span, 0.0)}

    def _span_probabilities(self, emissions: torch.Tensor, word_mask: torch.Tensor, word_predictions: torch.Tensor,
                            word_scores: torch.Tensor, word_probabilities: torch.Tensor | None,
                            temperature: float) -> torch.Tensor:
        """(examples, words): at the first word of each predicted entity, the probability that the tagging holds
        exactly this entity (its tags, the next word not continuing it with I-X, and for an entity that starts with
        I-X the word before not being B-X/I-X); 0 elsewhere. CRF: the posterior of that event by forward-backward
        at the temperature (every potential divided by it). Linear head: the same event with the words taken as
        independent (their softmax probabilities at the temperature multiplied)."""
        result = torch.zeros_like(word_scores)
        lengths = word_mask.sum(dim=1).tolist()
        spans = []  # (row, first word, tags, tags that may not precede it, tags that may not follow it)
        for row, tags in enumerate(word_predictions.tolist()):
            for entity_type, first, last in entity_spans(tags[:lengths[row]], self.labels):
                inside = [index for index, label in enumerate(self.labels) if label == f"I-{entity_type}"]
                before = [index for index, label in enumerate(self.labels)
                          if label in (f"B-{entity_type}", f"I-{entity_type}")] \
                    if self.labels[tags[first]].startswith("I-") else []
                spans.append((row, first, tags[first:last + 1], before, inside))
        if not spans:
            return result
        if self.crf is None:
            for row, first, tags, before, inside in spans:
                last = first + len(tags) - 1
                probability = word_scores[row, first:last + 1].prod()
                if last + 1 < lengths[row]:
                    probability = probability * (1 - word_probabilities[row, last + 1, inside].sum())
                if first > 0 and before:
                    probability = probability * (1 - word_probabilities[row, first - 1, before].sum())
                result[row, first] = probability
            return result
        crf = self.crf if temperature == 1.0 else self.crf.scaled(temperature)
        probabilities = crf.span_marginals(emissions / temperature, word_mask, spans)
        for (row, first, _, _, _), probability in zip(spans, probabilities.tolist()):
            result[row, first] = probability
        return result


class NerTask(Task):
    name = "ner"
    description = ("named-entity recognition (CoNLL, JSONL tokens/tags, JSONL character spans: entities lists or "
                   "CLUENER); seqeval scores")
    options_type = NerOptions
    metric = "f1"
    predictions_file = "test_predictions.txt"
    head_type = TokenTagger
    column_types = {"labels": "int16", "word_starts": "int8"}  # label ids (-100 = not scored), 0/1 flags
    document_inputs = True
    samples = {"train": sample_path(__file__, "ner_train.txt"), "validation": sample_path(__file__, "ner_dev.txt"),
               "test": sample_path(__file__, "ner_test.txt")}

    def problems(self, config) -> list[str]:
        return self.options.problems(config)

    def stream(self, path: str) -> Iterator[NerExample]:
        """The file's sentences one at a time, tags converted to IOB2. With --tag_scheme auto a first streaming
        pass counts the tag prefixes (detect_scheme); memory stays flat either way. With --context_size each
        sentence gets its document context on the way (`with_document_context` buffers one document)."""
        sentences = self._sentences(path)
        return with_document_context(sentences, self.options.context_size) if self.options.context_size \
            else sentences

    def _sentences(self, path: str) -> Iterator[NerExample]:
        check_text_file(path)  # encoding problems anywhere in the file are reported before parse errors
        tool = detect_tool(path)  # a Label Studio or doccano export
        is_conll = tool is None and not looks_like_jsonl(iter_text_lines(path))  # CoNLL: one word per line

        def parse(warn: bool) -> Iterator[NerExample]:
            if tool is not None:
                yield from read_tool(path, tool, self.options, warn)
            elif is_conll:
                for words, tags, line, document in read_conll(path, iter_text_lines(path)):
                    yield NerExample(words, tags, path, line, document=document)
            else:
                yield from read_jsonl(path, iter_text_lines(path), warn, self.options.strict_spans)

        scheme = self.options.tag_scheme
        if scheme == "auto":
            scheme = detect_scheme(example.tags for example in parse(warn=False))
        count = repaired_total = 0
        for example in parse(warn=True):
            original = example.tags
            example.tags, repaired = to_iob2(example.tags, scheme)
            if repaired and self.options.strict_tags:
                word = repaired[0]
                previous = original[word - 1] if word else "O (sentence start)"
                raise DataError(path, example.line + word if is_conll else example.line,
                                f"{original[word]} follows {previous}: an entity starts with I- in IOB2 input",
                                f"change it to B-{original[word][2:]}, or drop --strict_tags to repair such tags "
                                "automatically (with a counted warning)")
            repaired_total += len(repaired)
            count += 1
            yield example
        if not count:
            raise DataError(path, None, "no sentences found", "CoNLL: one 'token tag' per line, blank line between "
                            "sentences; JSONL: one object per line")
        if repaired_total:
            print(f"warning: {path}: repaired {repaired_total} entities that started with I- (I-X after O) "
                  "to B-X; use --strict_tags to refuse such files")

    def from_hub(self, dataset, split: str) -> list[NerExample]:
        names = dataset.features["ner_tags"].feature.names
        return [NerExample(list(row["tokens"]), [names[tag] for tag in row["ner_tags"]], split, index + 1)
                for index, row in enumerate(dataset)]

    def labels_of(self, example: NerExample) -> list[str]:
        return example.tags

    def build_labels(self, train_examples: list[NerExample], declared: list[str] | None = None) -> list[str]:
        types = sorted({tag[2:] for example in train_examples for tag in example.tags if tag != "O"})
        return ["O"] + [f"{prefix}-{entity_type}" for entity_type in types for prefix in ("B", "I")]

    def model_meta(self, train_examples, labels: list[str]) -> dict:
        """The entity types the tagger saw (what `extract` can find; the relation model's type pairs are matched
        against them)."""
        return {"entity_types": sorted({label[2:] for label in labels if label != "O"})}

    def example_text(self, example: NerExample) -> str:
        return example.text if example.text is not None else " ".join(example.words)

    def word_count(self, example: NerExample) -> int:
        return len(example.words)

    def data_notes(self, split, examples, features, tokenizer) -> list[str]:
        encoded = tokenizer([example.words for example in examples], is_split_into_words=True,
                            add_special_tokens=False) if examples else {"input_ids": []}
        empty = Counter()
        for index, example in enumerate(examples):
            present = {word for word in encoded.word_ids(index) if word is not None}
            empty.update(word for position, word in enumerate(example.words) if position not in present)
        lines = [f"words that tokenise to nothing (scored as [UNK]): {sum(empty.values())}"
                 + (f", e.g. {[word for word, _ in empty.most_common(5)]}" if empty else "")]
        notes = [note for example in examples for note in example.span_notes]
        if any(example.text is not None for example in examples):
            kinds = Counter(note.split(":", 1)[0] for note in notes)
            lines.append(f"span records: words split as predict splits raw text; {kinds['snapped']} spans cut a "
                         f"word and were widened to whole words (--strict_spans refuses them), {kinds['overlap']} "
                         "overlapped a longer span and were left out")
            shown = 0
            for example in examples:
                for note in example.span_notes:
                    if shown < 5:
                        lines.append(f"  line {example.line}: {note}")
                    shown += 1
        for path in dict.fromkeys(example.path for example in examples):
            lines += [f"{path}: {line}" for line in tool_summary(path, annotation=self.options.annotation,
                                                                 text_key=self.options.text_column)]
        if self.options.context_size:
            in_documents = sum(example.document is not None for example in examples)
            lines.append(f"document context (--context_size {self.options.context_size}): {in_documents} of "
                         f"{len(examples)} sentences are in a document (CoNLL -DOCSTART-, JSONL doc_id); the others "
                         "get no context")
        return lines

    def prepare_tokenizer(self, tokenizer) -> None:
        """Words arrive pre-split: a byte-level BPE tokenizer (RoBERTa, ModernBERT) must mark each as following a
        space, as in running text, or every word but the first gets the sub-words of a word's middle. Saved with
        the model folder, so predict and transformers.pipeline read text the same way."""
        prefix_space_for_words(tokenizer)

    def head_options(self) -> dict:
        return {"use_crf": self.options.crf}

    def pad_values(self, tokenizer) -> dict:
        return {**super().pad_values(tokenizer), "labels": -100, "word_starts": 0}

    # ---------------------------------------------------------------------------------------- features
    def encode(self, examples: list[NerExample], tokenizer, max_seq_length: int, labels: list[str]) -> Features:
        """One feature per window of each sentence; the first sub-word of each word carries its label.

        With --context_size, a feature is [CLS] left context, the window's words, right context [SEP]: the window's
        own words take the budget first, context fills what is left, up to context_size sub-words per side (split
        evenly when both sides have more than fits; a side with less leaves the rest to the other, so a document's
        first and last sentences get one-sided context). Whole words only: the first word that no longer fits ends
        a side. A window's context is the document around it, nearest first: the words of its own sentence outside
        the window, then the neighbouring sentences' words (`left_context` / `right_context`). So a sentence that
        fits one window gets its neighbours, and the windows of a long sentence, which fill the budget except the
        last, are completed from the sentence itself. Context tokens have label -100 and word_starts 0: the loss,
        the CRF, scoring and prediction never see them, each window's words are located by word_starts as before,
        and every word is still scored once, from its most central window (best_window_per_word). Depends only on
        the examples given: any slice of examples encodes as it would within the whole file.
        """
        label_ids = {label: index for index, label in enumerate(labels)}
        before, after = special_tokens_around(tokenizer)
        prefix, budget = len(before), max_seq_length - len(before) - len(after)
        suffix = len(after)
        with_types = "token_type_ids" in tokenizer.model_input_names
        bare_prefixes = word_prefix_ids(tokenizer)
        inputs, example_index, lengths, windows = [], [], [], []
        if not examples:
            return Features(inputs, example_index, lengths, windows)
        # One batched call for the whole batch: sub-word ids of every word, context words included (words are
        # tokenised one by one, so a sentence's own sub-words do not depend on its context).
        encoded = tokenizer([example.left_context + example.words + example.right_context for example in examples],
                            is_split_into_words=True, add_special_tokens=False)
        for index, example in enumerate(examples):
            first, count = len(example.left_context), len(example.words)
            all_pieces: list[list[int]] = [[] for _ in range(first + count + len(example.right_context))]
            for token_id, word_id in zip(encoded["input_ids"][index], encoded.word_ids(index)):
                all_pieces[word_id].append(token_id)
            left_pieces, right_pieces = all_pieces[:first], all_pieces[first + count:]
            word_pieces = all_pieces[first:first + count]
            for word, pieces in enumerate(word_pieces):
                if not pieces:  # e.g. a lone space or control character: keep the word, score it as [UNK]
                    pieces.append(tokenizer.unk_token_id)
                word_pieces[word] = pieces[:budget]  # a single over-long word is cut, its label kept
            stride = min(self.options.doc_stride, budget // 2)
            for start, end in word_windows([len(pieces) for pieces in word_pieces], budget, stride):
                content, word_starts, token_labels = [], [], []
                for word in range(start, end):
                    pieces = word_pieces[word]
                    # A SentencePiece word may start with a bare "▁" piece (the word's own first piece is not in the
                    # vocabulary with the prefix): its label sits on the first real sub-word after it.
                    lead = 1 if len(pieces) > 1 and pieces[0] in bare_prefixes else 0
                    rest = len(pieces) - 1 - lead
                    content.extend(pieces)
                    word_starts.extend([0] * lead + [1] + [0] * rest)
                    token_labels.extend([-100] * lead + [label_ids.get(example.tags[word], 0)] + [-100] * rest)
                left, right = self._context(word_pieces, left_pieces, right_pieces, start, end, budget - len(content))
                input_ids = before + left + content + right + after
                feature = {"input_ids": input_ids,
                           "labels": [-100] * (prefix + len(left)) + token_labels + [-100] * (len(right) + suffix),
                           "word_starts": [0] * (prefix + len(left)) + word_starts + [0] * (len(right) + suffix)}
                if with_types:
                    feature["token_type_ids"] = [0] * len(input_ids)
                inputs.append(feature)
                example_index.append(index)
                lengths.append(len(input_ids))
                windows.append((start, end))
        return Features(inputs, example_index, lengths, windows)

    def _context(self, word_pieces: list[list[int]], left_pieces: list[list[int]], right_pieces: list[list[int]],
                 start: int, end: int, room: int) -> tuple[list[int], list[int]]:
        """The sub-word ids of the left and right context of window [start, end) in `room` free positions (see
        `encode`): at most context_size per side, whole words, nearest first."""
        size = self.options.context_size
        if not size or room <= 0:
            return [], []

        def left_stream() -> Iterator[list[int]]:
            yield from (word_pieces[word] for word in range(start - 1, -1, -1))
            yield from reversed(left_pieces)

        def right_stream() -> Iterator[list[int]]:
            yield from (word_pieces[word] for word in range(end, len(word_pieces)))
            yield from right_pieces

        def take(stream: Iterator[list[int]], limit: int) -> list[list[int]]:
            taken, used = [], 0
            for pieces in stream:
                if used + len(pieces) > limit:
                    break
                taken.append(pieces)
                used += len(pieces)
            return taken

        right_alone = sum(len(pieces) for pieces in take(right_stream(), min(size, room)))
        left = take(left_stream(), min(size, room - min(right_alone, room - room // 2)))
        left_ids = [token for pieces in reversed(left) for token in pieces]
        right_ids = [token for pieces in take(right_stream(), min(size, room - len(left_ids))) for token in pieces]
        return left_ids, right_ids

    def word_predictions(self, examples, features: Features, outputs, labels) -> list[list[tuple[str, float]]]:
        """Merge window outputs back to one (tag, score) per word: each word from its most central window."""
        merged = []
        for example, feature_indices in zip(examples, features.by_example(len(examples))):
            windows = [features.meta[index] for index in feature_indices]
            chosen = best_window_per_word(windows, len(example.words))
            per_window = []
            for index in feature_indices:
                positions = [position for position, start in enumerate(features.inputs[index]["word_starts"])
                             if start]
                per_window.append((outputs[index]["pred"][positions], outputs[index]["score"][positions]))
            words = []
            for word, window_index in enumerate(chosen):
                offset = word - windows[window_index][0]
                predictions, scores = per_window[window_index]
                words.append((labels[int(predictions[offset])], float(scores[offset])))
            merged.append(words)
        return merged

    # ---------------------------------------------------------------------------------------- scoring
    def evaluate(self, examples, features, outputs, labels, source) -> Evaluation:
        words = self.word_predictions(examples, features, outputs, labels)
        gold = [example.tags for example in examples]
        predicted = [[tag for tag, _ in sentence] for sentence in words]
        confidences = self.confidences(examples, features, outputs, labels, words)
        # seqeval warns where a type has no predicted (or no gold) entity: its score is then 0, said once below.
        with counted_warnings("UndefinedMetricWarning") as undefined:
            metrics = {  # plain floats (seqeval gives numpy ones)
                "f1": float(f1_score(gold, predicted)), "precision": float(precision_score(gold, predicted)),
                "recall": float(recall_score(gold, predicted)),
                "strict_f1": float(f1_score(gold, predicted, mode="strict", scheme=IOB2)),
                "strict_precision": float(precision_score(gold, predicted, mode="strict", scheme=IOB2)),
                "strict_recall": float(recall_score(gold, predicted, mode="strict", scheme=IOB2)),
            }
            default = classification_report(gold, predicted, output_dict=True, zero_division=0)
            strict = classification_report(gold, predicted, output_dict=True, mode="strict", scheme=IOB2,
                                           zero_division=0)
        rows = []
        for name in default:
            strict_row = strict.get(name, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
            rows.append([name, default[name]["precision"], default[name]["recall"], default[name]["f1-score"],
                         strict_row["precision"], strict_row["recall"], strict_row["f1-score"],
                         int(default[name]["support"])])
        report = ("seqeval, entity level: default (conlleval) mode | strict IOB2 mode\n"
                  + format_table(rows, ["type", "P", "R", "F1", "strict P", "strict R", "strict F1", "support"]))
        if undefined:
            report += (f"\nseqeval warnings (UndefinedMetricWarning): {len(undefined)}, counted here, not printed: "
                       "a score with no predicted or no gold entity is set to 0 (--verbose prints them)")
        return Evaluation(metrics, report, predicted, entity_confusion(gold, predicted), confidences,
                          "each predicted entity's probability; correct = exact span and type")

    def confidences(self, examples, features, outputs, labels, words_of: list | None = None
                    ) -> list[tuple[float, bool]]:
        """One pair per predicted entity: its probability (`entity_probabilities`) and whether a gold entity has
        exactly its span and type (what calibration is judged on and fitted to)."""
        pairs = []
        for example, entities in zip(examples, self.entity_probabilities(examples, features, outputs, labels,
                                                                         words_of)):
            gold_entities = set(get_entities(example.tags))
            pairs.extend((probability, (entity_type, first, last) in gold_entities)
                         for entity_type, first, last, probability in entities)
        return pairs

    def write_predictions(self, path: str, examples: list[NerExample], predictions: list[list[str]]) -> None:
        lines = []
        for example, tags in zip(examples, predictions):
            lines.extend(f"{word} {gold} {pred}" for word, gold, pred in zip(example.words, example.tags, tags))
            lines.append("")
        atomic_write_lines(path, lines)

    # ---------------------------------------------------------------------------------------- raw text
    def input_examples(self, inputs: list, document: bool = False) -> list[NerExample]:
        """Raw texts (strings or {"text": ...}), split into words like BERT's BasicTokenizer.

        Document context (a model trained with --context_size): objects with a "doc_id" are grouped as in JSONL
        training files (consecutive equal doc_ids form a document); with `document` (predict --input_is_document)
        the other inputs are consecutive sentences of one document. Without either, an input has no context."""
        if document and not self.options.context_size:
            raise UsageError("--input_is_document: this model was trained with --context_size 0 (no document "
                             "context); drop the flag, or train with --context_size N")
        examples, documents = [], DocumentGrouper()
        for number, item in enumerate(inputs, start=1):
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise DataError("input", number, f"expected a text or an object with a string 'text', got "
                                f"{type(item).__name__}", 'give a line of text or {"text": "..."}')
            doc_id = _doc_id(item, "input", number) if isinstance(item, dict) else None
            if doc_id is None and document:
                doc_id = ONE_DOCUMENT
            split = split_words(text)
            examples.append(NerExample([word for word, _, _ in split], ["O"] * len(split), "input", number, text,
                                       [(start, end) for _, start, end in split], documents(doc_id)))
        if self.options.context_size:
            examples = list(with_document_context(examples, self.options.context_size))
        return examples

    def results(self, examples, features, outputs, labels) -> list[dict]:
        """Entities with character offsets; long texts went through the same windows as training. `score` is the
        mean of the words' probabilities (what transformers' pipeline reports), `probability` the entity's own
        probability (see `entity_probabilities`; calibrated when the model has a fitted temperature)."""
        results = []
        words_of = self.word_predictions(examples, features, outputs, labels)
        probabilities_of = self.entity_probabilities(examples, features, outputs, labels, words_of)
        for example, words, probabilities in zip(examples, words_of, probabilities_of):
            entities = []
            for entity_type, first, last, probability in probabilities:
                start, end = example.offsets[first][0], example.offsets[last][1]
                score = sum(score for _, score in words[first:last + 1]) / (last - first + 1)
                entities.append({"text": example.text[start:end], "type": entity_type, "start": start, "end": end,
                                 "score": round(score, 6), "probability": round(probability, 6)})
            results.append({"text": example.text, "entities": entities})
        return results

    def pre_annotations(self, inputs: list, predict) -> list[Prediction]:
        """Label Studio / doccano pre-annotations: the predicted entities as labelled spans, each with its
        probability as its score; the task's score is their mean (no entity: no score)."""
        predictions = []
        for item, result in zip(inputs, predict([{"text": item.text} if isinstance(item, ToolRecord) else item
                                                 for item in inputs])):
            spans = [(f"e{number}", entity["start"], entity["end"], entity["type"], entity["probability"])
                     for number, entity in enumerate(result["entities"], start=1)]
            score = sum(span[4] for span in spans) / len(spans) if spans else None
            predictions.append(tool_prediction(item, result["text"], score, spans=spans))
        return predictions

    def entity_probabilities(self, examples, features: Features, outputs, labels,
                             words_of: list | None = None) -> list[list[tuple[str, int, int, float]]]:
        """Per example, its predicted entities as (type, first word, last word, probability).

        The probability is the head's span probability (`TokenTagger._span_probabilities`) from the window that
        gave the entity's first word, when that window predicts the same entity with its neighbours in view; else
        (an entity merged from two windows) the product of its words' probabilities."""
        words_of = words_of if words_of is not None else self.word_predictions(examples, features, outputs, labels)
        found = []
        for example, feature_indices, words in zip(examples, features.by_example(len(examples)), words_of):
            windows = [features.meta[index] for index in feature_indices]
            chosen = best_window_per_word(windows, len(example.words))
            tags = [tag for tag, _ in words]
            entities = []
            for entity_type, first, last in get_entities(tags):
                index = feature_indices[chosen[first]]
                start, end = windows[chosen[first]]
                probability = None
                if "span" in outputs[index] and start <= first and last < end and (first > start or start == 0) \
                        and (last + 1 < end or end == len(example.words)):
                    positions = [position for position, flag in enumerate(features.inputs[index]["word_starts"])
                                 if flag]
                    around = range(max(first - 1, start), min(last + 2, end))
                    window_tags = [labels[int(outputs[index]["pred"][positions[word - start]])] for word in around]
                    if window_tags == [tags[word] for word in around]:
                        probability = float(outputs[index]["span"][positions[first - start]])
                if probability is None:
                    probability = math.prod(score for _, score in words[first:last + 1])
                entities.append((entity_type, first, last, probability))
            found.append(entities)
        return found


def entity_confusion(gold: list[list[str]], predicted: list[list[str]]) -> tuple[list[str], list[list[int]]]:
    """Entity-type confusion: gold entity vs predicted entity on the same span; '(none)' for missed/spurious."""
    types = sorted({entity_type for sentences in (gold, predicted) for tags in sentences
                    for entity_type, _, _ in get_entities(tags)})
    names = types + ["(none)"]
    index = {name: position for position, name in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for gold_tags, predicted_tags in zip(gold, predicted):
        gold_spans = {(start, end): entity_type for entity_type, start, end in get_entities(gold_tags)}
        predicted_spans = {(start, end): entity_type for entity_type, start, end in get_entities(predicted_tags)}
        for span, entity_type in gold_spans.items():
            matrix[index[entity_type]][index[predicted_spans.get(span, "(none)")]] += 1
        for span, entity_type in predicted_spans.items():
            if span not in gold_spans:
                matrix[index["(none)"]][index[entity_type]] += 1
    return names, matrix
