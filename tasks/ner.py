"""Named-entity recognition: CoNLL / JSONL / CLUENER span input, sub-word alignment, windows, seqeval scoring."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from dataclasses import dataclass

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2

from bert_ft.config import flag
from bert_ft.data import (best_window_per_word, read_jsonl_records, read_text_lines, special_tokens_around,
                          word_windows)
from bert_ft.errors import DataError
from bert_ft.heads import TokenTagger
from bert_ft.io import atomic_write_lines
from bert_ft.metrics import format_table
from bert_ft.predict import run_model

SAMPLES = os.path.join(os.path.dirname(__file__), "samples")
SCHEMES = ("auto", "iob1", "iob2", "iobes")


@dataclass
class NerOptions:
    crf: bool = flag(False, "add a CRF layer over the token logits (Viterbi decoding)")
    doc_stride: int = flag(32, "sub-word overlap of windows over long sentences (at most half a window)")
    tag_scheme: str = flag("auto", "tag scheme of the input files (auto-detected by default)", choices=SCHEMES)
    strict_tags: bool = flag(False, "refuse IOB2 files with I-X after O (default: repair them with a warning)")

    def problems(self, config) -> list[str]:
        if self.doc_stride < 0:
            return [f"--doc_stride: must be >= 0, got {self.doc_stride}"]
        return []


@dataclass
class NerExample:
    words: list[str]
    tags: list[str]  # IOB2
    path: str  # the file, for messages
    line: int  # line of the sentence's first word (CoNLL) or of the JSON record
    text: str | None = None  # raw text (span-annotated input), words are then characters/tokens of it
    offsets: list[tuple[int, int]] | None = None  # character [start, end) of each word in `text`


# ----------------------------------------------------------------------------------------------- tag schemes

def _split_tag(tag: str, path: str, line: int) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, dash, entity_type = tag.partition("-")
    if not dash or prefix not in ("B", "I", "E", "S") or not entity_type:
        raise DataError(path, line, f"tag {tag!r} is not O or B-/I-/E-/S-TYPE",
                        "use IOB1, IOB2 or IOBES tags such as B-PER, I-PER, O")
    return prefix, entity_type


def detect_scheme(sentences: list[list[str]]) -> str:
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

def read_conll(path: str, lines: list[str]) -> list[tuple[list[str], list[str], int]]:
    """(words, tags, first line) per sentence; token in the first column, tag in the last."""
    sentences, words, tags, first_line = [], [], [], 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags, first_line))
                words, tags = [], []
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
        sentences.append((words, tags, first_line))
    return sentences


def _spans_to_tags(path: str, number: int, record: dict) -> tuple[list[str], list[str], list[tuple[int, int]], list[str]]:
    """CLUENER2020 record -> one word per character with IOB2 tags (span ends are inclusive).

    BIO cannot hold nested entities: the outer (longer) span is kept and each nested one is returned in the last
    element (for a counted warning) instead of being dropped silently.
    """
    text = record["text"]
    if not isinstance(text, str) or not isinstance(record["label"], dict):
        raise DataError(path, number, "'text' must be a string and 'label' an object {type: {mention: [[s, e]]}}")
    spans = []
    for entity_type, mentions in record["label"].items():
        for mention, mention_spans in mentions.items():
            for span in mention_spans:
                if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
                    raise DataError(path, number, f"span {span!r} of {mention!r} is not [start, end]")
                start, end = span
                if not 0 <= start <= end < len(text):
                    raise DataError(path, number, f"span [{start}, {end}] of {mention!r} lies outside the text "
                                    f"({len(text)} characters)", "CLUENER spans are 0-based with inclusive ends")
                if text[start:end + 1] != mention:
                    raise DataError(path, number, f"span [{start}, {end}] covers {text[start:end + 1]!r}, "
                                    f"not the mention {mention!r}", "CLUENER spans are 0-based with inclusive ends")
                spans.append((start, end, entity_type, mention))
    tags, dropped = ["O"] * len(text), []
    for start, end, entity_type, mention in sorted(spans, key=lambda span: (span[0] - span[1], span[0])):
        if any(tag != "O" for tag in tags[start:end + 1]):
            dropped.append(f"{path}:{number} {entity_type} {mention!r} [{start}, {end}]")
            continue
        tags[start] = "B-" + entity_type
        tags[start + 1:end + 1] = ["I-" + entity_type] * (end - start)
    return list(text), tags, [(index, index + 1) for index in range(len(text))], dropped


def read_jsonl(path: str, lines: list[str]) -> list[NerExample]:
    examples, nested = [], []
    for number, record in read_jsonl_records(path, lines):
        if "tokens" in record:
            tags = record.get("tags", record.get("ner_tags"))
            if not isinstance(tags, list) or len(tags) != len(record["tokens"]):
                raise DataError(path, number, "'tags' must be a list with one tag per token",
                                'write {"tokens": [...], "tags": [...]} with equal lengths')
            for tag in tags:
                _split_tag(str(tag), path, number)
            examples.append(NerExample([str(word) for word in record["tokens"]], [str(tag) for tag in tags], path, number))
        elif "text" in record and "label" in record:
            words, tags, offsets, dropped = _spans_to_tags(path, number, record)
            examples.append(NerExample(words, tags, path, number, record["text"], offsets))
            nested.extend(dropped)
        else:
            raise DataError(path, number, f"unknown record with keys {sorted(record)}",
                            'use {"tokens", "tags"} or CLUENER {"text", "label"}; unlabelled text goes to '
                            "`run_task.py predict`")
    if nested:
        print(f"warning: {path}: {len(nested)} entities nested inside another were not tagged (BIO holds one "
              f"layer; the outer span is kept), e.g. {nested[0]}")
    return examples


# ---------------------------------------------------------------------------------------------- word split

def _is_punctuation(char: str) -> bool:
    """BERT's BasicTokenizer rule: ASCII symbols and Unicode P* are punctuation."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words with character offsets, split like BERT's BasicTokenizer (so `pipeline(..., "first")` agrees):
    whitespace separates, each punctuation mark and each CJK character is a word of its own."""
    words, start = [], None
    for index, char in enumerate(text + " "):
        single = _is_punctuation(char) or _is_cjk(char)
        if char.isspace() or single:
            if start is not None:
                words.append((text[start:index], start, index))
                start = None
            if single:
                words.append((char, index, index + 1))
        elif start is None:
            start = index
    return words


# ------------------------------------------------------------------------------------------------ the task

class NerTask:
    name = "ner"
    description = "named-entity recognition (CoNLL, JSONL tokens/tags, CLUENER spans); seqeval scores"
    options_type = NerOptions
    metric = "f1"
    predictions_file = "test_predictions.txt"

    def __init__(self, options: NerOptions | None = None) -> None:
        self.options = options or NerOptions()

    def default_files(self) -> dict:
        return {split: os.path.join(SAMPLES, f"ner_{name}.txt")
                for split, name in (("train", "train"), ("validation", "dev"), ("test", "test"))}

    def read(self, path: str) -> list[NerExample]:
        lines = read_text_lines(path)
        first = next(line for line in lines if line.strip())
        is_conll = not first.lstrip().startswith("{")  # CoNLL: one word per line, so a word has its own line
        if is_conll:
            examples = [NerExample(words, tags, path, line) for words, tags, line in read_conll(path, lines)]
        else:
            examples = read_jsonl(path, lines)
        if not examples:
            raise DataError(path, None, "no sentences found", "CoNLL: one 'token tag' per line, blank line between "
                            "sentences; JSONL: one object per line")
        scheme = self.options.tag_scheme
        if scheme == "auto":
            scheme = detect_scheme([example.tags for example in examples])
        repaired_total = 0
        for example in examples:
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
        if repaired_total:
            print(f"warning: {path}: repaired {repaired_total} entities that started with I- (I-X after O) "
                  "to B-X; use --strict_tags to refuse such files")
        return examples

    def from_hub(self, dataset, split: str) -> list[NerExample]:
        names = dataset.features["ner_tags"].feature.names
        return [NerExample(list(row["tokens"]), [names[tag] for tag in row["ner_tags"]], split, index + 1)
                for index, row in enumerate(dataset)]

    def labels_of(self, example: NerExample) -> list[str]:
        return example.tags

    def build_labels(self, train_examples: list[NerExample]) -> list[str]:
        types = sorted({tag[2:] for example in train_examples for tag in example.tags if tag != "O"})
        return ["O"] + [f"{prefix}-{entity_type}" for entity_type in types for prefix in ("B", "I")]

    def prepare_tokenizer(self, tokenizer) -> None:
        pass

    def pad_values(self, tokenizer) -> dict:
        return {"input_ids": tokenizer.pad_token_id, "labels": -100}

    def build_model(self, model_path: str, labels: list[str], tokenizer, trust_remote_code: bool) -> TokenTagger:
        return TokenTagger.create(model_path, labels, self.options.crf, trust_remote_code, len(tokenizer))

    # ---------------------------------------------------------------------------------------- features
    def encode(self, examples: list[NerExample], tokenizer, max_seq_length: int, labels: list[str]) -> list[dict]:
        """One feature per window of each sentence; the first sub-word of each word carries its label."""
        label_ids = {label: index for index, label in enumerate(labels)}
        before, after = special_tokens_around(tokenizer)
        prefix, budget = len(before), max_seq_length - len(before) - len(after)
        with_types = "token_type_ids" in tokenizer.model_input_names
        # One batched call for the whole file: sub-word ids of every word.
        encoded = tokenizer([example.words for example in examples], is_split_into_words=True,
                            add_special_tokens=False)
        features = []
        for example_index, example in enumerate(examples):
            word_pieces: list[list[int]] = [[] for _ in example.words]
            for token_id, word_id in zip(encoded["input_ids"][example_index], encoded.word_ids(example_index)):
                word_pieces[word_id].append(token_id)
            for pieces in word_pieces:
                if not pieces:  # e.g. a lone space or control character: keep the word, score it as [UNK]
                    pieces.append(tokenizer.unk_token_id)
            stride = min(self.options.doc_stride, budget // 2)
            for start, end in word_windows([len(pieces) for pieces in word_pieces], budget, stride):
                content, word_starts, token_labels = [], [], []
                for word in range(start, end):
                    pieces = word_pieces[word][:budget]  # a single over-long word is cut, its label kept
                    content.extend(pieces)
                    word_starts.extend([1] + [0] * (len(pieces) - 1))
                    token_labels.extend([label_ids.get(example.tags[word], 0)] + [-100] * (len(pieces) - 1))
                input_ids = before + content + after
                suffix = len(after)
                feature = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
                           "labels": [-100] * prefix + token_labels + [-100] * suffix,
                           "word_starts": [0] * prefix + word_starts + [0] * suffix,
                           "example_index": example_index, "window": (start, end)}
                if with_types:
                    feature["token_type_ids"] = [0] * len(input_ids)
                features.append(feature)
        return features

    def word_predictions(self, examples, features, outputs, labels) -> list[list[tuple[str, float]]]:
        """Merge window outputs back to one (tag, score) per word: each word from its most central window."""
        by_example: dict[int, list[int]] = {}
        for feature_index, feature in enumerate(features):
            by_example.setdefault(feature["example_index"], []).append(feature_index)
        merged = []
        for example_index, example in enumerate(examples):
            feature_indices = by_example[example_index]
            windows = [features[index]["window"] for index in feature_indices]
            chosen = best_window_per_word(windows, len(example.words))
            per_window = []
            for index in feature_indices:
                positions = [position for position, start in enumerate(features[index]["word_starts"]) if start]
                per_window.append((outputs[index]["pred"][positions], outputs[index]["score"][positions]))
            words = []
            for word, window_index in enumerate(chosen):
                offset = word - windows[window_index][0]
                predictions, scores = per_window[window_index]
                words.append((labels[int(predictions[offset])], float(scores[offset])))
            merged.append(words)
        return merged

    # ---------------------------------------------------------------------------------------- scoring
    def evaluate(self, examples, features, outputs, labels, source):
        from bert_ft.task import Evaluation

        words = self.word_predictions(examples, features, outputs, labels)
        gold = [example.tags for example in examples]
        predicted = [[tag for tag, _ in sentence] for sentence in words]
        metrics = {
            "f1": f1_score(gold, predicted), "precision": precision_score(gold, predicted),
            "recall": recall_score(gold, predicted),
            "strict_f1": f1_score(gold, predicted, mode="strict", scheme=IOB2),
            "strict_precision": precision_score(gold, predicted, mode="strict", scheme=IOB2),
            "strict_recall": recall_score(gold, predicted, mode="strict", scheme=IOB2),
        }
        default = classification_report(gold, predicted, output_dict=True, zero_division=0)
        strict = classification_report(gold, predicted, output_dict=True, mode="strict", scheme=IOB2, zero_division=0)
        rows = []
        for name in default:
            strict_row = strict.get(name, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
            rows.append([name, default[name]["precision"], default[name]["recall"], default[name]["f1-score"],
                         strict_row["precision"], strict_row["recall"], strict_row["f1-score"],
                         int(default[name]["support"])])
        report = ("seqeval, entity level: default (conlleval) mode | strict IOB2 mode\n"
                  + format_table(rows, ["type", "P", "R", "F1", "strict P", "strict R", "strict F1", "support"]))
        predictions = [[tag for tag, _ in sentence] for sentence in words]
        return Evaluation(metrics, report, predictions, entity_confusion(gold, predicted))

    def write_predictions(self, path: str, examples: list[NerExample], predictions: list[list[str]]) -> None:
        lines = []
        for example, tags in zip(examples, predictions):
            lines.extend(f"{word} {gold} {pred}" for word, gold, pred in zip(example.words, example.tags, tags))
            lines.append("")
        atomic_write_lines(path, lines)

    # ---------------------------------------------------------------------------------------- raw text
    def predict(self, model, tokenizer, inputs: list[str], max_seq_length: int, batch_size: int) -> list[dict]:
        """Entities with character offsets; long texts go through the same windows as training."""
        examples = []
        for item in inputs:
            text = item["text"] if isinstance(item, dict) else item
            split = split_words(text)
            examples.append(NerExample([word for word, _, _ in split], ["O"] * len(split), "input", 0, text,
                                       [(start, end) for _, start, end in split]))
        labels = model.labels
        features = self.encode(examples, tokenizer, max_seq_length, labels)
        outputs = run_model(model, features, self.pad_values(tokenizer), batch_size)
        results = []
        for example, words in zip(examples, self.word_predictions(examples, features, outputs, labels)):
            entities = []
            for entity_type, first, last in get_entities([tag for tag, _ in words]):
                start, end = example.offsets[first][0], example.offsets[last][1]
                score = sum(score for _, score in words[first:last + 1]) / (last - first + 1)
                entities.append({"text": example.text[start:end], "type": entity_type, "start": start, "end": end,
                                 "score": round(score, 6)})
            results.append({"text": example.text, "entities": entities})
        return results


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
