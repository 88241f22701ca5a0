"""Converters to the joint format (`bert_ft_tasks.joint`), and back where a benchmark scores its own way.

SemEval-2010 Task 8 (`semeval_to_joint`): the two marked nominals become entities "e1" and "e2" of one type,
`nominal`; `Cause-Effect(e2,e1)` becomes {"head": "e2", "tail": "e1", "label": "Cause-Effect"} (the relation's first
argument is its head); `Other` becomes no relation. The way back for the official scorer (`semeval_label`): of the
predicted relations between the two nominals, the most probable one gives `label(e1,e2)` when its head is e1 and
`label(e2,e1)` when its head is e2; no predicted relation between them is `Other`.

`run_task.py convert --input_format semeval2010 --input_file TRAIN_FILE.TXT --output_file train.jsonl` writes a file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterator

from bert_ft.config import flag
from bert_ft.data import check_text_file, iter_text_lines
from bert_ft.errors import DataError, UsageError
from bert_ft.io import atomic_write_lines
from bert_ft.plugins import Command

from .relation import DIRECTED, OTHER, SEMEVAL_TYPES, RelationExample, read_semeval, unmark

NOMINAL = "nominal"  # the one entity type of converted SemEval-2010 data
INPUT_FORMATS = ("semeval2010",)


def semeval_to_joint(example: RelationExample) -> dict:
    """One SemEval-2010 Task 8 record (as `read_semeval` reads it) as a joint record."""
    text, head, tail = unmark(example.text, example.path, example.line)
    record = {"id": example.id, "text": text,
              "entities": [{"id": "e1", "start": head[0], "end": head[1], "type": NOMINAL},
                           {"id": "e2", "start": tail[0], "end": tail[1], "type": NOMINAL}],
              "relations": []}
    match = DIRECTED.match(example.label or "")
    if match and match.group(1) in SEMEVAL_TYPES:
        first, second = ("e1", "e2") if match.group(2) == "e1,e2" else ("e2", "e1")
        record["relations"].append({"head": first, "tail": second, "label": match.group(1)})
    elif example.label != OTHER:
        raise DataError(example.path, example.line, f"label {example.label!r} is not a SemEval-2010 Task 8 label",
                        f"labels are {OTHER} or TYPE(e1,e2) / TYPE(e2,e1) with TYPE one of {', '.join(SEMEVAL_TYPES)}")
    return record


def semeval_gold_label(record: dict) -> str:
    """The SemEval label of a converted (or hand-made) joint record with entities e1 and e2."""
    relations = record.get("relations", [])
    if not relations:
        return OTHER
    relation = relations[0]
    return f"{relation['label']}({relation['head']},{relation['tail']})"


def semeval_label(relations: list[tuple[str, str, float]]) -> str:
    """The official-scorer label from the predicted relations between the two nominals, each (head id "e1" or
    "e2", relation type, probability): the most probable one, `TYPE(e1,e2)` with head e1, `TYPE(e2,e1)` with head
    e2; none is `Other`."""
    if not relations:
        return OTHER
    head, label, _ = max(relations, key=lambda relation: relation[2])
    return f"{label}({head},{'e2' if head == 'e1' else 'e1'})"


def is_semeval_joint(records: list[dict]) -> bool:
    """Whether joint records are converted SemEval-2010 data: two `nominal` entities e1 and e2 per record and
    SemEval relation types only (then the official score applies)."""
    return bool(records) and all(
        [entity.get("id") for entity in record["entities"]] == ["e1", "e2"]
        and all(entity.get("type", entity.get("label")) == NOMINAL for entity in record["entities"])
        and all(relation.get("label") in SEMEVAL_TYPES for relation in record.get("relations", []))
        for record in records)


def convert_semeval(path: str) -> Iterator[dict]:
    check_text_file(path)
    count = 0
    for example in read_semeval(path, iter_text_lines(path)):
        count += 1
        yield semeval_to_joint(example)
    if not count:
        raise DataError(path, None, "no SemEval-2010 records found", "give TRAIN_FILE.TXT or TEST_FILE_FULL.TXT")


@dataclass
class ConvertConfig:
    input_file: str = flag(None, "the file to convert (SemEval-2010 Task 8 release layout)")
    output_file: str | None = flag(None, "write the joint JSONL here (default: stdout)")
    input_format: str = flag("semeval2010", "the layout of --input_file", choices=INPUT_FORMATS)
    debug: bool = flag(False, "show full tracebacks on errors")


class ConvertCommand(Command):
    name = "convert"
    description = "convert SemEval-2010 Task 8 files to the joint JSONL format (entities + relations) that extract reads"
    config_type = ConvertConfig

    def problems(self, config: ConvertConfig) -> list[str]:
        return [] if config.input_file else ["--input_file: required (e.g. TRAIN_FILE.TXT of SemEval-2010 Task 8)"]

    def run(self, config: ConvertConfig, texts: list[str]) -> None:
        if config.input_format not in INPUT_FORMATS:
            raise UsageError(f"--input_format {config.input_format}: one of {', '.join(INPUT_FORMATS)}")
        lines = [json.dumps(record, ensure_ascii=False) for record in convert_semeval(config.input_file)]
        if config.output_file:
            atomic_write_lines(config.output_file, lines)
            print(f"wrote {len(lines)} joint records to {config.output_file}", file=sys.stderr)
        else:
            sys.stdout.write("".join(line + "\n" for line in lines))


COMMANDS = {"convert": ConvertCommand}
