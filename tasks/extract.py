"""Relation triples from raw text: an NER model folder tags the entities, a relation model folder classifies the
ordered pairs of entities within each sentence; and the chain scored end to end against a joint file.

    run_task.py extract --ner_model_dir NER/model --relation_model_dir REL/model "Aspirin prevents strokes."
    run_task.py extract ... --test_file test.jsonl --output_dir eval/      (metrics.json, report.txt)

Output, one JSON object per input text: {"text", "entities": [{"text", "type", "start", "end", "score",
"probability"}], "relations": [{"head", "tail", "label", "probability"}]}; head and tail index `entities`, offsets are
character offsets into the input as given (end exclusive), and the relation model's negative label is never output.

Candidate pairs: both orders of every two entities of one sentence (`--pair_scope text`: of the whole text), less the
(head type, tail type) pairs that never carried a relation in the relation model's training data (recorded in its
bert_ft.json by a joint-trained model; `--keep_unseen_type_pairs` keeps them). A relation model with SemEval-style
directed labels (`X(e2,e1)`) gives the triple in the direction its label names.

Python: `Extractor(ner_model_dir, relation_model_dir).extract(texts)`, or `extract(ner_model_dir,
relation_model_dir, texts)`; `evaluate_extraction(extractor, test_file)` gives the metrics and the report.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from bert_ft.config import flag
from bert_ft.data import iter_text_lines, read_jsonl_records
from bert_ft.errors import DataError, UsageError
from bert_ft.io import atomic_write_json, atomic_write_text
from bert_ft.metrics import format_table, relation_f1, semeval_official_score
from bert_ft.model_folder import load_model, read_meta
from bert_ft.plugins import Command
from bert_ft.prediction import predict_examples, read_inputs, write_results

from .convert import is_semeval_joint, semeval_gold_label, semeval_label
from .joint import JointRecord, candidate_pairs
from .ner import NerOptions, NerTask
from .relation import (DIRECTED, JOINT_NEGATIVE, OTHER, RelationOptions, RelationTask, mark_spans, read_joint,
                       resolve_negative_label)

PAIR_SCOPES = ("sentence", "text")
# A sentence ends after . ! ? (and closing quotes or brackets) followed by whitespace, after CJK full stops, and at a
# line break. Simple on purpose: "Dr. Smith" is split too; --pair_scope text pairs across the whole text instead.
SENTENCE_BREAK = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]+|\n+")


def sentence_starts(text: str) -> list[int]:
    """Character offsets where the sentences of `text` start (the first is 0)."""
    return [0] + [match.end() for match in SENTENCE_BREAK.finditer(text) if match.end() < len(text)]


@dataclass
class ExtractStats:
    """What one `extract` call did: counts for the screen and the evaluation report."""
    texts: int = 0
    entities: int = 0
    pairs_classified: int = 0
    skipped_unseen_type_pairs: int = 0
    skipped_other_sentence: int = 0
    relations: int = 0
    seconds: float = 0.0
    skipped_type_pairs: Counter = field(default_factory=Counter)

    def line(self) -> str:
        rate = f"; {self.texts / self.seconds:.1f} texts/s" if self.seconds else ""
        return (f"extract: {self.texts} texts, {self.entities} entities, {self.pairs_classified} candidate pairs "
                f"classified ({self.skipped_unseen_type_pairs} skipped: type pair never related in the relation "
                f"model's training data; {self.skipped_other_sentence} across sentences not paired), "
                f"{self.relations} relations{rate}")


def _model_folder(folder: str, flag_name: str, task_name: str) -> dict:
    if not folder or not os.path.isdir(folder):
        raise UsageError(f"--{flag_name} {folder}: no such folder (give RUN/model of a finished {task_name} run)")
    meta = read_meta(folder)
    if meta.get("task") != task_name:
        raise UsageError(f"--{flag_name} {folder}: a {meta.get('task')} model folder, not a {task_name} one")
    return meta


class Extractor:
    """The NER model and the relation model of one chain, loaded once; `extract(texts)` per batch of texts."""

    def __init__(self, ner_model_dir: str, relation_model_dir: str, keep_unseen_type_pairs: bool = False,
                 pair_scope: str = "sentence", batch_size: int = 64, max_seq_length: int | None = None,
                 packing: bool = True) -> None:
        if pair_scope not in PAIR_SCOPES:
            raise UsageError(f"--pair_scope: one of {', '.join(PAIR_SCOPES)}, got {pair_scope!r}")
        ner_meta = _model_folder(ner_model_dir, "ner_model_dir", "ner")
        relation_meta = _model_folder(relation_model_dir, "relation_model_dir", "relation")
        self.ner_task = NerTask(NerOptions(**ner_meta.get("task_options", {})))
        self.relation_task = RelationTask(RelationOptions(**relation_meta.get("task_options", {})))
        self.ner_model, self.ner_tokenizer, self.ner_meta = load_model(ner_model_dir, NerTask)
        self.relation_model, self.relation_tokenizer, self.relation_meta = load_model(relation_model_dir,
                                                                                      RelationTask)
        labels = self.relation_model.labels
        self.negative = self.relation_meta.get("negative_label", resolve_negative_label(
            self.relation_task.options.negative_label, labels))
        pairs = self.relation_meta.get("type_pairs")
        # None: the relation model was trained on one-pair data and knows no entity types, so nothing is filtered.
        self.related_type_pairs = None if pairs is None else {
            (pair["head"], pair["tail"]) for pair in pairs if pair["relations"]}
        self.keep_unseen_type_pairs, self.pair_scope = keep_unseen_type_pairs, pair_scope
        self.batch_size, self.max_seq_length, self.packing = batch_size, max_seq_length, packing
        self.stats = ExtractStats()

    def notes(self) -> list[str]:
        """What the user should know about this pair of models (for the screen and the report)."""
        found = []
        if self.related_type_pairs is None:
            found.append("the relation model records no entity types (trained on one-pair data): every type pair "
                         "is classified")
        else:
            ner_types = set(self.ner_meta.get("entity_types", []))
            known = set(self.relation_meta.get("entity_types", []))
            if ner_types and known and not ner_types & known:
                found.append(f"the NER model's entity types {sorted(ner_types)} and the relation model's "
                             f"{sorted(known)} have none in common: every pair is skipped unless "
                             "--keep_unseen_type_pairs")
        return found

    def _length(self, meta: dict) -> int:
        return self.max_seq_length or meta.get("max_seq_length", 128)

    def tag(self, texts: list[str]) -> list[list[dict]]:
        """The NER model's entities of each text (character offsets into the text as given)."""
        results = predict_examples(self.ner_task, self.ner_model, self.ner_tokenizer, list(texts),
                                   self._length(self.ner_meta), self.batch_size, pack=self.packing)
        return [result["entities"] for result in results]

    def classify(self, marked: list[str], pack: bool | None = None) -> list[dict]:
        """The relation model's result ({"label", "probability", "probabilities"}) for each marked text."""
        if not marked:
            return []
        return predict_examples(self.relation_task, self.relation_model, self.relation_tokenizer, list(marked),
                                self._length(self.relation_meta), self.batch_size,
                                pack=self.packing if pack is None else pack)

    def candidates(self, text: str, entities: Sequence[dict]) -> list[tuple[int, int]]:
        """The ordered entity pairs (head index, tail index) of `text` to classify."""
        starts = sentence_starts(text) if self.pair_scope == "sentence" else [0]
        sentence = [bisect.bisect_right(starts, entity["start"]) - 1 for entity in entities]
        pairs = []
        for head, first in enumerate(entities):
            for tail, second in enumerate(entities):
                if head == tail or max(first["start"], second["start"]) < min(first["end"], second["end"]):
                    continue
                if sentence[head] != sentence[tail]:
                    self.stats.skipped_other_sentence += 1
                    continue
                kinds = (first["type"], second["type"])
                if (self.related_type_pairs is not None and not self.keep_unseen_type_pairs
                        and kinds not in self.related_type_pairs):
                    self.stats.skipped_unseen_type_pairs += 1
                    self.stats.skipped_type_pairs[kinds] += 1
                    continue
                pairs.append((head, tail))
        return pairs

    def triples(self, pair: tuple[int, int], result: dict) -> tuple[int, int, str, float] | None:
        """(head, tail, label, probability) that the relation model's result on the marked pair says, or None for
        the negative label. A directed label X(e2,e1) names the marked tail as the head."""
        label, probability = str(result["label"]), float(result["probability"])
        if label == self.negative:
            return None
        head, tail = pair
        match = DIRECTED.match(label)
        if match:
            label = match.group(1)
            if match.group(2) == "e2,e1":
                head, tail = tail, head
        return head, tail, label, probability

    def relate(self, text: str, entities: Sequence[dict], pairs: list[tuple[int, int]], results: list[dict]
               ) -> list[dict]:
        """The relations of one text from its classified pairs: one per (head, tail), the most probable label."""
        best: dict[tuple[int, int], tuple[str, float]] = {}
        for pair, result in zip(pairs, results):
            found = self.triples(pair, result)
            if found is not None:
                head, tail, label, probability = found
                if (head, tail) not in best or probability > best[head, tail][1]:
                    best[head, tail] = (label, probability)
        return [{"head": head, "tail": tail, "label": label, "probability": round(probability, 6)}
                for (head, tail), (label, probability) in sorted(best.items())]

    def extract(self, inputs: Sequence[Any]) -> list[dict]:
        """One {"text", "entities", "relations"} per input (a string, or {"text", "id"?}), in input order."""
        started = time.perf_counter()
        texts, ids = [], []
        for number, item in enumerate(inputs, start=1):
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise DataError("input", number, f"expected a text or an object with a string 'text', got "
                                f"{type(item).__name__}", 'give a line of text or {"text": "..."}')
            texts.append(text)
            ids.append(item.get("id") if isinstance(item, dict) else None)
        entities_of = self.tag(texts) if texts else []
        pairs_of = [self.candidates(text, entities) for text, entities in zip(texts, entities_of)]
        marked = [mark_spans(text, (entities[head]["start"], entities[head]["end"]),
                             (entities[tail]["start"], entities[tail]["end"]))
                  for text, entities, pairs in zip(texts, entities_of, pairs_of) for head, tail in pairs]
        flat = self.classify(marked)
        outputs, position = [], 0
        for text, record_id, entities, pairs in zip(texts, ids, entities_of, pairs_of):
            results = flat[position:position + len(pairs)]
            position += len(pairs)
            relations = self.relate(text, entities, pairs, results)
            output = {"text": text, "entities": entities, "relations": relations}
            if record_id is not None:
                output = {"id": record_id, **output}
            outputs.append(output)
            self.stats.entities += len(entities)
            self.stats.relations += len(relations)
        self.stats.texts += len(texts)
        self.stats.pairs_classified += len(marked)
        self.stats.seconds += time.perf_counter() - started
        return outputs


def extract(ner_model_dir: str, relation_model_dir: str, inputs: Sequence[Any], **options: Any) -> list[dict]:
    """The Python API of `run_task.py extract`: relation triples of raw texts (strings or {"text", "id"?}).
    `options`: keep_unseen_type_pairs, pair_scope, batch_size, max_seq_length, packing (as `Extractor`)."""
    return Extractor(ner_model_dir, relation_model_dir, **options).extract(inputs)


# ------------------------------------------------------------------------------------------- evaluation

def _prf(hits: int, predicted: int, gold: int) -> dict:
    precision = hits / predicted if predicted else 0.0
    recall = hits / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted": predicted, "gold": gold}


def _set_score(gold: set, predicted: set) -> dict:
    return _prf(len(gold & predicted), len(predicted), len(gold))


def read_joint_file(path: str) -> tuple[list[dict], list[JointRecord]]:
    """The raw records and the validated joint records of a joint JSONL file (DataError with file and line)."""
    raw, records = [], []
    for number, record in read_jsonl_records(path, iter_text_lines(path)):
        if "entities" not in record:
            raise DataError(path, number, f"not a joint record (keys {sorted(record)})",
                            '--test_file takes joint records: {"text", "entities": [{"id", "start", "end", "type"}], '
                            '"relations": [{"head", "tail", "label"}]}')
        raw.append(record)
        records.append(read_joint(record, path, number))
    if not records:
        raise DataError(path, None, "no joint records found", "give a joint JSONL file")
    return raw, records


def evaluate_extraction(extractor: Extractor, test_file: str) -> tuple[dict, str, list[dict]]:
    """Score the chain on a joint file: (metrics, report text, the extraction of each record).

    strict triples: head span and type, tail span and type, label and direction all exact; boundaries: the same
    without the types; NER: exact (start, end, type); relation with gold entities: the relation model alone on
    every ordered pair of gold entities (relation_f1 over the relation labels, the negative excluded); on converted
    SemEval-2010 data also the official macro-F1 of the end-to-end output and of the gold-entity pairs."""
    raw, records = read_joint_file(test_file)
    outputs = extractor.extract([{"text": record.text} for record in records])
    gold_triples, pred_triples, gold_bounds, pred_bounds, gold_entities, pred_entities = (set() for _ in range(6))
    per_label_gold, per_label_pred = Counter(), Counter()
    per_label_hits = Counter()
    for index, (record, output) in enumerate(zip(records, outputs)):
        for entity in record.entities:
            gold_entities.add((index, entity.start, entity.end, entity.type))
        for entity in output["entities"]:
            pred_entities.add((index, entity["start"], entity["end"], entity["type"]))
        gold_here = {(index, (record.entities[r.head].start, record.entities[r.head].end, record.entities[r.head].type),
                      (record.entities[r.tail].start, record.entities[r.tail].end, record.entities[r.tail].type),
                      r.label) for r in record.relations}
        ents = output["entities"]
        pred_here = {(index, (ents[r["head"]]["start"], ents[r["head"]]["end"], ents[r["head"]]["type"]),
                      (ents[r["tail"]]["start"], ents[r["tail"]]["end"], ents[r["tail"]]["type"]), r["label"])
                     for r in output["relations"]}
        gold_triples |= gold_here
        pred_triples |= pred_here
        gold_bounds |= {(i, h[:2], t[:2], label) for i, h, t, label in gold_here}
        pred_bounds |= {(i, h[:2], t[:2], label) for i, h, t, label in pred_here}
        for triple in gold_here:
            per_label_gold[triple[3]] += 1
            per_label_hits[triple[3]] += triple in pred_here
        for triple in pred_here:
            per_label_pred[triple[3]] += 1
    strict, bounds, ner = (_set_score(gold_triples, pred_triples), _set_score(gold_bounds, pred_bounds),
                           _set_score(gold_entities, pred_entities))

    # The relation model alone, on every ordered pair of the gold entities (what the chain would score with a
    # perfect tagger): the same pairs as relation training builds from the file.
    negative = extractor.negative or JOINT_NEGATIVE
    pairs_of = [candidate_pairs(record, negative) for record in records]
    marked = [mark_spans(record.text, (record.entities[head].start, record.entities[head].end),
                         (record.entities[tail].start, record.entities[tail].end))
              for record, pairs in zip(records, pairs_of) for head, tail, _ in pairs]
    results = extractor.classify(marked)
    gold_labels, pred_labels, semeval_gold, semeval_pred_gold_entities = [], [], [], []
    semeval = is_semeval_joint(raw)
    position = 0
    for record, pairs, raw_record in zip(records, pairs_of, raw):
        entities = [{"start": entity.start, "end": entity.end, "type": entity.type} for entity in record.entities]
        relations = extractor.relate(record.text, entities, [(head, tail) for head, tail, _ in pairs],
                                     results[position:position + len(pairs)])
        position += len(pairs)
        predicted = {(found["head"], found["tail"]): found["label"] for found in relations}
        for head, tail, label in pairs:
            gold_labels.append(label)
            pred_labels.append(predicted.get((head, tail), negative))
        if semeval:
            semeval_gold.append(semeval_gold_label(raw_record))
            semeval_pred_gold_entities.append(semeval_label(
                [(record.entities[found["head"]].id, found["label"], found["probability"]) for found in relations]))
    relation = relation_f1(gold_labels, pred_labels, negative)

    metrics = {"triple_precision": strict["precision"], "triple_recall": strict["recall"], "triple_f1": strict["f1"],
               "boundary_triple_precision": bounds["precision"], "boundary_triple_recall": bounds["recall"],
               "boundary_triple_f1": bounds["f1"], "ner_precision": ner["precision"], "ner_recall": ner["recall"],
               "ner_f1": ner["f1"], "relation_gold_entities_macro_f1": relation["macro_f1"],
               "relation_gold_entities_micro_f1": relation["micro_f1"], "texts": len(records),
               "gold_triples": strict["gold"], "predicted_triples": strict["predicted"],
               "texts_per_second": extractor.stats.texts / extractor.stats.seconds if extractor.stats.seconds else 0.0}
    official_lines = []
    if semeval:
        e2e_pred = []
        for record, output in zip(records, outputs):
            spans = {(entity.start, entity.end): entity.id for entity in record.entities}
            ids = [spans.get((entity["start"], entity["end"])) for entity in output["entities"]]
            e2e_pred.append(semeval_label([(ids[r["head"]], r["label"], r["probability"]) for r in output["relations"]
                                           if ids[r["head"]] and ids[r["tail"]]]))
        e2e = semeval_official_score(semeval_gold, e2e_pred, OTHER)
        gold_entity_score = semeval_official_score(semeval_gold, semeval_pred_gold_entities, OTHER)
        metrics["semeval_official_macro_f1_e2e"] = e2e["macro_f1"]
        metrics["semeval_official_macro_f1_gold_entities"] = gold_entity_score["macro_f1"]
        official_lines = [
            "",
            "SemEval-2010 Task 8 official score ((9+1)-way, directions counted, Other excluded, macro over the gold "
            "types):",
            f"  end to end (predicted nominals; a missed nominal makes the pair Other): macro-F1 = {e2e['macro_f1']:.4f}",
            f"  relation model on the gold nominals:                                   macro-F1 = "
            f"{gold_entity_score['macro_f1']:.4f}"]

    rows = [["triples, strict (spans, types, label, direction)", strict["precision"], strict["recall"], strict["f1"],
             strict["gold"], strict["predicted"]],
            ["triples, boundaries only (spans, label, direction)", bounds["precision"], bounds["recall"],
             bounds["f1"], bounds["gold"], bounds["predicted"]],
            ["NER (exact span and type)", ner["precision"], ner["recall"], ner["f1"], ner["gold"], ner["predicted"]],
            ["relation with gold entities (micro, negative excluded)", relation["micro_precision"],
             relation["micro_recall"], relation["micro_f1"], sum(v["support"] for v in relation["per_type"].values()),
             ""]]
    label_rows = []
    for label in sorted(set(per_label_gold) | set(per_label_pred)):
        score = _prf(per_label_hits[label], per_label_pred[label], per_label_gold[label])
        label_rows.append([label, score["precision"], score["recall"], score["f1"], score["gold"], score["predicted"]])
    stats = extractor.stats
    report = "\n".join([
        f"end-to-end extraction on {test_file} ({len(records)} texts)",
        f"NER model {extractor.ner_meta.get('entity_types', '?')}; relation model labels {extractor.relation_model.labels} "
        f"(negative: {extractor.negative})",
        "",
        format_table(rows, ["stage", "P", "R", "F1", "gold", "predicted"]),
        f"relation with gold entities: macro-F1 over the relation labels = {relation['macro_f1']:.4f} "
        f"({negative} excluded)",
        *official_lines,
        "",
        "strict triples per relation label:",
        format_table(label_rows, ["label", "P", "R", "F1", "gold", "predicted"]) if label_rows else "  (none)",
        "",
        f"candidate pairs classified: {stats.pairs_classified}; skipped as never related in the "
        f"relation model's training data: {stats.skipped_unseen_type_pairs}"
        + (f" ({', '.join(f'{h}->{t}: {n}' for (h, t), n in stats.skipped_type_pairs.most_common(5))})"
           if stats.skipped_type_pairs else "")
        + f"; across sentences: {stats.skipped_other_sentence}",
        *extractor.notes(),
    ])
    return metrics, report, outputs


# ------------------------------------------------------------------------------------------- command line

@dataclass
class ExtractConfig:
    ner_model_dir: str = flag(None, "an NER model folder (RUN/model of `run_task.py ner`)")
    relation_model_dir: str = flag(None, "a relation model folder (RUN/model of `run_task.py relation`)")
    input_file: str | None = flag(None, "one text per line, or JSONL with \"text\" (and \"id\"); default: the text "
                                  "arguments, else stdin")
    output_file: str | None = flag(None, "write the extractions (JSONL, one per text) here (default: stdout)")
    test_file: str | None = flag(None, "a joint JSONL file to score the chain on (needs --output_dir)")
    output_dir: str | None = flag(None, "where --test_file's metrics.json, report.txt and predictions go")
    overwrite_output_dir: bool = flag(False, "replace the scores already in --output_dir")
    pair_scope: str = flag("sentence", "pair entities of one sentence, or of the whole text", choices=PAIR_SCOPES)
    keep_unseen_type_pairs: bool = flag(False, "also classify entity pairs whose (head type, tail type) never "
                                        "carried a relation in the relation model's training data")
    batch_size: int = flag(64, "texts (NER) and marked pairs (relation) per forward pass")
    max_seq_length: int | None = flag(None, "window size in sub-words (default: each model's training value)")
    packing: bool = flag(True, "several inputs per row (checked against padding first, as training does)")
    debug: bool = flag(False, "show full tracebacks on errors")


class ExtractCommand(Command):
    name = "extract"
    description = ("relation triples from raw text: an NER model tags entities, a relation model classifies the "
                   "pairs of each sentence; --test_file scores the chain end to end")
    config_type = ExtractConfig
    takes_texts = True
    epilog = ("output: one JSON object per text: {text, entities: [{text, type, start, end, score, probability}], "
              "relations: [{head, tail, label, probability}]}; head and tail index entities; start/end are character "
              "offsets into the text as given (end exclusive)")

    def problems(self, config: ExtractConfig) -> list[str]:
        found = []
        for name in ("ner_model_dir", "relation_model_dir"):
            if not getattr(config, name):
                found.append(f"--{name}: required (RUN/model of a finished run)")
        if config.test_file and not config.output_dir:
            found.append("--test_file: needs --output_dir (where metrics.json and report.txt go)")
        if config.output_dir and not config.test_file:
            found.append("--output_dir: only with --test_file (extractions go to --output_file or stdout)")
        if config.batch_size < 1:
            found.append(f"--batch_size: must be >= 1, got {config.batch_size}")
        return found

    def run(self, config: ExtractConfig, texts: list[str]) -> None:
        if config.test_file and (texts or config.input_file):
            raise UsageError("--test_file scores the chain on the file's texts: drop the text arguments and "
                             "--input_file (or drop --test_file to extract from them)")
        extractor = Extractor(config.ner_model_dir, config.relation_model_dir, config.keep_unseen_type_pairs,
                              config.pair_scope, config.batch_size, config.max_seq_length, config.packing)
        for note in extractor.notes():
            print(f"note: {note}", file=sys.stderr)
        if config.test_file:
            self.evaluate(extractor, config)
            return
        results = extractor.extract(read_inputs(texts, config.input_file))
        write_results(results, config.output_file, "extractions")
        print(extractor.stats.line(), file=sys.stderr)

    @staticmethod
    def evaluate(extractor: Extractor, config: ExtractConfig) -> None:
        if os.path.isfile(config.output_dir):
            raise UsageError(f"--output_dir {config.output_dir}: is a file, not a folder")
        metrics_path = os.path.join(config.output_dir, "metrics.json")
        if os.path.exists(metrics_path) and not config.overwrite_output_dir:
            raise UsageError(f"--output_dir {config.output_dir}: already holds metrics.json; add "
                             "--overwrite_output_dir to replace it, or give another folder")
        metrics, report, outputs = evaluate_extraction(extractor, config.test_file)
        os.makedirs(config.output_dir, exist_ok=True)
        atomic_write_json(metrics_path, metrics)
        atomic_write_text(os.path.join(config.output_dir, "report.txt"), report + "\n")
        atomic_write_text(os.path.join(config.output_dir, "predictions.jsonl"),
                          "".join(json.dumps(output, ensure_ascii=False) + "\n" for output in outputs))
        print(report)
        print(f"wrote metrics.json, report.txt and predictions.jsonl to {config.output_dir}")


COMMANDS = {"extract": ExtractCommand}
