"""The joint format: one JSON Lines record holds a text, all its entities and the relations between them.

    {"text": "Aspirin reduces the risk of stroke.",
     "entities": [{"id": "T1", "start": 0, "end": 7, "type": "DRUG"}, {"id": "T2", "start": 28, "end": 34, "type": "DISEASE"}],
     "relations": [{"head": "T1", "tail": "T2", "label": "prevents"}]}

Spans are character offsets, 0-based, end exclusive (`text[start:end]`), read by the one entities reader of the NER
task (`bert_ft_tasks.ner.entity_list_spans`: "type" or "label", an optional "text" that must match). What this
module adds is the `id` of each entity and the `relations`, whose `head` and `tail` are entity ids; in today's
one-pair relation JSONL they are `[start, end]` spans, which is how the readers tell the two apart (a record with
an `entities` list is a joint record). The head is the relation's first argument.

Public API (both tasks and the converters use it; nothing here imports a task, so the NER reader can call it):
  JointEntity, JointRelation, JointRecord   the validated record (entity ids as strings)
  joint_record(record, spans, path, line)   validate the ids and relations of a JSON record whose entity spans the
                                            entities reader has already read; DataError with file and line
  candidate_pairs(record, negative_label, max_negatives=None, seed=0)
                                            every ordered pair of entities (both orders) with its label: the
                                            relation's, else `negative_label`; negatives sampled down to
                                            `max_negatives` (seeded, reproducible); None = no negative pairs
`bert_ft_tasks.relation.joint_examples` turns the pairs into marked relation examples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from bert_ft.errors import DataError

JOINT_FIX = ('a joint record is {"text": "...", "entities": [{"id": "T1", "start": 0, "end": 7, "type": "DRUG"}, '
             '...], "relations": [{"head": "T1", "tail": "T2", "label": "treats"}]}: character offsets, end '
             "exclusive; head and tail name entity ids")


@dataclass(frozen=True)
class JointEntity:
    id: str  # as given (an integer id becomes its decimal string); "" when the entity has none
    start: int  # character offsets into the record's text, end exclusive
    end: int
    type: str


@dataclass(frozen=True)
class JointRelation:
    head: int  # index into JointRecord.entities (the relation's first argument)
    tail: int
    label: str


@dataclass
class JointRecord:
    text: str
    entities: list[JointEntity]
    relations: list[JointRelation] = field(default_factory=list)
    path: str = "input"  # the file and line, for messages
    line: int = 0
    id: str = ""  # the record's "id", else its line number

    def overlapping(self, first: int, second: int) -> bool:
        a, b = self.entities[first], self.entities[second]
        return max(a.start, b.start) < min(a.end, b.end)


def is_joint(record: dict) -> bool:
    """A relation-task record in the joint format (an `entities` list), not the one-pair layout."""
    return "entities" in record


def _entity_id(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def joint_record(record: dict, spans: list[tuple[int, int, str]], path: str, line: int) -> JointRecord:
    """The validated joint record of a JSON object whose `entities` the entities reader turned into `spans`
    ((start, end exclusive, type), one per entity, in order). Refuses, with file and line: an entity id that is not a
    string or integer, two entities with one id, `relations` that is not a list, a relation that is not
    {"head", "tail", "label"}, head/tail given as spans, an id that names no entity, a relation of an entity with
    itself or with an entity it overlaps (the two cannot both be marked), and one pair given two labels."""
    entities, index_of = [], {}
    for position, (raw, (start, end, entity_type)) in enumerate(zip(record["entities"], spans), start=1):
        given = raw.get("id") if isinstance(raw, dict) else None
        entity_id = "" if given is None else _entity_id(given)
        if entity_id is None or (given is not None and not entity_id.strip()):
            raise DataError(path, line, f"entity {position}: 'id' must be a non-empty string or an integer, got "
                            f"{json.dumps(given)[:60]}", JOINT_FIX)
        if entity_id and entity_id in index_of:
            raise DataError(path, line, f"entities {index_of[entity_id] + 1} and {position} have the same id "
                            f"{entity_id!r}", "give every entity of a record its own id")
        if entity_id:
            index_of[entity_id] = position - 1
        entities.append(JointEntity(entity_id, start, end, entity_type))
    relations_raw = record.get("relations", [])
    if not isinstance(relations_raw, list):
        raise DataError(path, line, f"'relations' must be a list, got {json.dumps(relations_raw)[:80]}", JOINT_FIX)
    relations, labels = [], {}
    for position, raw in enumerate(relations_raw, start=1):
        label = raw.get("label") if isinstance(raw, dict) else None
        if not (isinstance(raw, dict) and "head" in raw and "tail" in raw and isinstance(label, str)
                and label.strip()):
            raise DataError(path, line, f"relation {position} {json.dumps(raw)[:80]} is not "
                            '{"head": ID, "tail": ID, "label": "..."}', JOINT_FIX)
        ends = []
        for key in ("head", "tail"):
            value = raw[key]
            if isinstance(value, list):
                raise DataError(path, line, f"relation {position}: '{key}' is {json.dumps(value)[:40]}, a span; in "
                                "a joint record (one with 'entities') head and tail are entity ids",
                                "name the entities by their 'id', or drop 'entities' and 'relations' to write "
                                'one pair per record: {"text", "head": [start, end], "tail": [start, end], "label"}')
            entity_id = _entity_id(value)
            if entity_id is None or entity_id not in index_of:
                known = ", ".join(repr(name) for name in index_of) or "none (no entity has an 'id')"
                raise DataError(path, line, f"relation {position}: {key} {json.dumps(value)[:40]} names no entity "
                                f"of this record (ids: {known})", "use the 'id' of one of the record's entities")
            ends.append(index_of[entity_id])
        head, tail = ends
        if head == tail:
            raise DataError(path, line, f"relation {position}: head and tail are the same entity "
                            f"{entities[head].id!r}", "a relation links two different entities")
        if max(entities[head].start, entities[tail].start) < min(entities[head].end, entities[tail].end):
            raise DataError(path, line, f"relation {position}: entities {entities[head].id!r} and "
                            f"{entities[tail].id!r} overlap, so the two cannot both be marked in the text",
                            "relations link disjoint entities (end offsets are exclusive)")
        label = label.strip()
        if labels.get((head, tail), label) != label:
            raise DataError(path, line, f"relation {position}: the pair {entities[head].id!r} -> "
                            f"{entities[tail].id!r} already has the label {labels[head, tail]!r}, now {label!r}",
                            "give each ordered pair at most one label")
        if (head, tail) not in labels:
            labels[head, tail] = label
            relations.append(JointRelation(head, tail, label))
    record_id = record.get("id", line)
    return JointRecord(record["text"], entities, relations, path, line, str(record_id))


def candidate_pairs(record: JointRecord, negative_label: str | None, max_negatives: int | None = None,
                    seed: int = 0) -> list[tuple[int, int, str]]:
    """(head index, tail index, label) for every ordered pair of the record's entities that can be marked (the two
    spans disjoint), in order (head, then tail). A pair with a relation gets its label; every other pair, the
    reverse of a related pair included, gets `negative_label` (None: such pairs are left out). With
    `max_negatives`, at most that many negative pairs are kept per record, drawn with a generator seeded by `seed`
    and the record's line, so a file always gives the same examples."""
    related = {(relation.head, relation.tail): relation.label for relation in record.relations}
    pairs, negatives = [], []
    count = len(record.entities)
    for head in range(count):
        for tail in range(count):
            if head == tail or record.overlapping(head, tail):
                continue
            if (head, tail) in related:
                pairs.append((head, tail, related[head, tail]))
            elif negative_label is not None:
                negatives.append((head, tail, negative_label))
    if max_negatives is not None and len(negatives) > max_negatives:
        negatives = random.Random(seed * 1_000_003 + record.line).sample(negatives, max_negatives)
    return sorted(pairs + negatives, key=lambda pair: (pair[0], pair[1]))
