"""Training speed per encoder family: bert-ft packed, bert-ft padded and the Hugging Face Trainer recipe, on base-sized
randomly initialised models (12 layers, hidden 768, 12 heads) of every family, CoNLL-2003 NER.

    python benchmarks/families.py --max_train_samples 256 --repeats 1
    python benchmarks/families.py --families roberta deberta-v3 --precision bf16      # e.g. on a GPU
    python benchmarks/families.py --sides packed blocked padded --repeats 3         # block attention's gain

Throughput does not depend on the weights (the same matrix products run whatever their values), so random weights
measure what pretrained ones would; the tokenizers are real ones of each family (bert_ft.random_models), trained
offline, so sequence lengths are those of the family's kind of tokenizer (their 2,000-entry vocabularies cut words
into somewhat more pieces than the released vocabularies do). Each side is one run of `benchmarks/speed.py` in its own
process (its peak memory is its own): the same slice, batch size, learning rate, epochs and seed for
  recipe   HF `Trainer` + `DataCollatorForTokenClassification` (run_ner.py's way; byte-level BPE tokenizers get
           add_prefix_space as run_ner.py gives RoBERTa)
  padded   bert-ft with --packing false at its defaults: random batches, one example per row, padded to the
           longest (what a family that cannot be packed gets, the comparison the families issue asks for)
  grouped  bert-ft with length-grouped padded batches (--packing false --mega_batch_factor 50: less padding than
           random batches, at a possible cost in score)
  packed   bert-ft's default: several examples per row (--packing true; its start-up check must keep it on)
  blocked  packed, attention computed per example (--block_attention train)
`--sides` picks which run (default: all but blocked); the table shows every ratio whose two sides ran.
With --repeats > 1 the sides alternate (recipe, padded, packed, recipe, ...) so that a change of load on a shared
machine falls on all of them; the table shows the median. Runs on CUDA unchanged (`--precision bf16` there; SDPA
attention is transformers' default for every family that has it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from speed import run_speed  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

SIDES = {"recipe": "recipe", "padded": "random", "grouped": "grouped", "packed": "packed",
         "blocked": "blocked"}  # this table's name -> speed.py's side

DEFAULT_FAMILIES = ("bert", "roberta", "xlm-roberta", "deberta-v3", "electra", "distilbert", "albert", "modernbert")


def run_side(folder: str, side: str, args, seed: int) -> dict:
    return run_speed(["ner", "--model_name_or_path", folder, "--max_train_samples", str(args.max_train_samples),
                      "--max_eval_samples", str(args.max_eval_samples), "--batch_size", str(args.batch_size),
                      "--eval_batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length),
                      "--side", SIDES[side], "--seed", str(seed), "--mixed_precision", args.precision],
                     f"{side} run on {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES))
    parser.add_argument("--max_train_samples", type=int, default=256)
    parser.add_argument("--max_eval_samples", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="no = fp32")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating sides")
    parser.add_argument("--sides", nargs="+", default=["recipe", "padded", "grouped", "packed"], choices=list(SIDES))
    parser.add_argument("--size", default="base", choices=("base", "small", "tiny"),
                        help="base: 12 layers, hidden 768; small: 4 layers, hidden 256 (for a loaded machine)")
    parser.add_argument("--models_dir", help="keep the built models here (default: a temporary folder, removed)")
    parser.add_argument("--output", help="also write every run's numbers as JSON")
    args = parser.parse_args()

    import torch

    from bert_ft.random_models import build_family

    root = args.models_dir or tempfile.mkdtemp(prefix="bench-families-")
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        for family in args.families:
            folder = os.path.join(root, f"{family}-{args.size}")
            if not os.path.isfile(os.path.join(folder, "config.json")):
                build_family(family, folder, size=args.size)
            results[family] = {side: [] for side in args.sides}
            for repeat in range(args.repeats):
                for side in args.sides:
                    results[family][side].append(run_side(folder, side, args, 42))
            median = {side: statistics.median(run["train_samples_per_second"] for run in runs)
                      for side, runs in results[family].items()}
            print(f"{family}: " + ", ".join(f"{side} {value:.2f} samples/s" for side, value in median.items()),
                  flush=True)
            if not args.models_dir:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.models_dir:
            shutil.rmtree(root, ignore_errors=True)

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\nCoNLL-2003 NER, {args.max_train_samples} training sentences, 1 epoch, batch {args.batch_size}, "
          f"max_seq_length {args.max_seq_length}, {'fp32' if args.precision == 'no' else args.precision}, "
          f"{args.size} random weights, {machine}; median of {args.repeats} alternating run(s) per side")
    ratios = [(ours, theirs) for ours, theirs in (("packed", "padded"), ("packed", "grouped"), ("packed", "recipe"),
                                                    ("blocked", "padded"), ("blocked", "packed"))
              if ours in args.sides and theirs in args.sides]
    header = ("family", *(f"{side}/s" for side in args.sides), *(f"{ours}/{theirs}" for ours, theirs in ratios),
              *(f"pad {side}" for side in args.sides if side != "recipe"), *(f"MB {side}" for side in args.sides))
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for family, sides in results.items():
        def value(side: str, key: str) -> float:
            return statistics.median(run[key] for run in sides[side])

        speed = {side: value(side, "train_samples_per_second") for side in args.sides}
        row = [family, *(f"{speed[side]:.2f}" for side in args.sides),
               *(f"{speed[ours] / speed[theirs]:.2f}x" for ours, theirs in ratios),
               *(f"{value(side, 'padding_ratio'):.2f}" for side in args.sides if side != "recipe"),
               *(f"{value(side, 'peak_memory_mb'):.0f}" for side in args.sides)]
        print("| " + " | ".join(row) + " |")
        loads = [run["other_load_cores"] for runs in sides.values() for run in runs if "other_load_cores" in run]
        if loads and max(loads) > 0.1:
            print(f"  ({family}: other processes used up to {max(loads):.2f} cores during its runs: not idle)")
    if args.output:
        from bert_ft.io import atomic_write_json

        atomic_write_json(args.output, {"args": vars(args), "runs": results})


if __name__ == "__main__":
    main()
