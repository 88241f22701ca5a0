"""Milliseconds per training step of bert-ft's own model, the same examples laid out different ways.

    python benchmarks/step_time.py ner --precision bf16 --layouts padded pack128 packlong
    python benchmarks/step_time.py ner --precision bf16 --layouts packlong --flags "--bulk_dropout false"
    python benchmarks/step_time.py sentence --precision bf16 --layouts packlong --keep_freed_memory --profile packlong
    python benchmarks/step_time.py ner --precision bf16 --layouts packlong --flags "--torch_compile"   # compiled

The model, optimiser and data come from bert-ft's own training stages (prepare_data, build_training) with batch 32
over the first 2000 training examples; the same `--steps` random batches are laid out as `padded` (one example per
row), `packlong` (packed rows as wide as the batch's longest example: the default) or `packN` (packed rows of at
least N tokens), and timed through `train_step` after 2 warm-up steps, each layout `--rounds` times interleaved.
Prints ms per step (median over rounds), page faults per step, and with `--profile LAYOUT` torch's profile of that
layout's last round. `--keep_freed_memory` keeps the allocator setting a training run applies (build_training applies it; without the
flag this script turns it off). With `--flags "--torch_compile"` the first warm-up steps compile: their time and
the graphs compiled are printed, and the ms per step after them compare with the same command without the flag.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
FILES = {"ner": "conll2003/train.txt", "sentence": "sst2/train.tsv", "relation": "semeval2010_task8/TRAIN_FILE.TXT"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("task", choices=sorted(FILES))
    parser.add_argument("--precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--layouts", nargs="+", default=["padded", "pack128", "packlong"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--flags", default="", help="more training flags, e.g. \"--bulk_dropout false\"")
    parser.add_argument("--keep_freed_memory", action="store_true")
    parser.add_argument("--profile", help="print torch's profile of this layout's last round")
    args = parser.parse_args()

    import torch

    from bert_ft.cli import parse
    from bert_ft.data import Collator
    from bert_ft.data_stage import prepare_data
    from bert_ft.train import train_step
    from bert_ft.training_setup import build_training, make_accelerator

    argv = [args.task, "--train_file", os.path.join(DATA, FILES[args.task]), "--output_dir", "/tmp/bert-ft-step-time",
            "--overwrite_output_dir", "--max_train_samples", "2000", "--per_device_train_batch_size",
            str(args.batch_size), "--mixed_precision", args.precision, "--head_learning_rate", "none",
            "--learning_rate", "1e-4", "--weight_decay", "0.01", *shlex.split(args.flags)]
    _, config, task = parse(argv)
    accelerator = make_accelerator(config)
    data = prepare_data(task, config, lambda *_: None, accelerator)
    # build_training applies every CPU speed-up a training run applies (bert_ft.cpu.apply_cpu_speedups), the
    # allocator setting included; without --keep_freed_memory it is switched off, as this script always did.
    if not args.keep_freed_memory:
        os.environ["BERT_FT_KEEP_FREED_MEMORY"] = "0"
    training = build_training(task, config, data, accelerator, print)
    features = data.features["train"]
    pad_values = task.pad_values(data.tokenizer)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[start:start + args.batch_size] for start in range(0, args.steps * args.batch_size, args.batch_size)]

    def collator(layout: str) -> Collator:
        if layout == "padded":
            return Collator(pad_values)
        return Collator(pad_values, pack=True, row_capacity=0 if layout == "packlong" else int(layout[len("pack"):]))

    def steps(laid: list[dict]) -> None:
        for batch in laid:
            train_step(accelerator, training.model, batch, training.optimizer, training.scheduler, None, 1.0)

    timings: dict[str, list[float]] = {layout: [] for layout in args.layouts}
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    training.model.train()
    for round_number in range(args.rounds):
        for layout in args.layouts:
            laid = [collator(layout)([(index, features.inputs[index]) for index in batch]) for batch in batches]
            for batch in laid:
                batch.pop("feature_index")
            slots = sum(batch["input_ids"].numel() for batch in laid) / len(laid)
            warm_start = time.perf_counter()
            steps(laid[:2])  # warm-up
            if training.compiled is not None:  # --torch_compile: what compiling cost so far
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
                print(f"round {round_number} {layout:<9} warm-up {time.perf_counter() - warm_start:6.1f} s; "
                      f"{graphs} graph(s) compiled so far", flush=True)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            if layout == args.profile and round_number == args.rounds - 1:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as profiled:
                    steps(laid[2:])
                print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            else:
                steps(laid[2:])
            milliseconds = (time.perf_counter() - start) / (len(laid) - 2) * 1000
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (len(laid) - 2)
            timings[layout].append(milliseconds)
            compiled = "" if training.compiled is None else \
                f", {torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs_before} graph(s) compiled so far"
            print(f"round {round_number} {layout:<9} {milliseconds:7.1f} ms/step, {faults:7.0f} page faults/step, "
                  f"{slots:5.0f} token slots/step{compiled}", flush=True)
    for layout, values in timings.items():
        median = statistics.median(values)
        print(f"{layout:<9} median {median:7.1f} ms/step = {args.batch_size * 1000 / median:6.1f} samples/s")


if __name__ == "__main__":
    main()
