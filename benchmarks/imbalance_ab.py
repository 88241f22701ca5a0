"""Paired A/B of the imbalance levers (--class_weights, --loss focal) on an imbalanced SST-2 slice, over seeds.

    python benchmarks/imbalance_ab.py --seeds 1 2 3 4 5 --work_dir /work/runs15/imbalance_ab

The training set is a seeded 1:9 slice of SST-2's training file: 200 negative (label 0, the minority class) and
1800 positive sentences (--data_seed picks them; the same slice for every seed and option, written under
--work_dir, never into the repository). The test set is SST-2's dev file as it is (428 negative, 444 positive:
balanced, so a model that learned the 1:9 prior pays for it). Scores, from each run's test predictions: macro-F1,
the minority class's F1 and accuracy (secondary). Each option trains once per seed with `run_task.py` (MiniLM, the
defaults otherwise, no validation set: the last epoch is scored), single-threaded, one run at a time, seed by seed
(every option of a seed runs back to back, so a change of machine load hits the options alike). For each
comparison (B:A) it prints per-seed paired differences (points = 100 x score), their mean +- standard error and
the 90 % confidence interval (Student t, n - 1 degrees of freedom), and the ratio of train samples/s. Finished runs
are reused, so an interrupted A/B resumes where it stopped; each run's model/ and checkpoints are deleted once it is
scored (about 600 MB a run) unless --keep_models.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_ab import DATA, ROOT, t_critical  # noqa: E402

DEFAULT_CONFIGS = ["none=--class_weights none --loss cross_entropy",
                   "balanced=--class_weights balanced",
                   "focal=--loss focal --focal_gamma 2",
                   "balanced_focal=--class_weights balanced --loss focal --focal_gamma 2"]
DEFAULT_COMPARE = ["balanced:none", "focal:none", "balanced_focal:none", "balanced_focal:balanced"]
SCORES = ("macro_f1", "minority_f1", "accuracy")


def write_slice(args) -> str:
    """The 1:9 training slice (TSV with SST-2's header), written once under work_dir; returns its path."""
    path = os.path.join(args.work_dir, "data", f"sst2_train_{args.minority_label}x{args.minority}_"
                        f"{args.majority_label}x{args.majority}_seed{args.data_seed}.tsv")
    if os.path.isfile(path):
        return path
    with open(os.path.join(DATA, "sst2", "train.tsv"), encoding="utf-8") as handle:
        header, *rows = handle.read().splitlines()
    by_label = {args.minority_label: [], args.majority_label: []}
    for row in rows:
        label = row.rsplit("\t", 1)[-1]
        if label in by_label:
            by_label[label].append(row)
    rng = random.Random(args.data_seed)
    chosen = []
    for label, count in ((args.minority_label, args.minority), (args.majority_label, args.majority)):
        rng.shuffle(by_label[label])
        chosen.extend(by_label[label][:count])
    rng.shuffle(chosen)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n".join([header, *chosen]) + "\n")
    os.replace(path + ".tmp", path)
    return path


def scores_of(folder: str, minority: str) -> dict:
    """macro-F1, the minority class's F1 and accuracy from a run's test_predictions.jsonl, plus train samples/s."""
    gold, pred = [], []
    with open(os.path.join(folder, "test_predictions.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            gold.append(record["gold"])
            pred.append(record["pred"])
    f1 = {}
    for label in sorted(set(gold)):
        hits = sum(g == p == label for g, p in zip(gold, pred))
        precision = hits / max(sum(p == label for p in pred), 1)
        recall = hits / max(sum(g == label for g in gold), 1)
        f1[label] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    macro = statistics.mean(f1.values())
    assert abs(macro - metrics["test_macro_f1"]) < 1e-9, (macro, metrics["test_macro_f1"])  # same scorer
    return {"macro_f1": macro, "minority_f1": f1[minority],
            "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold),
            "samples_per_second": metrics["train_samples_per_second"]}


def run_one(name: str, flags: str, seed: int, train_file: str, args) -> dict:
    folder = os.path.join(args.work_dir, name, f"seed{seed}")
    if not os.path.isfile(os.path.join(folder, "metrics.json")):
        command = [sys.executable, os.path.join(ROOT, "run_task.py"), "sentence", "--train_file", train_file,
                   "--test_file", os.path.join(DATA, "sst2", "dev.tsv"), "--num_train_epochs",
                   str(args.num_train_epochs), "--seed", str(seed), "--output_dir", folder, "--overwrite_output_dir",
                   "--logging_steps", "1000000", *shlex.split(args.common), *shlex.split(flags)]
        print(f"[{name} seed {seed}] " + " ".join(command[2:]), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"run failed ({name}, seed {seed}):\n{done.stderr[-3000:]}")
        if not args.keep_models:  # about 600 MB per run; the scores need only the predictions and metrics
            for path in [os.path.join(folder, "model"), *glob.glob(os.path.join(folder, "checkpoint-*"))]:
                shutil.rmtree(path, ignore_errors=True)
    return scores_of(folder, args.minority_label)


def paired(results: dict, better: str, base: str, key: str, seeds: list[int]) -> tuple[float, float, float, list]:
    """(mean, standard error, 90 % half-width, per-seed differences) of better - base in points."""
    differences = [100 * (results[better][seed][key] - results[base][seed][key]) for seed in seeds]
    mean = statistics.mean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return mean, error, t_critical(len(differences) - 1) * error, differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="NAME=FLAGS")
    parser.add_argument("--compare", nargs="+", default=DEFAULT_COMPARE, help="B:A (prints B minus A)")
    parser.add_argument("--common", default="", help="flags given to every run")
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--minority_label", default="0")
    parser.add_argument("--minority", type=int, default=200, help="training sentences of the minority label")
    parser.add_argument("--majority_label", default="1")
    parser.add_argument("--majority", type=int, default=1800, help="training sentences of the majority label")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the training slice (fixed across runs)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training run")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "imbalance_ab"))
    parser.add_argument("--keep_models", action="store_true", help="keep each run's model/ and checkpoints")
    args = parser.parse_args()
    configs = dict(item.split("=", 1) for item in args.configs)
    train_file = write_slice(args)
    print(f"training slice: {train_file} ({args.minority} x label {args.minority_label}, {args.majority} x label "
          f"{args.majority_label}); test: SST-2 dev; {args.num_train_epochs} epochs; {args.threads} thread(s)",
          flush=True)
    results: dict = {name: {} for name in configs}
    for seed in args.seeds:  # seed-major: the options of one seed run back to back
        for name, flags in configs.items():
            results[name][seed] = run_one(name, flags, seed, train_file, args)

    print(f"\nper seed: macro-F1 / minority ({args.minority_label}) F1 / accuracy / train samples/s")
    print(f"{'option':<16}" + "".join(f"{'seed ' + str(seed):>28}" for seed in args.seeds))
    for name, runs in results.items():
        print(f"{name:<16}" + "".join(f"{runs[seed]['macro_f1']:>8.4f}{runs[seed]['minority_f1']:>7.4f}"
                                      f"{runs[seed]['accuracy']:>7.4f}{runs[seed]['samples_per_second']:>6.1f}"
                                      for seed in args.seeds))
    print(f"\nmeans over {len(args.seeds)} seeds")
    print(f"{'option':<16}{'macro-F1':>10}{'minority F1':>13}{'accuracy':>10}{'samples/s':>11}")
    for name, runs in results.items():
        means = [statistics.mean(runs[seed][key] for seed in args.seeds) for key in (*SCORES, "samples_per_second")]
        print(f"{name:<16}{means[0]:>10.4f}{means[1]:>13.4f}{means[2]:>10.4f}{means[3]:>11.1f}")
    print("\npaired differences B - A (points = 100 x score): mean +- standard error, 90 % CI; speed ratio B/A")
    for pair in args.compare:
        better, base = pair.split(":")
        print(f"{better} - {base}:")
        for key in SCORES:
            mean, error, half, differences = paired(results, better, base, key, args.seeds)
            verdict = "within noise (CI holds 0)" if mean - half <= 0 <= mean + half else \
                ("gain" if mean > 0 else "loss")
            print(f"  {key:<12} {mean:+6.2f} +- {error:.2f}  90% CI [{mean - half:+.2f}, {mean + half:+.2f}]  "
                  f"{verdict}; per seed {', '.join(f'{d:+.2f}' for d in differences)}")
        ratios = [results[better][seed]["samples_per_second"] / results[base][seed]["samples_per_second"]
                  for seed in args.seeds]
        print(f"  train samples/s ratio {statistics.mean(ratios):.3f} (per seed "
              f"{', '.join(f'{ratio:.2f}' for ratio in ratios)})")


if __name__ == "__main__":
    main()
