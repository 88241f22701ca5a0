"""Milliseconds per training step of bert-ft's own model, the same examples laid out different ways.

    python benchmarks/step_time.py ner --precision bf16 --layouts padded pack128 packlong
    python benchmarks/step_time.py ner --precision bf16 --layouts packlong --flags "--bulk_dropout false"
    python benchmarks/step_time.py ner --precision bf16 --layouts packlong --flags "--sparse_embedding_updates false"
    python benchmarks/step_time.py sentence --precision bf16 --layouts packlong --keep_freed_memory --profile packlong
    python benchmarks/step_time.py ner --layouts packlong --keep_freed_memory --profile_table packlong   # by category
    python benchmarks/step_time.py ner --precision bf16 --layouts packlong packlong+block --rounds 5
    python benchmarks/step_time.py ner --precision bf16 --layouts packlong --flags "--torch_compile"   # compiled

The model, optimiser and data come from bert-ft's own training stages (prepare_data, build_training) with batch 32
over the first 2000 training examples; the same `--steps` random batches are laid out as `padded` (one example per
row), `packlong` (packed rows as wide as the batch's longest example: the default) or `packN` (packed rows of at
least N tokens), and timed through `train_step` after 2 warm-up steps, each layout `--rounds` times interleaved.
Prints ms per step (median over rounds), page faults per step, and with `--profile LAYOUT` torch's profile of that
layout's last round. A layout ending in `+block` runs the same packed rows with per-example attention
(--block_attention train, bert_ft.block_attention); the others keep the block-diagonal mask. `--keep_freed_memory`
keeps the allocator setting a training run applies (build_training applies it; without the flag this script turns
it off). With `--flags "--torch_compile"` the first warm-up steps compile: their time and
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
    parser.add_argument("--profile_table", metavar="LAYOUT",
                        help="profile this layout's last round and print where a step's time goes, by category "
                             "(matrix products, attention soft-max, embedding gradient, optimizer, ...)")
    args = parser.parse_args()

    import torch

    from bert_ft.block_attention import use_block_attention
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

    encoder = training.network.model  # the transformers model whose attention --block_attention switches
    if any(layout.endswith("+block") for layout in args.layouts):
        print(f"block attention: {use_block_attention(encoder, 'train')}")

    def collator(layout: str) -> Collator:
        layout = layout.removesuffix("+block")
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
            if any(name.endswith("+block") for name in args.layouts):  # per-example attention for this layout only
                use_block_attention(encoder, "train" if layout.endswith("+block") else "off")
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
            if layout in (args.profile, args.profile_table) and round_number == args.rounds - 1:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as profiled:
                    steps(laid[2:])
                profiled_ms = (time.perf_counter() - start) / (len(laid) - 2) * 1000
                if layout == args.profile:
                    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                if layout == args.profile_table:
                    print_categories(profiled.key_averages(), len(laid) - 2, profiled_ms)
            else:
                steps(laid[2:])
            milliseconds = (time.perf_counter() - start) / (len(laid) - 2) * 1000
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (len(laid) - 2)
            timings[layout].append(milliseconds)
            compiled = "" if training.compiled is None else \
                f", {torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs_before} graph(s) compiled so far"
            print(f"round {round_number} {layout:<15} {milliseconds:7.1f} ms/step, {faults:7.0f} page faults/step, "
                  f"{slots:5.0f} token slots/step{compiled}", flush=True)
    for layout, values in timings.items():
        median = statistics.median(values)
        print(f"{layout:<15} median {median:7.1f} ms/step = {args.batch_size * 1000 / median:6.1f} samples/s")


# Where a step's time goes: torch operators grouped by what they do (first matching pattern wins; self time, so no
# operator is counted twice). Wrappers (aten::linear, aten::matmul) have almost no self time: their GEMMs are in mm.
CATEGORIES = (
    ("matrix products (GEMM)", ("addmm", "aten::mm", "bmm", "baddbmm", "mkldnn", "onednn", "_addmm_activation")),
    ("word-embedding gradient / lookup", ("embedding", "index_select", "index_add", "index_put", "_unique",
                                         "sparse", "coalesce")),
    ("optimizer (AdamW)", ("adam", "optimizer", "_foreach")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax", "binary_cross_entropy", "mse_loss")),
    ("attention soft-max", ("softmax",)),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("dropout masks (torch)", ("bernoulli", "dropout", "native_dropout")),
)


def print_categories(averages, steps: int, step_ms: float) -> None:
    """A table of ms per step by category (operators' self CPU time under the profiler), and the rest of the
    profiled step's wall time: Python, numpy (bert-ft's bulk dropout masks), autograd and profiler bookkeeping."""
    totals: dict[str, float] = {}
    for event in averages:
        name = event.key.lower()
        category = next((title for title, patterns in CATEGORIES if any(p in name for p in patterns)),
                        "elementwise, copies, views (other aten operators)" if name.startswith("aten::")
                        else "other scopes (" + event.key.split("::")[0].split("#")[0][:20] + ")")
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1000 / steps
    in_ops = sum(totals.values())
    totals["outside operators (Python, numpy masks, autograd engine)"] = max(0.0, step_ms - in_ops)
    print(f"\nwhere a step goes ({step_ms:.1f} ms/step under the profiler, {steps} steps; operators' self time)")
    print(f"{'category':<58}{'ms/step':>9}{'share':>8}")
    for category, value in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{category:<58}{value:9.1f}{100 * value / step_ms:7.1f}%")
    print(f"{'operators, all categories':<58}{in_ops:9.1f}{100 * in_ops / step_ms:7.1f}%")


if __name__ == "__main__":
    main()
