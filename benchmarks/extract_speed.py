"""Extraction throughput (texts/s): `run_task.py extract`'s chain against the chain a user would write today.

    python benchmarks/extract_speed.py --ner_model_dir runs/extract_e2e/ner/model \
        --relation_model_dir runs/extract_e2e/relation/model            # the SemEval test texts (2717)
    python benchmarks/extract_speed.py ... --max_texts 64               # smoke test

Sides, on the same texts, the same CPU, one after the other (each timed from loaded and warmed-up models, on the
first 8 texts, to the last triple):
  extract   bert_ft_tasks.extract.Extractor: NER in packed batches, the candidate pairs of all texts marked and
            classified together in packed batches (--batch_size);
  baseline  the NER folder through transformers.pipeline("token-classification", aggregation_strategy="first"),
            called on the list of texts (its default batch size), then bert-ft's predict on the relation folder
            once per marked candidate pair (the model loaded once: bert_ft.prediction.predict_examples on one
            input; --baseline_reload calls bert_ft.predict, which loads the folder every time, as a script calling
            the API per pair would).
Both sides build the same candidate pairs (both orders within a sentence, type pairs the relation model never saw
skipped: Extractor.candidates), so the triples must agree; the script counts those that differ.
The texts are the SemEval-2010 test sentences (the converted joint file's "text"), or --input_file (one per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "semeval2010_task8")


def register_tasks() -> None:
    sys.argv = [os.path.join(ROOT, "run_task.py")]
    import run_task  # registers tasks/ as bert_ft_tasks, installed or not

    run_task.register_repository_tasks()


def semeval_texts() -> list[str]:
    from bert_ft.data import iter_text_lines
    from bert_ft_tasks.convert import semeval_to_joint
    from bert_ft_tasks.relation import read_semeval

    path = os.path.join(DATA, "TEST_FILE_FULL.TXT")
    return [semeval_to_joint(example)["text"] for example in read_semeval(path, iter_text_lines(path))]


def entities_set(entities_of) -> set:
    """(text index, start, end, type) of every entity."""
    return {(index, entity["start"], entity["end"], entity["type"])
            for index, entities in enumerate(entities_of) for entity in entities}


def triples_of(texts, entities_of, relations_of) -> set:
    """(text index, head span, tail span, label) of every extracted relation."""
    found = set()
    for index, (entities, relations) in enumerate(zip(entities_of, relations_of)):
        for relation in relations:
            head, tail = entities[relation["head"]], entities[relation["tail"]]
            found.add((index, (head["start"], head["end"]), (tail["start"], tail["end"]), relation["label"]))
    return found


def run_extract(extractor, texts: list[str]) -> tuple[float, set, set]:
    started = time.perf_counter()
    outputs = extractor.extract(texts)
    seconds = time.perf_counter() - started
    entities_of = [output["entities"] for output in outputs]
    return (seconds, triples_of(texts, entities_of, [output["relations"] for output in outputs]),
            entities_set(entities_of))


def run_baseline(extractor, texts: list[str], ner_dir: str, relation_dir: str, reload: bool
                 ) -> tuple[float, set, int, set]:
    from transformers import pipeline

    from bert_ft import predict
    from bert_ft.prediction import predict_examples
    from bert_ft_tasks.relation import mark_spans

    tagger = pipeline("token-classification", model=ner_dir, aggregation_strategy="first", device=-1)
    task, model, tokenizer = extractor.relation_task, extractor.relation_model, extractor.relation_tokenizer
    length = extractor.relation_meta.get("max_seq_length", 128)
    tagger(texts[:8])  # warm-up outside the timings, as for extract
    predict_examples(task, model, tokenizer, ["<e1>warm</e1> <e2>up</e2>"], length, 1)
    started = time.perf_counter()
    tagged = tagger(texts)
    entities_of, relations_of, calls = [], [], 0
    for text, found in zip(texts, tagged):
        entities = [{"start": int(entity["start"]), "end": int(entity["end"]), "type": entity["entity_group"]}
                    for entity in found]
        pairs = extractor.candidates(text, entities)
        results = []
        for head, tail in pairs:
            marked = mark_spans(text, (entities[head]["start"], entities[head]["end"]),
                                (entities[tail]["start"], entities[tail]["end"]))
            calls += 1
            if reload:
                results.append(predict(task, relation_dir, [marked])[0])
            else:
                results.append(predict_examples(task, model, tokenizer, [marked], length, 1)[0])
        entities_of.append(entities)
        relations_of.append(extractor.relate(text, entities, pairs, results))
    seconds = time.perf_counter() - started
    return seconds, triples_of(texts, entities_of, relations_of), calls, entities_set(entities_of)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ner_model_dir", default=os.path.join(ROOT, "runs", "extract_e2e", "ner", "model"))
    parser.add_argument("--relation_model_dir", default=os.path.join(ROOT, "runs", "extract_e2e", "relation", "model"))
    parser.add_argument("--input_file", default=None, help="texts, one per line (default: the SemEval test texts)")
    parser.add_argument("--max_texts", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--baseline_reload", action="store_true",
                        help="the baseline calls bert_ft.predict per pair (loading the folder each time)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_tasks()
    from bert_ft_tasks.extract import Extractor

    if args.input_file:
        with open(args.input_file, encoding="utf-8") as handle:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
    else:
        texts = semeval_texts()
    texts = texts[:args.max_texts] if args.max_texts else texts
    extractor = Extractor(args.ner_model_dir, args.relation_model_dir, batch_size=args.batch_size)
    extractor.extract(texts[:8])  # warm-up outside the timings: the packing check, the first kernels
    extractor.stats = type(extractor.stats)()
    ours, our_triples, our_entities = run_extract(extractor, texts)
    stats = extractor.stats
    theirs, their_triples, calls, their_entities = run_baseline(extractor, texts, args.ner_model_dir, args.relation_model_dir,
                                               args.baseline_reload)
    differing = len(our_triples ^ their_triples)
    print(f"texts: {len(texts)}; entities {stats.entities}; candidate pairs {stats.pairs_classified} (baseline: "
          f"{calls} relation calls); torch threads {torch.get_num_threads()}")
    print("| chain | seconds | texts/s |\n|---|---|---|")
    print(f"| bert-ft extract (packed batches of {args.batch_size}) | {ours:.2f} | {len(texts) / ours:.1f} |")
    baseline = ("pipeline + bert_ft.predict per pair (reloads)" if args.baseline_reload else
                "pipeline + bert-ft predict per pair (model loaded once)")
    print(f"| {baseline} | {theirs:.2f} | {len(texts) / theirs:.1f} |")
    print(f"speed-up: {theirs / ours:.2f}x; triples: extract {len(our_triples)}, baseline {len(their_triples)}, "
          f"differing {differing}; entities differing {len(our_entities ^ their_entities)}")
    print(json.dumps({"texts": len(texts), "extract_seconds": ours, "baseline_seconds": theirs,
                      "speedup": theirs / ours, "triples": len(our_triples), "differing_triples": differing,
                      "differing_entities": len(our_entities ^ their_entities)}))


if __name__ == "__main__":
    main()
