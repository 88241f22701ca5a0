"""Large corpora: peak memory per training sentence, the cache's second-run speed-up, and training speed against
the pipeline before the Arrow data layer (README, "Large corpora").

Writes synthetic CoNLL-2003 training files of N sentences (the real training file repeated; the script writes them
itself, into --work_dir, never into the project), then runs `run_task.py ner` on each as a subprocess:

  memory    for each N (default 20k, 200k, 1M): a fresh cache, --max_steps 200; peak RSS of the run
            (metrics.json `peak_memory_mb`, plus the peak of any encoding worker process) and its growth per
            training sentence between the smallest and each larger N;
  cache     the largest N up to 200k again on the now warm cache: the data stage's seconds (`data_runtime`)
            cold and warm, and the ratio;
  speed     with --baseline CHECKOUT (a copy of an earlier commit): the same 2000-sentence, 1-epoch job
            --repeats times on each code base, padded batches (--packing false, as the earlier default
            length-grouped setting), median train samples/s and the ratio.

  python benchmarks/large_corpus.py --data ../shared/data/conll2003 --work_dir /tmp/bert-ft-large \
      [--sizes 20000 200000 1000000] [--baseline /path/to/old/checkout] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read_sentences(path: str) -> list[str]:
    """The file's sentence blocks (lines up to a blank line), -DOCSTART- blocks kept as they are."""
    with open(path, encoding="utf-8") as handle:
        return [block for block in handle.read().split("\n\n") if block.strip()]


def write_corpus(source: str, count: int, path: str) -> int:
    """A CoNLL file of `count` sentences: the source's sentences repeated in order."""
    if os.path.isfile(path):
        return count
    blocks = [block for block in read_sentences(source) if not block.startswith("-DOCSTART-")]
    temp = path + ".tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(blocks[index % len(blocks)].strip("\n") + "\n\n")
    os.replace(temp, path)
    return count


def run(checkout: str, args: list[str], env: dict, log: str) -> dict:
    """Run `run_task.py ner` from `checkout`; its metrics.json."""
    with open(log, "w", encoding="utf-8") as handle:
        completed = subprocess.run([sys.executable, "run_task.py", "ner", *args], cwd=checkout, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    output_dir = args[args.index("--output_dir") + 1]
    if completed.returncode != 0:
        raise SystemExit(f"run failed (exit {completed.returncode}); see {log}")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "conll2003"))
    parser.add_argument("--work_dir", default="/tmp/bert-ft-large")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None, help="--preprocessing_num_workers for every run")
    parser.add_argument("--baseline", default=None, help="a checkout of the earlier commit for the speed check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "cache", "speed"])
    options = parser.parse_args()
    os.makedirs(options.work_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
    train = os.path.join(options.data, "train.txt")
    evaluation = ["--validation_file", os.path.join(options.data, "dev.txt"),
                  "--test_file", os.path.join(options.data, "test.txt"), "--max_eval_samples", "500"]
    results: dict = {}
    out_json = os.path.join(options.work_dir, "results.json")
    if os.path.isfile(out_json):
        with open(out_json, encoding="utf-8") as handle:
            results = json.load(handle)

    def save() -> None:  # atomic: a run killed mid-write must not lose the results a rerun resumes from
        from bert_ft.io import atomic_write_json

        atomic_write_json(out_json, results)

    if "memory" not in options.skip:
        for size in options.sizes:
            name = f"memory-{size}"
            if name in results:
                continue
            corpus = os.path.join(options.work_dir, f"train-{size}.txt")
            write_corpus(train, size, corpus)
            cache = os.path.join(options.work_dir, f"cache-{size}")
            shutil.rmtree(cache, ignore_errors=True)
            output = os.path.join(options.work_dir, f"run-{size}")
            args = ["--train_file", corpus, *evaluation, "--max_steps", str(options.max_steps),
                    "--output_dir", output, "--overwrite_output_dir", "--data_cache_dir", cache,
                    "--logging_steps", "100"]
            if options.workers:
                args += ["--preprocessing_num_workers", str(options.workers)]
            start = time.perf_counter()
            metrics = run(ROOT, args, env, output + ".log")
            results[name] = {"sentences": size, "peak_memory_mb": metrics["peak_memory_mb"],
                             "worker_peak_mb": metrics.get("worker_peak_memory_mb", 0.0), "data_runtime": metrics.get("data_runtime"),
                             "train_runtime": metrics["train_runtime"], "wall": round(time.perf_counter() - start, 1),
                             "test_f1": metrics.get("test_f1"), "args": args}
            print(name, results[name], flush=True)
            save()
    if "cache" not in options.skip:
        size = max([size for size in options.sizes if size <= 200_000] or [min(options.sizes)])
        name = f"cache-{size}"
        if name not in results and f"memory-{size}" in results:
            args = list(results[f"memory-{size}"]["args"])
            args[args.index("--output_dir") + 1] += "-warm"
            metrics = run(ROOT, args, env, os.path.join(options.work_dir, f"run-{size}-warm.log"))
            cold = results[f"memory-{size}"]["data_runtime"]
            results[name] = {"sentences": size, "cold_s": cold, "warm_s": metrics["data_runtime"],
                             "speedup": round(cold / max(metrics["data_runtime"], 1e-9), 1),
                             "same_test_f1": metrics.get("test_f1") == results[f"memory-{size}"]["test_f1"]}
            print(name, results[name], flush=True)
            save()
    if "speed" not in options.skip and options.baseline:
        corpus = os.path.join(options.work_dir, "train-2000.txt")
        write_corpus(train, 2000, corpus)
        # Alternate the sides (new, baseline, new, ...) so that any load on the machine falls on both alike.
        for repeat in range(options.repeats):
            for side, checkout in (("new", ROOT), ("baseline", options.baseline)):
                name = f"speed-{side}-{repeat}"
                if name in results:
                    continue
                output = os.path.join(options.work_dir, name)
                args = ["--train_file", corpus, *evaluation, "--num_train_epochs", "1", "--packing", "false",
                        "--output_dir", output, "--overwrite_output_dir"]
                if side == "new":
                    args += ["--data_cache_dir", os.path.join(options.work_dir, "cache-speed")]
                metrics = run(checkout, args, env, output + ".log")
                results[name] = {"train_samples_per_second": metrics["train_samples_per_second"],
                                 "test_f1": metrics.get("test_f1")}
                print(name, results[name], flush=True)
                save()
    print_table(results, options)


def print_table(results: dict, options) -> None:
    sizes = sorted(entry["sentences"] for name, entry in results.items() if name.startswith("memory-"))
    if sizes:
        base = results[f"memory-{sizes[0]}"]
        print("\n| training sentences | peak RSS (MB) | encoding workers' peak (MB) | growth per sentence vs "
              f"{sizes[0]:,} (KB) | data stage (s) | train (s, {options.max_steps} steps) | test F1 |")
        print("|---|---|---|---|---|---|---|")
        for size in sizes:
            entry = results[f"memory-{size}"]
            growth = "" if size == sizes[0] else \
                f"{(entry['peak_memory_mb'] - base['peak_memory_mb']) * 1024 / (size - sizes[0]):.3f}"
            print(f"| {size:,} | {entry['peak_memory_mb']:.0f} | {entry['worker_peak_mb']:.0f} | {growth} | "
                  f"{entry['data_runtime']:.1f} | {entry['train_runtime']:.1f} | {entry['test_f1']:.4f} |")
    for name, entry in results.items():
        if name.startswith("cache-"):
            print(f"\ncache, {entry['sentences']:,} sentences: data stage {entry['cold_s']:.1f} s cold, "
                  f"{entry['warm_s']:.2f} s warm: {entry['speedup']}x; same test F1: {entry['same_test_f1']}")
    for side in ("new", "baseline"):
        speeds = [entry["train_samples_per_second"] for name, entry in results.items()
                  if name.startswith(f"speed-{side}-")]
        if speeds:
            print(f"speed {side}: train samples/s {[round(value, 1) for value in speeds]}, median "
                  f"{statistics.median(speeds):.1f}")
    new = [entry["train_samples_per_second"] for name, entry in results.items() if name.startswith("speed-new-")]
    old = [entry["train_samples_per_second"] for name, entry in results.items() if name.startswith("speed-baseline-")]
    if new and old:
        print(f"speed ratio (new / baseline, medians): {statistics.median(new) / statistics.median(old):.3f}")


if __name__ == "__main__":
    main()
