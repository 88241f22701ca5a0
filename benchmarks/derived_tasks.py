"""Multi-label and regression sentence tasks derived from CoNLL-2003's entity annotations (docs/sentence-tasks.md).

None of ../shared/data is multi-label or regression as released, but CoNLL-2003's entity tags give two honest
sentence-level tasks, derived at test or benchmark time (the text is never committed):
  multi_label  "which entity types does this sentence mention": the sorted set of PER / ORG / LOC / MISC among the
               sentence's tags ([] for a sentence without entities);
  regression   "what share of the sentence's words are inside entities": words with a tag other than O divided by
               the sentence's words, rounded to 4 decimals (written as a JSON float, so 0 and 1 read as 0.0 / 1.0).
The sentence is the words joined by single spaces; -DOCSTART- lines and empty sentences are skipped; the files
keep CoNLL order.

    python benchmarks/derived_tasks.py --out_dir /tmp/derived      # train/dev/test of both tasks as JSONL
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONLL = os.path.join(os.path.dirname(ROOT), "shared", "data", "conll2003")
SPLITS = {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}
ENTITY_TYPES = ("LOC", "MISC", "ORG", "PER")
KINDS = ("multi_label", "regression")


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    """(words, NER tags) per sentence of a CoNLL-2003 file (word first, tag last on each line)."""
    sentences, words, tags = [], [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if not parts:
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
            elif parts[0] != "-DOCSTART-":
                words.append(parts[0])
                tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def entity_types(tags: list[str]) -> list[str]:
    """The entity types a sentence mentions, sorted: the type part of every tag other than O."""
    return sorted({tag.split("-", 1)[1] for tag in tags if tag != "O" and "-" in tag})


def entity_share(tags: list[str]) -> float:
    """The share of words inside entities (tag other than O), rounded to 4 decimals."""
    return round(sum(tag != "O" for tag in tags) / len(tags), 4)


def derive(sentences: list[tuple[list[str], list[str]]], kind: str) -> list[dict]:
    """JSONL records {"sentence", "label"} of the derived task `kind` ("multi_label" or "regression")."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    label = entity_types if kind == "multi_label" else entity_share
    return [{"sentence": " ".join(words), "label": label(tags)} for words, tags in sentences]


def write_jsonl(path: str, records: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def write_derived(out_dir: str, conll_dir: str = CONLL, limits: dict[str, int] | None = None) -> dict:
    """Write {kind}_{split}.jsonl for both kinds and the three splits (the first `limits[split]` sentences of a
    split when given); returns {kind: {split: path}}."""
    paths: dict = {kind: {} for kind in KINDS}
    for split, name in SPLITS.items():
        sentences = read_conll(os.path.join(conll_dir, name))
        if limits and limits.get(split):
            sentences = sentences[:limits[split]]
        for kind in KINDS:
            paths[kind][split] = write_jsonl(os.path.join(out_dir, f"{kind}_{split}.jsonl"), derive(sentences, kind))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--conll_dir", default=CONLL)
    parser.add_argument("--max_sentences", type=int, help="the first N sentences of each split")
    args = parser.parse_args()
    limit = args.max_sentences
    paths = write_derived(args.out_dir, args.conll_dir, {split: limit for split in SPLITS} if limit else None)
    for kind, files in paths.items():
        for split, path in files.items():
            print(f"{kind:<12} {split:<6} {path}")


if __name__ == "__main__":
    main()
