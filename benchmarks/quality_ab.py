"""Paired A/B of training settings over seeds: is a speed setting free of a quality price?

    python benchmarks/quality_ab.py ner --seeds 1 2 3 4 5
    python benchmarks/quality_ab.py sentence --seeds 1 2 3 4 5
    python benchmarks/quality_ab.py relation --seeds 1 2 3 4 5

Each named configuration (`--configs NAME=FLAGS ...`; default: random padded batches in bf16, packed in fp32,
packed in bf16: packing is compared at the default precision, precision with packing on) trains once per seed
with `run_task.py` on the same data slice, in its own process, one run at a
time. For each comparison (`--compare B:A ...`) it prints, per seed and over the seeds, the paired difference of the
test score (points), its standard error and the 90 % confidence interval (Student t, n - 1 degrees of freedom),
plus train samples/s of both sides. Finished runs are kept under --work_dir and reused, so an interrupted A/B
resumes where it stopped.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
JOBS = {  # task -> files, slice, the score (test metric) and the epochs the quality rule names
    "ner": {"train": "conll2003/train.txt", "test": "conll2003/test.txt", "train_samples": 2000,
            "eval_samples": 1000, "score": "test_f1", "epochs": 3},
    "sentence": {"train": "sst2/train.tsv", "test": "sst2/dev.tsv", "train_samples": 1000, "eval_samples": 872,
                 "score": "test_accuracy", "epochs": 3},
    "relation": {"train": "semeval2010_task8/TRAIN_FILE.TXT", "test": "semeval2010_task8/TEST_FILE_FULL.TXT",
                 "train_samples": 1000, "eval_samples": 1000, "score": "test_macro_f1", "epochs": 3},
}
DEFAULT_CONFIGS = ["random_bf16=--packing false --mega_batch_factor 1 --mixed_precision bf16",
                   "packed_fp32=--packing true --mixed_precision no",
                   "packed_bf16=--packing true --mixed_precision bf16"]
DEFAULT_COMPARE = ["packed_bf16:random_bf16", "packed_bf16:packed_fp32", "packed_fp32:random_bf16"]
# Two-sided 90 % Student t critical values (0.95 quantile) by degrees of freedom.
T_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}


def t_critical(degrees: int) -> float:
    usable = [key for key in T_95 if key <= degrees]
    return T_95[max(usable)] if usable else float("nan")


def run_one(task: str, name: str, flags: str, seed: int, args) -> dict:
    """metrics.json of one training run (reused when the run folder already holds it)."""
    job = JOBS[task]
    folder = os.path.join(args.work_dir, task, name, f"seed{seed}")
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(metrics_path):
        command = [sys.executable, os.path.join(ROOT, "run_task.py"), task,
                   "--train_file", os.path.join(DATA, job["train"]), "--test_file", os.path.join(DATA, job["test"]),
                   "--max_train_samples", str(args.max_train_samples or job["train_samples"]),
                   "--max_eval_samples", str(args.max_eval_samples or job["eval_samples"]),
                   "--num_train_epochs", str(args.num_train_epochs or job["epochs"]), "--seed", str(seed),
                   "--output_dir", folder, "--overwrite_output_dir", "--logging_steps", "1000000",
                   *shlex.split(args.common), *shlex.split(flags)]
        print(f"[{task} {name} seed {seed}] " + " ".join(command[2:]), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"run failed ({name}, seed {seed}):\n{done.stderr[-3000:]}")
    with open(metrics_path, encoding="utf-8") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("task", choices=sorted(JOBS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="NAME=FLAGS")
    parser.add_argument("--compare", nargs="+", default=DEFAULT_COMPARE, help="B:A (prints B minus A)")
    parser.add_argument("--common", default="", help="flags given to every run")
    parser.add_argument("--max_train_samples", type=int)
    parser.add_argument("--max_eval_samples", type=int)
    parser.add_argument("--num_train_epochs", type=int)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "quality_ab"))
    args = parser.parse_args()
    configs = dict(item.split("=", 1) for item in args.configs)
    score_key = JOBS[args.task]["score"]
    results = {name: {seed: run_one(args.task, name, flags, seed, args) for seed in args.seeds}
               for name, flags in configs.items()}

    print(f"\n{args.task}: test score ({score_key}) and train samples/s per seed")
    print(f"{'config':<14}" + "".join(f"{'seed ' + str(seed):>16}" for seed in args.seeds) + f"{'mean':>16}")
    for name, runs in results.items():
        cells = [f"{runs[seed][score_key]:.4f} {runs[seed]['train_samples_per_second']:6.1f}" for seed in args.seeds]
        mean_score = statistics.mean(runs[seed][score_key] for seed in args.seeds)
        mean_speed = statistics.mean(runs[seed]["train_samples_per_second"] for seed in args.seeds)
        print(f"{name:<14}" + "".join(f"{cell:>16}" for cell in cells) + f"{mean_score:>10.4f} {mean_speed:5.1f}")
    print("\npaired differences (points = 100 x score), mean +- standard error, 90 % confidence interval")
    for pair in args.compare:
        better, base = pair.split(":")
        differences = [100 * (results[better][seed][score_key] - results[base][seed][score_key]) for seed in args.seeds]
        mean = statistics.mean(differences)
        error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
        half = t_critical(len(differences) - 1) * error
        speed = statistics.mean(results[better][seed]["train_samples_per_second"] /
                                results[base][seed]["train_samples_per_second"] for seed in args.seeds)
        inside = "inside" if -1 <= mean - half and mean + half <= 1 else "NOT inside"
        print(f"{better} - {base}: {mean:+.2f} +- {error:.2f} points, 90% CI [{mean - half:+.2f}, {mean + half:+.2f}] "
              f"({inside} +-1 point); per seed {', '.join(f'{d:+.2f}' for d in differences)}; speed ratio {speed:.2f}x")


if __name__ == "__main__":
    main()
