"""SemEval-2010 Task 8 end to end: convert, train the nominal tagger and the relation model from one joint file, score
the chain with `run_task.py extract --test_file`, print the table of docs/extraction.md.

    python benchmarks/extract_e2e.py                                   # full data (the docs' table)
    python benchmarks/extract_e2e.py --max_train_samples 64 --max_test_samples 64 --num_train_epochs 1   # smoke test

Every step is the user's command (printed before it runs), one subprocess each, with the packaged MiniLM:
  1. run_task.py convert  TRAIN_FILE.TXT and TEST_FILE_FULL.TXT -> joint JSONL (two `nominal` entities per record)
  2. run_task.py ner      on the joint train file (its entities), 10 % held out for model selection
  3. run_task.py relation on the same joint file (both orders of the two nominals: one related, one negative)
  4. run_task.py extract  --test_file the joint test file: NER F1 of the nominals, the relation model on the gold
                          nominals (official macro-F1), end-to-end strict triple F1 and official macro-F1
  5. (--one_pair) run_task.py relation on the release itself: today's one-pair task, the README's SemEval row
The slices (--max_train_samples, --max_test_samples) take the first records of each file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "semeval2010_task8")
TRAINING = ["--learning_rate", "1e-4", "--head_learning_rate", "1e-3", "--per_device_train_batch_size", "16",
            "--max_seq_length", "128", "--validation_split", "0.1", "--report_to", "none"]


def command(arguments: list[str], log: str) -> float:
    """Run `run_task.py ARGUMENTS` (printed first), its output into `log`; seconds taken. Exits on failure."""
    print("$ python run_task.py " + " ".join(arguments), flush=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "run_task.py"), *arguments], cwd=ROOT,
                              stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        with open(log, encoding="utf-8") as handle:
            sys.exit(f"failed ({done.returncode}) after {seconds:.0f} s; the end of {log}:\n{handle.read()[-3000:]}")
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def first_lines(path: str, count: int | None, target: str) -> str:
    """The first `count` JSONL records of `path` in `target` (all of them with None)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    with open(target, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in (lines[:count] if count else lines)))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "extract_e2e"))
    parser.add_argument("--max_train_samples", type=int, default=None, help="first N SemEval training records")
    parser.add_argument("--max_test_samples", type=int, default=None, help="first N SemEval test records")
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--one_pair", action="store_true", help="also train today's one-pair relation task")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    work = lambda name: os.path.join(args.work_dir, name)  # noqa: E731
    epochs = ["--num_train_epochs", str(args.num_train_epochs), "--seed", str(args.seed)]
    seconds = {}
    for split, source in (("train", "TRAIN_FILE.TXT"), ("test", "TEST_FILE_FULL.TXT")):
        command(["convert", "--input_file", os.path.join(DATA, source), "--output_file", work(f"{split}_all.jsonl")],
                work(f"convert_{split}.log"))
    train = first_lines(work("train_all.jsonl"), args.max_train_samples, work("train.jsonl"))
    test = first_lines(work("test_all.jsonl"), args.max_test_samples, work("test.jsonl"))
    for task in ("ner", "relation"):
        seconds[task] = command([task, "--train_file", train, "--output_dir", work(task), "--overwrite_output_dir",
                                 *TRAINING, *epochs], work(f"{task}.log"))
    seconds["extract"] = command(["extract", "--ner_model_dir", work("ner/model"), "--relation_model_dir",
                                  work("relation/model"), "--test_file", test, "--output_dir", work("e2e"),
                                  "--overwrite_output_dir"], work("extract.log"))
    with open(work("e2e/metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    one_pair = None
    if args.one_pair:
        extra = []
        if args.max_train_samples:
            extra += ["--max_train_samples", str(args.max_train_samples)]
        if args.max_test_samples:
            extra += ["--max_eval_samples", str(args.max_test_samples)]
        seconds["one_pair"] = command(["relation", "--train_file", os.path.join(DATA, "TRAIN_FILE.TXT"),
                                       "--test_file", os.path.join(DATA, "TEST_FILE_FULL.TXT"), "--output_dir",
                                       work("one_pair"), "--overwrite_output_dir", "--pooling", "entity_start",
                                       *TRAINING, *epochs, *extra], work("one_pair.log"))
        with open(work("one_pair/metrics.json"), encoding="utf-8") as handle:
            one_pair = json.load(handle).get("test_macro_f1")

    size = (f"train {args.max_train_samples or 'all 8000'} records, test {args.max_test_samples or 'all 2717'}, "
            f"{args.num_train_epochs} epochs, seed {args.seed}")
    rows = [("NER F1 of the nominals (exact span)", metrics["ner_f1"]),
            ("relation, gold nominals (joint-trained model), official macro-F1",
             metrics.get("semeval_official_macro_f1_gold_entities")),
            ("relation, today's one-pair task (--one_pair), official macro-F1", one_pair),
            ("end to end, strict triple F1", metrics["triple_f1"]),
            ("end to end, boundaries-only triple F1", metrics["boundary_triple_f1"]),
            ("end to end, official macro-F1", metrics.get("semeval_official_macro_f1_e2e"))]
    print(f"\nSemEval-2010 Task 8 end to end ({size}; MiniLM, packaged)\n")
    print("| measure | score |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {'not run' if value is None else f'{value:.4f}'} |")
    print("\ntimes: " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
          + f"; extraction {metrics['texts_per_second']:.1f} texts/s (test)")


if __name__ == "__main__":
    main()
