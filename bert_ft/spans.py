"""Character spans -> words and IOB2 tags: the one place that turns span-annotated text into a tagging example.

Every span reader maps its own keys onto `tag_spans(text, spans)` (end-exclusive character offsets, as in spaCy,
doccano and Label Studio; a reader whose format has inclusive ends adds 1 first). The text is split into words by
`split_words`, the same split `predict` uses on raw text (like BERT's BasicTokenizer: whitespace separates and is
never a word, each punctuation mark and each CJK character is a word of its own), so a model trained on span files
sees exactly the words it will be asked to tag.

What does not fit one word-level IOB2 layer is reported, never dropped silently (`SpanProblem`):
  snapped   the span starts or ends inside a word: it is widened to whole words (a reader may refuse instead,
            e.g. NER's --strict_spans);
  overlap   it overlaps a longer span (or one of the same length that starts earlier): BIO holds one layer, so the
            longer one is kept and this one is left out.
Spans outside the text, empty ones and ones that cover only whitespace raise `SpanError` (the reader adds its file
and line). `SpanTally` counts the problems of a whole file and names its first records, for the counted warnings.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Sequence

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
    """Words with character offsets [start, end), split like BERT's BasicTokenizer (so `pipeline(..., "first")`
    agrees): whitespace separates, each punctuation mark and each CJK character is a word of its own."""
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


# ---------------------------------------------------------------------------------------------- spans -> tags

class SpanError(ValueError):
    """A span that cannot be placed at all (outside the text, empty, whitespace only); the reader names the record."""


@dataclass
class SpanProblem:
    kind: str  # "snapped" or "overlap"
    start: int  # the span as given (end exclusive)
    end: int
    label: str
    text: str  # the characters the span covers as given
    detail: str  # what happened, e.g. "widened to 'Smithson'" or "overlaps the longer ORG 'Acme Ltd' [0, 8)"
    words: str = ""  # the whole words the span touches (its text after snapping)

    def describe(self) -> str:
        return f"{self.label} {self.text!r} [{self.start}, {self.end}): {self.detail}"


@dataclass
class TaggedText:
    words: list[str]
    offsets: list[tuple[int, int]]  # character [start, end) of each word in the text
    tags: list[str]  # IOB2, one per word
    problems: list[SpanProblem] = field(default_factory=list)


def tag_spans(text: str, spans: Iterable[tuple[int, int, str]]) -> TaggedText:
    """The words of `text` (`split_words`) with IOB2 tags from character spans (start, end exclusive, label).

    A span covers the words it touches; when it cuts a word it is widened to that whole word ("snapped"). Of
    overlapping spans (on whole words, after snapping) the longer is kept (in characters; on a tie the one that
    starts first), the other reported as "overlap". The same span given twice with the same label counts once.
    Raises SpanError for a span outside the text, empty, or covering only whitespace."""
    split = split_words(text)
    words = [word for word, _, _ in split]
    offsets = [(start, end) for _, start, end in split]
    problems: list[SpanProblem] = []
    placed = []  # (first word, last word, start, end, label)
    seen = set()
    for start, end, label in spans:
        if not 0 <= start < end <= len(text):
            raise SpanError(f"span [{start}, {end}) of {label!r} lies outside the text ({len(text)} characters) or "
                            "is empty")
        covered = [index for index, (word_start, word_end) in enumerate(offsets)
                   if word_start < end and word_end > start]
        if not covered:
            raise SpanError(f"span [{start}, {end}) of {label!r} covers only whitespace ({text[start:end]!r})")
        first, last = covered[0], covered[-1]
        if (start, end, label) in seen:  # the very same span given twice; a different one that snaps onto the
            continue                     # same words is reported (snapped, then overlap), never merged silently
        seen.add((start, end, label))
        if offsets[first][0] < start or offsets[last][1] > end:
            widened = text[offsets[first][0]:offsets[last][1]]
            problems.append(SpanProblem("snapped", start, end, label, text[start:end],
                                        f"cuts a word; widened to {widened!r}", widened))
        placed.append((first, last, start, end, label))
    tags = ["O"] * len(words)
    owner: list[tuple | None] = [None] * len(words)
    for span in sorted(placed, key=lambda span: (span[2] - span[3], span[2])):  # longest first, then leftmost
        first, last, start, end, label = span
        clash = next((owner[index] for index in range(first, last + 1) if owner[index] is not None), None)
        if clash is not None:
            problems.append(SpanProblem("overlap", start, end, label, text[start:end],
                                        f"overlaps the longer {clash[4]} {text[clash[2]:clash[3]]!r} "
                                        f"[{clash[2]}, {clash[3]}), which is kept (one layer of tags)"))
            continue
        tags[first] = "B-" + label
        for index in range(first + 1, last + 1):
            tags[index] = "I-" + label
        for index in range(first, last + 1):
            owner[index] = span
    problems.sort(key=lambda problem: (problem.start, problem.end))
    return TaggedText(words, offsets, tags, problems)


# ---------------------------------------------------------------------------------------------- per file

KIND_TEXT = {"snapped": "spans cut a word and were widened to whole words",
             "overlap": "spans overlapped a longer one and were left out (BIO holds one layer)"}


class SpanTally:
    """The span problems of one file: counts per kind and the first records of each, for one warning per kind."""

    def __init__(self, shown: int = 3) -> None:
        self.counts = {kind: 0 for kind in KIND_TEXT}
        self.first: dict[str, list[str]] = {kind: [] for kind in KIND_TEXT}
        self.shown = shown

    def add(self, where: str, problems: Sequence[SpanProblem]) -> None:
        for problem in problems:
            self.counts[problem.kind] += 1
            if len(self.first[problem.kind]) < self.shown:
                self.first[problem.kind].append(f"{where} {problem.describe()}")

    def warnings(self, path: str) -> list[str]:
        return [f"warning: {path}: {count} {KIND_TEXT[kind]}, e.g. " + "; ".join(self.first[kind])
                for kind, count in self.counts.items() if count]
