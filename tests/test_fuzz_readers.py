"""Fuzz every reader (the pure parsers, below any cache) with corrupted variants of valid files.

From a valid seed file per format, a fixed-seed generator makes hundreds of corrupted variants (truncation mid-line,
byte flips, NUL bytes, other encodings, deleted/extra fields, broken markers and spans, shuffled/deleted/duplicated
lines, empty and whitespace-only files, CRLF/BOM variations, very long lines, JSON values of the wrong type). Each
reader must either return examples or raise a DataError naming the file (and a line inside it): never anything else.
The focused regression tests at the end pin the crashes the fuzz found.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from bert_ft.errors import DataError
from bert_ft_tasks.ner import NerOptions, NerTask
from bert_ft_tasks.relation import RelationTask
from bert_ft_tasks.sentence import SentenceOptions, SentenceTask

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "samples")
VARIANTS = 312  # per format (a multiple of the number of mutations, so each one runs equally often)


# ------------------------------------------------------------------------------------------------ seed files

def _sample_head(name: str, records: int) -> str:
    """The first `records` blank-line separated blocks of a shipped sample (small seeds make sharper mutants)."""
    with open(os.path.join(SAMPLES, name), encoding="utf-8") as handle:
        text = handle.read()
    blocks = text.split("\n\n")
    return "\n\n".join(blocks[:records]) + "\n"


def _sample_lines(name: str, count: int) -> str:
    with open(os.path.join(SAMPLES, name), encoding="utf-8") as handle:
        return "".join(handle.readlines()[:count])


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _cluener(text: str, *entities: tuple[str, str]) -> dict:
    label: dict = {}
    for entity_type, mention in entities:
        start = text.index(mention)
        label.setdefault(entity_type, {})[mention] = [[start, start + len(mention) - 1]]
    return {"text": text, "label": label}


def _relation(record_id: str, text: str, head: str, tail: str, label: str) -> dict:
    head_start, tail_start = text.index(head), text.index(tail)
    return {"id": record_id, "text": text, "head": [head_start, head_start + len(head)],
            "tail": [tail_start, tail_start + len(tail)], "label": label}


NER_TOKENS = _jsonl([
    {"tokens": ["Angela", "Merkel", "visited", "Paris", "."], "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]},
    {"tokens": ["São", "Paulo", "beat", "Zürich", "FC"], "tags": ["B-ORG", "I-ORG", "O", "B-ORG", "I-ORG"]},
    {"tokens": ["The", "“", "Daily", "”", "reported"], "ner_tags": ["O", "O", "B-ORG", "O", "O"]},
    {"tokens": ["Nothing", "here"], "tags": ["O", "O"]},
    {"tokens": ["Müller", "joined", "Ålesund"], "tags": ["B-PER", "O", "B-ORG"]},
])
NER_CLUENER = _jsonl([
    _cluener("浙商银行企业信贷部叶老桂博士则从另一个角度进行了解读。", ("company", "浙商银行"), ("name", "叶老桂")),
    _cluener("生生不息CSOL生化狂潮让你填弹狂扫", ("game", "CSOL")),
    _cluener("那不勒斯vs锡耶纳以及桑普vs热那亚之上呢？", ("organization", "那不勒斯"), ("organization", "锡耶纳"),
             ("organization", "桑普"), ("organization", "热那亚")),
    _cluener("加勒比海盗3：世界尽头》的去年同期成绩死死甩在身后，", ("movie", "加勒比海盗3：世界尽头")),
    {"text": "没有实体的一句话。", "label": {}},
])
RELATION_JSONL = _jsonl([
    _relation("r1", "The juice came out of the oranges.", "juice", "oranges", "Entity-Origin(e1,e2)"),
    _relation("r2", "The shoe has a broken sole.", "sole", "shoe", "Component-Whole(e1,e2)"),
    _relation("r3", "Zürich’s bakery made the “bread” today.", "bread", "bakery", "Product-Producer(e1,e2)"),
    {"id": "r4", "text": "He opened the <e1>bottle</e1> full of <e2>milk</e2>.", "label": "Content-Container(e2,e1)"},
    {"text": "A <e1>fire</e1> was caused by a <e2>cigarette</e2>.", "label": "Cause-Effect(e2,e1)"},
])
SENTENCE_CSV = ('id,sentence,label\n'
                'a1,"Loud, long, and dull.",negative\n'
                'a2,"She said ""wow"", then\nleft.",positive\n'
                'a3,Plain text with café,positive\n'
                'a4,"Ärgerlich; nicht gut",negative\n'
                'a5,Fine – really fine,positive\n')
SENTENCE_CSV_INFERRED = ('row,premise,hypothesis,label\n'  # 'row': unique integers, an id
                         '0,"A man plays, loudly.",Someone plays.,entailment\n'
                         '1,A cat sleeps.,A dog runs.,contradiction\n'
                         '2,"Ein Café, geöffnet.",Something is open.,entailment\n'
                         '3,Kids run.,"Nobody ""runs"".",contradiction\n')
SENTENCE_SEMICOLON = ('sentence;label\n'
                      'Gut, aber teuer;neutral\n'
                      '"Quoted; with the delimiter";positive\n'
                      'Nicht gut;negative\n')
SENTENCE_JSONL = _jsonl([
    {"sentence": "A man plays.", "sentence2": "Someone plays.", "label": 1},
    {"sentence": "A cat sleeps.", "sentence2": "A dog runs.", "label": 0},
    {"sentence": "Ein Café öffnet.", "sentence2": "Something opens.", "label": 1},
    {"sentence": "这部电影非常好看！", "sentence2": "好看", "label": 1},
])
SENTENCE_JSONL_INFERRED = _jsonl([
    {"id": "x1", "review": "Great value, would buy again.", "label": "positive"},
    {"id": "x2", "review": "Broke after a day – avoid.", "label": "negative"},
    {"id": "x3", "review": "Très bien.", "label": "positive"},
])


def _ner(rng: random.Random):
    return NerTask(NerOptions(tag_scheme=rng.choice(["auto", "auto", "iob1", "iob2", "iobes"]),
                              strict_tags=rng.random() < 0.3))


def _sentence(rng: random.Random, id_column: str | None = None):
    return SentenceTask(SentenceOptions(id_column=id_column if rng.random() < 0.5 else None))


# name: (file extension, kind, seed text, task factory)
FORMATS = {
    "ner_conll": (".txt", "conll", _sample_head("ner_dev.txt", 8), _ner),
    "ner_jsonl_tags": (".jsonl", "jsonl", NER_TOKENS, _ner),
    "ner_cluener": (".json", "jsonl", NER_CLUENER, _ner),
    "relation_semeval": (".txt", "semeval", _sample_head("relation_train.txt", 8), lambda rng: RelationTask()),
    "relation_jsonl": (".jsonl", "jsonl", RELATION_JSONL, lambda rng: RelationTask()),
    "sentence_tsv": (".tsv", "tsv", _sample_lines("sentence_train.tsv", 12), lambda rng: _sentence(rng)),
    "sentence_csv": (".csv", "csv", SENTENCE_CSV, lambda rng: _sentence(rng, "id")),
    "sentence_csv_inferred": (".csv", "csv", SENTENCE_CSV_INFERRED, lambda rng: _sentence(rng, "row")),
    "sentence_sniffed": (".data", "csv", SENTENCE_SEMICOLON, lambda rng: _sentence(rng)),
    "sentence_jsonl": (".jsonl", "jsonl", SENTENCE_JSONL, lambda rng: _sentence(rng)),
    "sentence_jsonl_inferred": (".jsonl", "jsonl", SENTENCE_JSONL_INFERRED, lambda rng: _sentence(rng, "id")),
}


# ------------------------------------------------------------------------------------------------ mutations
# Each takes (rng, text, kind) and returns the bytes of the corrupted file.

SEPARATOR = {"conll": " ", "tsv": "\t", "csv": ",", "semeval": "\t", "jsonl": ","}
ODD_VALUES = [None, 0, -1, 1.5, True, False, "", " ", "x", [], ["x"], [1, 2], [[0, 1]], {}, {"a": "b"},
              {"x": [1, 2]}, 10 ** 30, -(10 ** 30), "\u2028", "<e1>", 2 ** 63]
NON_ASCII = ["é", "ü", "ß", "“", "”", "–", "€", "Ω", "中", "😀", "\u00a0", "\u200b", "\ufeff"]


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


def _pick_line(rng: random.Random, lines: list[str]) -> int:
    candidates = [index for index, line in enumerate(lines) if line.strip()] or [0]
    return rng.choice(candidates)


def truncate(rng, text, kind):
    data = _utf8(text)
    return data[:rng.randrange(1, max(2, len(data)))]


def byte_flips(rng, text, kind):
    data = bytearray(_utf8(text))
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def nul_bytes(rng, text, kind):
    data = bytearray(_utf8(text))
    for _ in range(rng.randint(1, 3)):
        data.insert(rng.randrange(len(data) + 1), 0)
    return bytes(data)


def _with_non_ascii(rng, text):
    lines = text.split("\n")
    index = _pick_line(rng, lines)
    position = rng.randrange(len(lines[index]) + 1)
    lines[index] = lines[index][:position] + "".join(rng.choices(NON_ASCII[:8], k=3)) + lines[index][position:]
    return "\n".join(lines)


def latin1(rng, text, kind):
    return _with_non_ascii(rng, text).encode("latin-1", errors="replace")


def cp1252(rng, text, kind):
    return _with_non_ascii(rng, text).encode("cp1252", errors="replace")


def utf16(rng, text, kind):
    encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
    data = text.encode(encoding)
    if encoding == "utf-16-le" and rng.random() < 0.5:
        data = b"\xff\xfe" + data
    elif encoding == "utf-16-be" and rng.random() < 0.5:
        data = b"\xfe\xff" + data
    return data


def _json_lines(text):
    """Parsed records of a JSONL text (None for blank or unparsable lines)."""
    parsed = []
    for line in text.split("\n"):
        try:
            parsed.append(json.loads(line) if line.strip() else None)
        except ValueError:
            parsed.append(None)
    return parsed


def _rewrite_record(rng, text, change):
    lines = text.split("\n")
    records = _json_lines(text)
    indices = [index for index, record in enumerate(records) if isinstance(record, dict)]
    if not indices:
        return _utf8(text + "\n{}\n")
    index = rng.choice(indices)
    record = records[index]
    change(record)
    lines[index] = json.dumps(record, ensure_ascii=rng.random() < 0.5)
    return _utf8("\n".join(lines))


def delete_field(rng, text, kind):
    if kind == "jsonl":
        return _rewrite_record(rng, text, lambda record: record.pop(rng.choice(list(record)), None) if record else None)
    lines = text.split("\n")
    index = _pick_line(rng, lines)
    fields = lines[index].split(SEPARATOR[kind])
    if len(fields) > 1:
        del fields[rng.randrange(len(fields))]
    else:
        fields = [""]
    lines[index] = SEPARATOR[kind].join(fields)
    return _utf8("\n".join(lines))


def extra_field(rng, text, kind):
    if kind == "jsonl":
        def change(record):
            record[rng.choice(["extra", "label", "text", "tokens", "tags", "head", "tail", "sentence", "id"])] = \
                rng.choice(ODD_VALUES)
        return _rewrite_record(rng, text, change)
    lines = text.split("\n")
    index = _pick_line(rng, lines)
    fields = lines[index].split(SEPARATOR[kind])
    fields.insert(rng.randrange(len(fields) + 1), rng.choice(["extra", "B-PER", "O", "1", '"', "<e1>x</e1>", "",
                                                             "9" * 5000, "-0", "+7"]))
    lines[index] = SEPARATOR[kind].join(fields)
    return _utf8("\n".join(lines))


FIELD_VALUES = ["", " ", "0", "-0", "+7", "007", "9" * 5000, "1.5", "NaN", "null", "[1]", '"', '""', "\\t", "O",
                "B-", "I-PER", "sentence", "label", "<e1>", "</e2>", "中文", "\u2028", "x" * 300]


def replace_field(rng, text, kind):
    """Field values replaced by odd ones, keeping the number of fields: one field of one line, or one column on
    every line below the first with numbers (huge, zero-padded, repeated: what identifier detection reads)."""
    if kind == "jsonl":
        return wrong_types(rng, text, kind)
    lines = text.split("\n")
    separator = SEPARATOR[kind]
    if rng.random() < 0.5:
        index = _pick_line(rng, lines)
        fields = lines[index].split(separator)
        fields[rng.randrange(len(fields))] = rng.choice(FIELD_VALUES)
        lines[index] = separator.join(fields)
        return _utf8("\n".join(lines))
    column = rng.randrange(len(lines[0].split(separator)))
    family = rng.choice(["huge", "padded", "repeated", "negative"])
    for number, line in enumerate(lines[1:], start=1):
        fields = line.split(separator)
        if column < len(fields) and line.strip():
            fields[column] = {"huge": "9" * 5000 + str(number), "padded": f"{number:05d}", "repeated": "1",
                              "negative": f"-{number}"}[family]
            lines[number] = separator.join(fields)
    return _utf8("\n".join(lines))


MARKER_EDITS = ["remove", "duplicate", "nest", "swap", "upper", "empty", "stray", "cross", "reverse"]


def broken_markers(rng, text, kind):
    """Break, duplicate, nest or cross the <e1>/<e2> markers of one line (or add stray ones)."""
    lines = text.split("\n")
    index = _pick_line(rng, lines)
    line = lines[index]
    edit = rng.choice(MARKER_EDITS)
    marker = rng.choice(["<e1>", "</e1>", "<e2>", "</e2>"])
    if edit == "remove":
        line = line.replace(marker, "", 1)
    elif edit == "duplicate":
        position = rng.randrange(len(line) + 1)
        line = line[:position] + marker + line[position:]
    elif edit == "nest":
        line = line.replace("<e2>", "").replace("</e2>", "").replace("</e1>", "<e2>x</e2></e1>", 1)
    elif edit == "swap":
        line = line.replace("<e1>", "\0").replace("</e1>", "<e1>").replace("\0", "</e1>")
    elif edit == "upper":
        line = line.replace(marker, marker.upper())
    elif edit == "empty":
        line = line.replace(marker, marker + ("</e1>" if marker == "<e1>" else "<e1>"), 1)
    elif edit == "stray":
        line = line + " <e" + rng.choice(["1", "2", "3"]) + ">"
    elif edit == "cross":
        line = line.replace("</e1>", "", 1).replace("</e2>", "</e2></e1>", 1)
    else:
        line = line[::-1]
    lines[index] = line
    return _utf8("\n".join(lines))


SPAN_VALUES = [[-1, 3], [5, 2], [0, 10 ** 6], [3, 3], [1.5, 2], ["1", "2"], [1], [1, 2, 3], None, True, 7,
               {"start": 0}, [[1, 2]], [2 ** 70, 2 ** 71], [True, False], "0,3", [0, -5], [None, None]]


def broken_spans(rng, text, kind):
    """Out-of-range, reversed, non-integer spans (and list/tag shapes) in one JSON record."""
    if kind != "jsonl":
        return broken_markers(rng, text, kind)

    def change(record):
        if "head" in record or "tail" in record:
            record[rng.choice(["head", "tail"])] = rng.choice(SPAN_VALUES)
        elif isinstance(record.get("label"), dict) and record["label"]:
            mentions = record["label"][rng.choice(list(record["label"]))]
            if isinstance(mentions, dict) and mentions and rng.random() < 0.8:
                mention = rng.choice(list(mentions))
                if rng.random() < 0.7:
                    mentions[mention] = [rng.choice(SPAN_VALUES)]
                else:
                    mentions[mention] = rng.choice(SPAN_VALUES)
            else:
                record["label"][rng.choice(list(record["label"]))] = rng.choice(ODD_VALUES)
        elif "tokens" in record:
            key = rng.choice(["tokens", "tags", "ner_tags"])
            value = rng.choice([None, "Paris", 3, {}, [], ["O"], ["B-PER", None], [["B-PER"]], [1, 2, 3, 4, 5],
                                ["B-"] * 5, ["X-PER"] * 5, [{"tag": "O"}] * 5])
            record[key] = value
        else:
            record[rng.choice(list(record) or ["x"])] = rng.choice(ODD_VALUES)
    return _rewrite_record(rng, text, change)


def wrong_types(rng, text, kind):
    """JSON: a list, number, null, bool or nested object where a string is expected. Else: a JSON line inside."""
    if kind != "jsonl":
        lines = text.split("\n")
        lines.insert(rng.randrange(len(lines) + 1), json.dumps(rng.choice(ODD_VALUES + [{"text": "x"}])))
        return _utf8("\n".join(lines))

    def change(record):
        key = rng.choice(list(record) or ["text"])
        if isinstance(record.get(key), list) and record[key] and rng.random() < 0.5:
            record[key][rng.randrange(len(record[key]))] = rng.choice(ODD_VALUES)
        else:
            record[key] = rng.choice(ODD_VALUES)
    return _rewrite_record(rng, text, change)


def whole_line_json(rng, text, kind):
    """A line that is valid JSON but not an object, or is not JSON at all, or nests very deeply."""
    lines = text.split("\n")
    choice = rng.choice(["[1, 2]", "null", "42", '"text"', "{", "{}", "[" * 100_000 + "]" * 100_000,
                         '{"a": ' * 50_000 + "1" + "}" * 50_000, "9" * 5000, '{"label": ' + "9" * 5000 + "}",
                         '{"text": "x", "text": "y"}', "NaN", '{"label": Infinity, "text": "x"}', "\x1c\x1d\x1e"])
    lines.insert(rng.randrange(len(lines) + 1), choice)
    return _utf8("\n".join(lines))


def shuffle_lines(rng, text, kind):
    lines = text.split("\n")
    rng.shuffle(lines)
    return _utf8("\n".join(lines))


def delete_lines(rng, text, kind):
    lines = text.split("\n")
    for _ in range(rng.randint(1, max(1, len(lines) // 3))):
        if len(lines) > 1:
            del lines[rng.randrange(len(lines))]
    return _utf8("\n".join(lines))


def duplicate_lines(rng, text, kind):
    lines = text.split("\n")
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(len(lines))
        lines.insert(rng.randrange(len(lines) + 1), lines[index])
    return _utf8("\n".join(lines))


def empty_file(rng, text, kind):
    return rng.choice([b"", b"\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n", b"\r\n\r\n"])


def whitespace_only(rng, text, kind):
    return _utf8("".join(rng.choices([" ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c",
                                      "\x1c", "\x85", "\ufeff"], k=rng.randint(1, 12))))


def line_endings(rng, text, kind):
    """CRLF, lone CR, mixed endings, a BOM (or two), a BOM in the middle, no final newline."""
    edit = rng.choice(["crlf", "cr", "mixed", "bom", "double_bom", "inner_bom", "no_final", "crcrlf"])
    if edit == "crlf":
        text = text.replace("\n", "\r\n")
    elif edit == "cr":
        text = text.replace("\n", "\r")
    elif edit == "mixed":
        text = "".join(char + ("\r" if char == "\n" and rng.random() < 0.3 else "") for char in text)
        text = text.replace("\n\r", "\r\n")
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "double_bom":
        text = "\ufeff\ufeff" + text
    elif edit == "inner_bom":
        lines = text.split("\n")
        index = rng.randrange(len(lines))
        lines[index] = "\ufeff" + lines[index]
        text = "\n".join(lines)
    elif edit == "no_final":
        text = text.rstrip("\n")
    else:
        text = text.replace("\n", "\r\r\n")
    return _utf8(text)


def long_line(rng, text, kind):
    lines = text.split("\n")
    index = _pick_line(rng, lines)
    filler = rng.choice(["a", "ab ", "中", "<e1>", "\t", ",", '"', "{", "😀", "x" * 7 + " "])
    position = rng.randrange(len(lines[index]) + 1)
    lines[index] = lines[index][:position] + filler * (200_000 // len(filler)) + lines[index][position:]
    return _utf8("\n".join(lines))


def odd_characters(rng, text, kind):
    """Control characters, Unicode line separators, lone surrogates, private-use characters in random places."""
    data = list(text)
    for _ in range(rng.randint(1, 5)):
        char = rng.choice(["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029", "\x7f",
                           "\ud800", "\udfff", "\ue000", "\U0010ffff", "\u0301", "\x1b[31m"])
        data.insert(rng.randrange(len(data) + 1), char)
    return _utf8("".join(data))


def broken_quotes(rng, text, kind):
    """Quotes, tabs, delimiters and brackets inserted or removed (CSV quoting, SemEval quotes, JSON syntax)."""
    data = list(text)
    for _ in range(rng.randint(1, 4)):
        if data and rng.random() < 0.4:
            positions = [index for index, char in enumerate(data) if char in '"\t,{}[]:<>']
            if positions:
                del data[rng.choice(positions)]
                continue
        data.insert(rng.randrange(len(data) + 1), rng.choice(['"', '""', "\t", ",", ";", "{", "}", "[", "]", ":"]))
    return _utf8("".join(data))


def header_change(rng, text, kind):
    """The first line renamed, reordered, duplicated or dropped (delimited files); else a mangled first line."""
    lines = text.split("\n")
    separator = SEPARATOR[kind]
    fields = lines[0].split(separator)
    edit = rng.choice(["rename", "reorder", "duplicate", "drop", "case", "blank"])
    if edit == "rename":
        fields[rng.randrange(len(fields))] = rng.choice(["text", "review", "Label", "id", "", " ", "sentence2",
                                                          "idx", "row_id", "sentence"])
    elif edit == "reorder":
        rng.shuffle(fields)
    elif edit == "duplicate":
        fields.append(rng.choice(fields))
    elif edit == "drop":
        lines = lines[1:] or [""]
        return _utf8("\n".join(lines))
    elif edit == "case":
        fields = [field.upper() for field in fields]
    else:
        fields = [""] * len(fields)
    lines[0] = separator.join(fields)
    return _utf8("\n".join(lines))


def combined(rng, text, kind):
    """Two or three of the text-level mutations in a row."""
    data = text
    for mutation in rng.sample(TEXT_MUTATIONS, rng.randint(2, 3)):
        data = mutation(rng, data, kind).decode("utf-8", errors="surrogatepass")
    return _utf8(data)


TEXT_MUTATIONS = [delete_field, extra_field, replace_field, broken_markers, broken_spans, wrong_types, shuffle_lines,
                  delete_lines, duplicate_lines, broken_quotes, header_change]
MUTATIONS = [truncate, byte_flips, nul_bytes, latin1, cp1252, utf16, delete_field, extra_field, replace_field,
             broken_markers, broken_spans, wrong_types, whole_line_json, shuffle_lines, delete_lines, duplicate_lines,
             empty_file, whitespace_only, line_endings, long_line, odd_characters, broken_quotes, header_change,
             combined, replace_field, broken_spans]  # 24 kinds, 26 entries: the likeliest to hurt run twice


def _line_count(data: bytes) -> int:
    """An upper bound on the line numbers a message may name (every line-break convention counts)."""
    text = data.decode("utf-8", errors="replace")
    return max(1, data.count(b"\n") + 1, len(text.splitlines()) + 1, text.count("\r") + 1)


# ------------------------------------------------------------------------------------------------ the fuzz

@pytest.mark.parametrize("name", sorted(FORMATS))
def test_reader_returns_examples_or_a_data_error(name, tmp_path, capsys):
    extension, kind, seed_text, make_task = FORMATS[name]
    assert make_task(random.Random(0)).read(_write(tmp_path, "seed" + extension, _utf8(seed_text))), \
        "the seed file itself must read"
    failures, outcomes = [], {"examples": 0, "DataError": 0}
    base = sorted(FORMATS).index(name) * 1_000_003
    for variant in range(VARIANTS):
        seed = base + variant
        rng = random.Random(seed)
        mutation = MUTATIONS[variant % len(MUTATIONS)]
        data = mutation(rng, seed_text, kind)
        path = _write(tmp_path, f"v{variant}{extension}", data)
        where = f"{name} variant {variant} (seed {seed}, mutation {mutation.__name__})"
        try:
            examples = make_task(rng).read(path)
        except DataError as error:
            outcomes["DataError"] += 1
            if path not in str(error) or error.path != path:
                failures.append(f"{where}: DataError does not name the file: {error}")
            elif error.line is not None and not 1 <= error.line <= _line_count(data):
                failures.append(f"{where}: DataError names line {error.line} of a {_line_count(data)}-line file: "
                                f"{error}")
        except Exception as error:  # noqa: BLE001 - the point of the test
            failures.append(f"{where}: {type(error).__name__}: {str(error)[:300]}")
        else:
            outcomes["examples"] += 1
            if not isinstance(examples, list) or not examples:
                failures.append(f"{where}: returned {examples!r:.100} instead of examples or a DataError")
        capsys.readouterr()  # warnings (tag repairs, nested entities) are fine
    assert not failures, f"{len(failures)} of {VARIANTS} variants failed:\n" + "\n".join(failures[:25])
    assert outcomes["examples"] and outcomes["DataError"], outcomes  # the mutations neither all pass nor all fail


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------- crashes the fuzz found (pinned)

def _error(read, tmp_path, name: str, data: bytes) -> DataError:
    path = _write(tmp_path, name, data)
    with pytest.raises(DataError) as caught:
        read(path)
    assert caught.value.path == path and str(caught.value).startswith(path)
    return caught.value


ALL_READERS = [NerTask().read, RelationTask().read, SentenceTask().read]


@pytest.mark.parametrize("data", [b"\xef\xbb\xbf\n", "\u3000\u2028\n".encode(), "\u00a0\x1c\x85".encode(),
                                  b"\xef\xbb\xbf"])
@pytest.mark.parametrize("read", ALL_READERS)
def test_unicode_whitespace_only_file_is_empty_not_stop_iteration(tmp_path, read, data):
    # Was: StopIteration from `next(line for line in lines if line.strip())` in NerTask.read / RelationTask.read
    # (bytes.strip() does not see a BOM, U+3000 or U+2028 as blank, str.strip() does).
    error = _error(read, tmp_path, "blank.txt", data)
    assert error.line is None and "the file is empty (it holds only whitespace)" in str(error)


@pytest.mark.parametrize("line, problem", [
    ('{"a": ' * 50_000 + "1" + "}" * 50_000, "JSON nested too deeply to read"),  # was RecursionError
    ('{"tokens": ["a"], "tags": [' + "9" * 5000 + "]}", "a number too long to read"),  # was ValueError
])
@pytest.mark.parametrize("read", ALL_READERS)
def test_json_too_deep_or_too_long_a_number(tmp_path, read, line, problem):
    error = _error(read, tmp_path, "deep.jsonl", ("\n" + line + "\n").encode())
    assert error.line == 2 and problem in str(error) and "fix:" in str(error)


@pytest.mark.parametrize("label, problem", [
    ({"name": 3}, "label 'name': 3 is not an entity type mapped to {mention: [[start, end], ...]}"),  # AttributeError
    ({"name": ["叶老桂"]}, "label 'name': [\"\\u53f6\\u8001\\u6842\"] is not an entity type"),        # AttributeError
    ({"": {"叶老桂": [[0, 2]]}}, "label '': "),
    ({"name": {"叶老桂": None}}, "the spans of '叶老桂' are null, not a list of [start, end]"),       # TypeError
    ({"name": {"叶老桂": 7}}, "the spans of '叶老桂' are 7, not a list of [start, end]"),             # TypeError
    ({"name": {"叶老桂": [[True, True]]}}, "span [True, True] of '叶老桂' is not [start, end]"),      # was accepted
])
def test_cluener_labels_of_the_wrong_shape(tmp_path, label, problem):
    record = {"text": "叶老桂博士则从另一个角度进行了解读。", "label": label}
    error = _error(NerTask().read, tmp_path, "c.json", (json.dumps(record, ensure_ascii=False) + "\n").encode())
    assert error.line == 1 and problem in str(error) and "fix:" in str(error)


@pytest.mark.parametrize("tokens", [1.5, 3, None, "Paris", [1, 2], [["a"]]])
def test_jsonl_tokens_must_be_a_list_of_strings(tmp_path, tokens):
    # Was: TypeError (object of type 'float' has no len()) in tasks.ner.read_jsonl.
    good = {"tokens": ["Paris"], "tags": ["B-LOC"]}
    text = json.dumps(good) + "\n" + json.dumps({"tokens": tokens, "tags": ["O", "O"]}) + "\n"
    error = _error(NerTask().read, tmp_path, "t.jsonl", text.encode())
    assert error.line == 2 and "'tokens' must be a list of strings" in str(error)


# ------------------------------------------------------------------------------- encodings and binary input

@pytest.mark.parametrize("read", ALL_READERS)
def test_nul_byte_names_its_line(tmp_path, read):
    data = b"Peter B-PER\nParis B-LOC\n\nbad\x00word O\n"
    error = _error(read, tmp_path, "nul.txt", data)
    assert error.line == 4 and "binary file or NUL byte at line 4" in str(error) and "re-save as UTF-8 text" in \
        str(error)


@pytest.mark.parametrize("encoding, bom", [("utf-16", None), ("utf-16-be", b"\xfe\xff"), ("utf-32", None)])
@pytest.mark.parametrize("read", ALL_READERS)
def test_utf16_with_a_byte_order_mark(tmp_path, read, encoding, bom):
    data = (bom or b"") + "sentence\tlabel\nCafé crème\tpos\n".encode(encoding)
    error = _error(read, tmp_path, "wide.tsv", data)
    name = "UTF-32" if encoding == "utf-32" else "UTF-16"
    assert f"the file is {name} (it starts with the byte-order mark" in str(error)
    assert f"iconv -f {name} -t UTF-8" in str(error)


def test_utf16_without_a_byte_order_mark(tmp_path):
    error = _error(SentenceTask().read, tmp_path, "le.tsv", "sentence\tlabel\ngood\tpos\n".encode("utf-16-le"))
    assert "looks like UTF-16 without a byte-order mark" in str(error) and "iconv -f UTF-16LE" in str(error)


def test_byte_order_mark_inside_a_jsonl_file(tmp_path):
    # `cat a.jsonl b.jsonl` with two BOMs: the second one is named, not reported as a JSON syntax error.
    data = b'\xef\xbb\xbf{"sentence": "a", "label": 1}\n\xef\xbb\xbf{"sentence": "b", "label": 0}\n'
    error = _error(SentenceTask().read, tmp_path, "cat.jsonl", data)
    assert error.line == 2 and "byte-order mark (U+FEFF) starts this line" in str(error)


@pytest.mark.parametrize("name, text, problem", [
    ("q.csv", 'sentence,label\n"never closed,1\n' + "word " * 30_000 + "\n", "(an unclosed quote?)"),
    ("long.tsv", "sentence\tlabel\n" + "word " * 30_000 + "\t1\n", "split the text"),
])
def test_field_over_the_csv_limit(tmp_path, name, text, problem):
    error = _error(SentenceTask().read, tmp_path, name, text.encode())
    assert error.line == 2 and "field longer than 131072 characters" in str(error) and problem in str(error)


def test_huge_integers_in_a_candidate_id_column(tmp_path, capsys):
    # Was: ValueError (int() refuses over 4300 digits) while checking which columns hold unique integers.
    huge = "9" * 5000
    path = _write(tmp_path, "n.csv", f"num,text,label\n{huge}1,a,x\n{huge}2,b,y\n-0,c,x\n".encode())
    assert [(e.text, e.text_pair) for e in SentenceTask().read(path)] == [("a", None), ("b", None), ("c", None)]
    assert "text='text', text pair=none, label='label' (skipped identifier column 'num';" in capsys.readouterr().out
    # "007" and "+7" are the same integer: not unique, so 'num' is a text column (text and pair inferred).
    path = _write(tmp_path, "d.csv", f"num,text,label\n{huge}1,a,x\n007,b,y\n+7,c,x\n".encode())
    assert [e.text_pair for e in SentenceTask().read(path)] == ["a", "b", "c"]
    assert "text='num', text pair='text'" in capsys.readouterr().out
