"""Full fine-tuning vs LoRA (r 8 and 16) over paired seeds: trainable parameters, peak memory, speed, quality.

    python benchmarks/lora_ab.py ner --seeds 1 2 3
    python benchmarks/lora_ab.py sentence --seeds 1 2 3

Each configuration trains once per seed with `run_task.py` (in its own process, one run at a time, seeds
alternating between the configurations so that a change of machine load hits every side alike) on the slice of
`benchmarks/quality_ab.py`'s job (`--max_train_samples` etc. override it). LoRA runs use --learning_rate 1e-3 (the
encoder's 1e-4 default is for updating full weights; LoRA's B matrices start at zero and need a larger step).
Prints per configuration the trainable parameters, peak memory (the process's max RSS), train samples/s and the
test score per seed, then each LoRA side minus full fine-tuning as a paired difference in points with its
standard error and 90 % confidence interval (Student t), as quality_ab.py does. Finished runs are reused from
--work_dir.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_ab import JOBS, ROOT, run_one, t_critical  # noqa: E402

CONFIGS = {"full": "",
           "lora_r8": "--lora_r 8 --lora_alpha 16 --learning_rate 1e-3",
           "lora_r16": "--lora_r 16 --lora_alpha 32 --learning_rate 1e-3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(JOBS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--common", default="", help="flags given to every run")
    parser.add_argument("--max_train_samples", type=int, default=1000)
    parser.add_argument("--max_eval_samples", type=int)
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "lora_ab"))
    args = parser.parse_args()
    score_key = JOBS[args.task]["score"]
    results: dict[str, dict[int, dict]] = {name: {} for name in CONFIGS}
    for seed in args.seeds:  # alternate the sides seed by seed
        for name, flags in CONFIGS.items():
            results[name][seed] = run_one(args.task, name, flags, seed, args)

    print(f"\n{args.task}: {args.max_train_samples} training examples, {args.num_train_epochs} epochs, "
          f"seeds {args.seeds}; score {score_key}")
    print(f"{'config':<10} {'trainable':>11} {'peak MB':>8} {'samples/s':>10} {'score mean':>11}  per seed")
    for name, runs in results.items():
        values = [runs[seed] for seed in args.seeds]
        print(f"{name:<10} {values[0]['trainable_parameters']:>11,} "
              f"{statistics.mean(run['peak_memory_mb'] for run in values):>8.0f} "
              f"{statistics.mean(run['train_samples_per_second'] for run in values):>10.1f} "
              f"{statistics.mean(run[score_key] for run in values):>11.4f}  "
              + " ".join(f"{run[score_key]:.4f}" for run in values))
    print("\npaired differences against full fine-tuning (points = 100 x score): mean +- standard error, 90 % CI")
    for name in CONFIGS:
        if name == "full":
            continue
        differences = [100 * (results[name][seed][score_key] - results["full"][seed][score_key])
                       for seed in args.seeds]
        mean = statistics.mean(differences)
        error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
        half = t_critical(len(differences) - 1) * error
        speed = statistics.mean(results[name][seed]["train_samples_per_second"]
                                / results["full"][seed]["train_samples_per_second"] for seed in args.seeds)
        memory = statistics.mean(results[name][seed]["peak_memory_mb"] / results["full"][seed]["peak_memory_mb"]
                                 for seed in args.seeds)
        print(f"{name} - full: {mean:+.2f} +- {error:.2f} points, 90% CI [{mean - half:+.2f}, {mean + half:+.2f}]; "
              f"per seed {', '.join(f'{d:+.2f}' for d in differences)}; speed {speed:.2f}x, peak memory "
              f"{memory:.2f}x")


if __name__ == "__main__":
    main()
