#!/usr/bin/env python
"""Entity-marker tokens + entity-start pooling (bert-ft) vs the plain Hugging Face [CLS] recipe, on SemEval-2010 Task 8.

Both systems get the same encoder, the same training/test slices, epochs, batch size, learning rate (one rate for all
parameters: no separate head rate), warmup ratio, weight decay, max_seq_length and seed:
  (1) bert-ft `relation --pooling entity_start`: <e1> </e1> <e2> </e2> added as special tokens, the hidden states at
      <e1> and <e2> concatenated (run through bert_ft.cli.main into a temporary run folder; numbers from metrics.json);
  (2) the plain recipe: AutoModelForSequenceClassification ([CLS] pooler + linear) trained by transformers.Trainer
      with DataCollatorWithPadding; the markers stay plain text (the tokenizer splits "<e1>" into '<', 'e', '##1', '>').
Both are scored with the same official SemEval-2010 Task 8 scorer (bert_ft.metrics.semeval_official_score).

    python benchmarks/relation_markers.py --max_train_samples 800 --max_test_samples 400 --num_train_epochs 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bert_ft.config import OFFLINE_DEFAULT_MODEL  # noqa: E402
from bert_ft.metrics import format_table, semeval_official_score  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "semeval2010_task8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--model_name_or_path", default=OFFLINE_DEFAULT_MODEL, help="encoder for both systems")
    parser.add_argument("--data_dir", default=DEFAULT_DATA, help="folder with TRAIN_FILE.TXT and TEST_FILE_FULL.TXT")
    parser.add_argument("--max_train_samples", type=int, default=800, help="first N training examples")
    parser.add_argument("--max_test_samples", type=int, default=400, help="first N test examples")
    parser.add_argument("--num_train_epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16, help="training batch size of both systems")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="one rate for encoder and head, both systems")
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def load_data(args):
    from bert_ft_tasks.relation import RelationTask

    task = RelationTask()
    train = task.read(os.path.join(args.data_dir, "TRAIN_FILE.TXT"))[:args.max_train_samples]
    test = task.read(os.path.join(args.data_dir, "TEST_FILE_FULL.TXT"))[:args.max_test_samples]
    return train, test, task.build_labels(train)


def run_bert_ft(args, folder: str) -> dict:
    from bert_ft.cli import main

    output_dir = os.path.join(folder, "bert_ft")
    start = time.perf_counter()
    code = main([
        "relation", "--pooling", "entity_start", "--model_name_or_path", args.model_name_or_path,
        "--train_file", os.path.join(args.data_dir, "TRAIN_FILE.TXT"),
        "--test_file", os.path.join(args.data_dir, "TEST_FILE_FULL.TXT"),
        "--max_train_samples", str(args.max_train_samples), "--max_eval_samples", str(args.max_test_samples),
        "--num_train_epochs", str(args.num_train_epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate), "--warmup_ratio", str(args.warmup_ratio),
        "--weight_decay", str(args.weight_decay), "--max_seq_length", str(args.max_seq_length),
        "--seed", str(args.seed), "--output_dir", output_dir, "--logging_steps", "10"])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bert-ft run failed with exit code {code}")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    with open(os.path.join(output_dir, "report.txt"), encoding="utf-8") as handle:
        long_lines = [line.strip() for line in handle if line.startswith("long sentences")]
    return {"system": "bert-ft relation: marker tokens, entity_start pooling", "macro_f1": metrics["test_macro_f1"],
            "accuracy": metrics["test_accuracy"], "micro_f1": metrics["test_micro_f1"],
            "train_seconds": metrics["train_runtime"], "wall_seconds": wall, "notes": "; ".join(long_lines)}


def run_hf_recipe(args, folder: str, train, test, labels) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from bert_ft.encoder import resolve_model_path

    start = time.perf_counter()
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    label_ids = {label: index for index, label in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids)

    def encode(examples):
        encoded = tokenizer([example.text for example in examples], truncation=True, max_length=args.max_seq_length)
        rows = [{key: encoded[key][index] for key in encoded} | {"labels": label_ids[example.label]}
                for index, example in enumerate(examples)]
        # Plain-text markers are 4 sub-words each, so truncation can cut them: count it.
        lost = sum(1 for row in rows if not all(marker in tokenizer.decode(row["input_ids"]).replace(" ", "")
                                                for marker in ("<e1>", "</e1>", "<e2>", "</e2>")))
        return rows, lost

    train_rows, _ = encode(train)
    test_rows, lost = encode(test)
    warmup = ({"warmup_ratio": args.warmup_ratio} if "warmup_ratio" in inspect.signature(TrainingArguments).parameters
              else {"warmup_steps": args.warmup_ratio})  # transformers 5: a float < 1 is a ratio
    training_args = TrainingArguments(
        output_dir=os.path.join(folder, "hf"), num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, lr_scheduler_type="linear", max_grad_norm=1.0, seed=args.seed,
        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=10,
        use_cpu=not torch.cuda.is_available(), **warmup)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_rows,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    result = trainer.train()
    logits = trainer.predict(test_rows).predictions
    predicted = [labels[int(index)] for index in np.asarray(logits).argmax(-1)]
    score = semeval_official_score([example.label for example in test], predicted)
    wall = time.perf_counter() - start
    return {"system": "HF AutoModelForSequenceClassification + Trainer: [CLS], markers as text",
            "macro_f1": score["macro_f1"], "accuracy": score["accuracy"], "micro_f1": score["micro_f1"],
            "train_seconds": result.metrics["train_runtime"], "wall_seconds": wall,
            "notes": f"{lost} test examples lost a marker to truncation"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("TRAIN_FILE.TXT", "TEST_FILE_FULL.TXT"):
        if not os.path.isfile(os.path.join(args.data_dir, name)):
            print(f"error: {os.path.join(args.data_dir, name)} not found (give --data_dir)", file=sys.stderr)
            return 2
    import torch

    train, test, labels = load_data(args)
    settings = (f"model {args.model_name_or_path}; train {len(train)} / test {len(test)} examples (first N of "
                f"{args.data_dir}); {args.num_train_epochs} epochs, batch {args.batch_size}, lr {args.learning_rate:g} "
                f"(all parameters), warmup {args.warmup_ratio:g}, weight decay {args.weight_decay:g}, max_seq_length "
                f"{args.max_seq_length}, seed {args.seed}; device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
                f"{torch.get_num_threads()} threads; {len(labels)} labels")
    with tempfile.TemporaryDirectory(prefix="relation_markers_") as folder:
        results = [run_bert_ft(args, folder), run_hf_recipe(args, folder, train, test, labels)]
    rows = [[result["system"], result["macro_f1"], result["accuracy"], result["micro_f1"],
             int(round(result["train_seconds"])), int(round(result["wall_seconds"]))] for result in results]
    table = format_table(rows, ["system", "official macro-F1", "accuracy", "micro-F1", "train s", "total s"])
    print("\n== relation markers benchmark ==")
    print(settings)
    print(table)
    for result in results:
        print(f"  {result['system']}: {result['notes']}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
