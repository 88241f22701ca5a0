"""Paired A/B of NER document context (FLERT) over seeds: --context_size 0 against 64 on a CoNLL-2003 slice.

    OMP_NUM_THREADS=1 python benchmarks/context_ab.py --seeds 1 2 3 4 5 --work_dir /work/runs15/context_ab

Each arm trains once per seed with `run_task.py ner` in its own process, one run at a time, the two arms of a seed
one after the other (so a change in machine load hits both arms of a seed alike). Slices take the first N sentences
of each file in file order, so whole documents are kept (except perhaps the last one, cut; its sentences still get
the context the full file gives them, as context is attached when the file is read, before the slice). Context
multiplies the sub-words per sentence (about 5.5x at 64 on CoNLL-2003 train), hence the small slice.

Printed: per seed the test F1 and train samples/s of both arms, the paired difference of test F1 (points = 100 x
F1), its mean, standard error and 90 % confidence interval (Student t, n - 1 degrees of freedom), and the cost in
train samples/s (ratio context / none, per seed and mean). Finished runs are kept under --work_dir and reused, so an
interrupted A/B resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_ab import t_critical  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "conll2003")
SCORE = "test_f1"


def run_one(name: str, context_size: int, seed: int, args) -> dict:
    """metrics.json of one training run (reused when the run folder already holds it), plus its wall time."""
    folder = os.path.join(args.work_dir, name, f"seed{seed}")
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(metrics_path):
        command = [sys.executable, os.path.join(ROOT, "run_task.py"), "ner",
                   "--train_file", os.path.join(args.data_dir, "train.txt"),
                   "--test_file", os.path.join(args.data_dir, "test.txt"),
                   "--max_train_samples", str(args.max_train_samples),
                   "--max_eval_samples", str(args.max_eval_samples),
                   "--num_train_epochs", str(args.num_train_epochs), "--seed", str(seed),
                   "--context_size", str(context_size),
                   "--output_dir", folder, "--overwrite_output_dir", "--logging_steps", "1000000",
                   *(["--validation_file", os.path.join(args.data_dir, "dev.txt")] if args.validation else []),
                   *shlex.split(args.common)]
        print(f"[{name} seed {seed}] " + " ".join(command[2:]), flush=True)
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"run failed ({name}, seed {seed}):\n{done.stderr[-3000:]}")
        with open(os.path.join(folder, "wall_seconds.txt"), "w", encoding="utf-8") as handle:
            handle.write(f"{time.time() - start:.1f}\n")
        print(f"[{name} seed {seed}] done in {time.time() - start:.0f} s", flush=True)
    with open(metrics_path, encoding="utf-8") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--context_size", type=int, default=64, help="the context arm's --context_size")
    parser.add_argument("--max_train_samples", type=int, default=2000)
    parser.add_argument("--max_eval_samples", type=int, default=1000, help="first N test (and dev) sentences")
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--validation", action="store_true",
                        help="also score the first --max_eval_samples dev sentences each epoch and keep the best "
                        "epoch (default: no dev set, the last epoch is scored on test)")
    parser.add_argument("--common", default="", help="flags given to every run")
    parser.add_argument("--data_dir", default=DATA)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "context_ab"))
    args = parser.parse_args()
    arms = {"context_0": 0, f"context_{args.context_size}": args.context_size}
    results: dict[str, dict[int, dict]] = {name: {} for name in arms}
    for seed in args.seeds:  # both arms of a seed back to back
        for name, size in arms.items():
            results[name][seed] = run_one(name, size, seed, args)

    base, treated = list(arms)
    print(f"\nCoNLL-2003, first {args.max_train_samples} train / {args.max_eval_samples} test sentences, "
          f"{args.num_train_epochs} epochs{', dev-selected epoch' if args.validation else ''}: test F1 and train "
          "samples/s per seed")
    print(f"{'seed':<6}{base + ' F1':>16}{treated + ' F1':>16}{'diff (points)':>15}{base + ' s/s':>16}"
          f"{treated + ' s/s':>17}{'ratio':>8}")
    differences, ratios = [], []
    for seed in args.seeds:
        a, b = results[base][seed], results[treated][seed]
        differences.append(100 * (b[SCORE] - a[SCORE]))
        ratios.append(b["train_samples_per_second"] / a["train_samples_per_second"])
        print(f"{seed:<6}{a[SCORE]:>16.4f}{b[SCORE]:>16.4f}{differences[-1]:>+15.2f}"
              f"{a['train_samples_per_second']:>16.1f}{b['train_samples_per_second']:>17.1f}{ratios[-1]:>8.3f}")
    mean_a = statistics.mean(results[base][seed][SCORE] for seed in args.seeds)
    mean_b = statistics.mean(results[treated][seed][SCORE] for seed in args.seeds)
    speed_a = statistics.mean(results[base][seed]["train_samples_per_second"] for seed in args.seeds)
    speed_b = statistics.mean(results[treated][seed]["train_samples_per_second"] for seed in args.seeds)
    print(f"{'mean':<6}{mean_a:>16.4f}{mean_b:>16.4f}{statistics.mean(differences):>+15.2f}{speed_a:>16.1f}"
          f"{speed_b:>17.1f}{statistics.mean(ratios):>8.3f}")
    mean = statistics.mean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    half = t_critical(len(differences) - 1) * error
    verdict = "above noise (the interval excludes 0)" if mean - half > 0 or mean + half < 0 else \
        "within noise (the interval contains 0)"
    print(f"\n{treated} - {base}: {mean:+.2f} +- {error:.2f} points (n = {len(differences)}), "
          f"90% CI [{mean - half:+.2f}, {mean + half:+.2f}]: {verdict}")
    tokens = statistics.mean(results[treated][seed]["train_tokens_per_second"] /
                             results[treated][seed]["train_samples_per_second"] for seed in args.seeds) / \
        statistics.mean(results[base][seed]["train_tokens_per_second"] /
                        results[base][seed]["train_samples_per_second"] for seed in args.seeds)
    print(f"cost: train samples/s {speed_b:.1f} against {speed_a:.1f} (ratio {statistics.mean(ratios):.3f}, "
          f"{1 / statistics.mean(ratios):.2f}x the time per sentence); {tokens:.2f}x the real tokens per sentence; "
          f"test samples/s {statistics.mean(results[treated][s]['test_samples_per_second'] for s in args.seeds):.1f} "
          f"against {statistics.mean(results[base][s]['test_samples_per_second'] for s in args.seeds):.1f}")


if __name__ == "__main__":
    main()
