"""Temperature fits compared on a trained model: the gold labels' negative log-likelihood (the old fit,
`--calibration_objective label`) against the log loss of the judged confidences (`--calibration_objective
confidence`, the default now).

    python benchmarks/calibration_fit.py --run_dir /work/runs_export/ner --cross_fit 200
    python benchmarks/calibration_fit.py --run_dir /work/runs_export/ner_crf --cross_fit 200
    python benchmarks/calibration_fit.py --run_dir /work/runs_export/sst2 --cross_fit 200

The run folder's config.json names the task, its options and the data (validation file or seeded validation split,
test file, --max_eval_samples), so the validation and test examples are those the run scored; --model_dir,
--validation_file and --test_file override it. The encoder runs once per split (packed batches of 128 as in
training's evaluation, fp32; with --cache DIR the scores are kept there and reused); each fit is what training
runs (`bert_ft.calibration.calibrate` on the stored validation scores, the confidence fit decoding them again at
every temperature it tries, with its fallback to the label NLL). Printed per temperature (T = 1, each fit, and
with --oracle the confidence fit on test itself, a reference only): validation and test ECE (15 equal-width
bins), the test/raw ECE ratio, the confidences' log loss, the predictions that differ from those at T = 1 (must be
0) and the fit's seconds. --scan LOW HIGH STEP adds the ECE, log loss and Brier score of both splits at each T of
a grid; --bins each fit's reliability (count, mean confidence, share right) per ECE bin.

--cross_fit R: which objective generalises better within the validation distribution. The validation examples are
scored again in random units of --unit_size examples (packed); at every temperature of a 1 % log grid over
[0.5, 4] each unit's label NLL (`Head.calibration_nll`) and confidences (`Task.confidences`) are stored; then R
times the units are split at random into two halves, each objective is fitted (on the grid) on one half and the
ECE is measured on the other. Printed: mean held-out ECE before and after, mean after/before ratio, how often the
ratio is <= 0.5, and how often each objective beats the other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--run_dir", required=True, help="a finished run folder (config.json, model/)")
    parser.add_argument("--model_dir", help="the model folder (default RUN/model)")
    parser.add_argument("--validation_file", help="default: the run's validation file or seeded validation split")
    parser.add_argument("--test_file", help="default: the run's test file")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", help="folder for the encoder scores (reused when the model and data match)")
    parser.add_argument("--oracle", action="store_true", help="also fit on test itself (a reference, not a method)")
    parser.add_argument("--scan", type=float, nargs=3, metavar=("LOW", "HIGH", "STEP"),
                        help="also print validation and test ECE, log loss and Brier score at T = LOW, LOW + STEP, "
                             "... <= HIGH")
    parser.add_argument("--bins", action="store_true", help="also print each fit's reliability per ECE bin")
    parser.add_argument("--cross_fit", type=int, default=0, help="random half/half splits of validation (0: none)")
    parser.add_argument("--unit_size", type=int, default=16, help="examples per unit of the cross-fit splits")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser.parse_args(argv)


def load_run(args):
    """(task, model, tokenizer, meta, {split: examples}, {split: source}) as the run saw its data."""
    from bert_ft.config import TrainConfig
    from bert_ft.model_folder import load_model
    from bert_ft.data_stage import load_splits
    from bert_ft.plugins import registered_tasks
    TASKS = registered_tasks()

    with open(os.path.join(args.run_dir, "config.json"), encoding="utf-8") as handle:
        run = json.load(handle)
    model_dir = args.model_dir or os.path.join(args.run_dir, "model")
    model, tokenizer, meta = load_model(model_dir)
    task_type = TASKS[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    validation_file = args.validation_file or run.get("validation_file")
    config = TrainConfig(train_file=run["train_file"], validation_file=validation_file,
                         test_file=args.test_file or run.get("test_file"),
                         validation_split=0.0 if args.validation_file else run.get("validation_split", 0.0),
                         seed=run.get("seed", 42), max_eval_samples=run.get("max_eval_samples"),
                         max_train_samples=1)  # the training examples are not needed
    splits = load_splits(task, config)
    examples = {split: getattr(splits, split) for split in ("validation", "test") if getattr(splits, split)}
    return task, model, tokenizer, meta, examples, {split: splits.sources[split] for split in examples}, model_dir


def scored_split(task, model, tokenizer, examples, max_seq_length, batch_size, cache, key):
    """(features, [(batch, scores)]): the encoder run once (packed, fp32), cached under `cache` when given."""
    import torch

    from bert_ft.data import Collator
    from bert_ft.inference import eval_loader, score_batches

    features = task.encode(examples, tokenizer, max_seq_length, model.labels)
    path = os.path.join(cache, key + ".pt") if cache else None
    if path and os.path.isfile(path):
        return features, torch.load(path)
    loader = eval_loader(features, Collator(task.pad_values(tokenizer), pack=True), batch_size)
    start = time.perf_counter()
    scored = score_batches(model, loader)
    print(f"  scored {len(features)} features in {time.perf_counter() - start:.1f} s", flush=True)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(scored, path)
    return features, scored


def unit_statistics(task, model, tokenizer, examples, max_seq_length, unit_size, cache, key):
    """Per unit of `unit_size` random examples and per grid temperature: (label NLL sum, label count) and the
    confidences' (log loss sum, count, per ECE bin: count, confidence sum, correct sum). Returns (grid, nll
    (units, T, 2), confidence (units, T, 2 + 3 * bins))."""
    import math
    import random

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from bert_ft.calibration import ECE_BINS, PROBABILITY_FLOOR
    from bert_ft.data import Collator, FeatureDataset
    from bert_ft.inference import decode_batches, score_batches
    from bert_ft.task import Features

    features = task.encode(examples, tokenizer, max_seq_length, model.labels)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    units = [order[start:start + unit_size] for start in range(0, len(order), unit_size)]
    by_example = features.by_example(len(examples))
    batches = [[feature for example in unit for feature in by_example[example]] for unit in units]
    path = os.path.join(cache, f"{key}-units{unit_size}.pt") if cache else None
    if path and os.path.isfile(path):
        scored = torch.load(path)
    else:
        loader = DataLoader(FeatureDataset(features.inputs), batch_sampler=batches,
                            collate_fn=Collator(task.pad_values(tokenizer), pack=True))
        scored = score_batches(model, loader)
        if path:
            torch.save(scored, path)
    sub_features = []  # each unit's examples as a Features of their own (task.confidences per unit)
    for unit, batch in zip(units, batches):
        local = {example: position for position, example in enumerate(unit)}
        sub_features.append(Features([features.inputs[index] for index in batch],
                                     [local[features.example_index[index]] for index in batch],
                                     [features.lengths[index] for index in batch],
                                     [features.meta[index] for index in batch]))
    grid = np.exp(np.linspace(math.log(0.5), math.log(4.0), 210))
    nll = np.zeros((len(units), len(grid), 2))
    confidence = np.zeros((len(units), len(grid), 2 + 3 * ECE_BINS))
    with torch.inference_mode():
        for step, temperature in enumerate(grid.tolist()):
            outputs = decode_batches(model, scored, len(features), temperature=temperature)
            for number, (unit, batch, (scores_batch, scores)) in enumerate(zip(units, batches, scored)):
                total, count = model.calibration_nll(scores, scores_batch, temperature)
                nll[number, step] = float(total), count
                pairs = task.confidences([examples[example] for example in unit], sub_features[number],
                                         [outputs[index] for index in batch], model.labels)
                row = confidence[number, step]
                for value, correct in pairs:
                    clipped = min(max(float(value), PROBABILITY_FLOOR), 1.0 - PROBABILITY_FLOOR)
                    row[0] -= math.log(clipped if correct else 1.0 - clipped)
                    row[1] += 1
                    index = min(max(math.ceil(float(value) * ECE_BINS) - 1, 0), ECE_BINS - 1)
                    row[2 + index] += 1
                    row[2 + ECE_BINS + index] += float(value)
                    row[2 + 2 * ECE_BINS + index] += bool(correct)
    return grid, nll, confidence


def cross_fit(grid, nll, confidence, repeats: int) -> dict:
    """Fit each objective on a random half of the units, measure the ECE on the other half, `repeats` times."""
    import numpy as np

    def ece(rows):  # rows: (units, 2 + 3 * bins) at one temperature
        summed = rows.sum(axis=0)
        counts, confidences, correct = np.split(summed[2:], 3)
        return float(np.abs(correct - confidences).sum() / max(counts.sum(), 1))

    one = int(np.argmin(np.abs(grid - 1.0)))
    rng = np.random.default_rng(0)
    found = {"before": [], "label NLL (old)": [], "confidence log loss (new)": [], "T old": [], "T new": []}
    for _ in range(repeats):
        chosen = rng.permutation(len(nll)) < len(nll) // 2
        fit_nll = nll[chosen].sum(axis=0)
        fit_confidence = confidence[chosen].sum(axis=0)
        old = int(np.argmin(fit_nll[:, 0] / fit_nll[:, 1]))
        new = int(np.argmin(fit_confidence[:, 0] / fit_confidence[:, 1]))
        held = confidence[~chosen]
        found["before"].append(ece(held[:, one]))
        found["label NLL (old)"].append(ece(held[:, old]))
        found["confidence log loss (new)"].append(ece(held[:, new]))
        found["T old"].append(float(grid[old]))
        found["T new"].append(float(grid[new]))
    before = np.array(found["before"])
    summary = {"repeats": repeats, "units": len(nll), "ece_before_mean": float(before.mean())}
    for name in ("label NLL (old)", "confidence log loss (new)"):
        after = np.array(found[name])
        summary[name] = {"ece_after_mean": float(after.mean()), "ratio_mean": float((after / before).mean()),
                         "ratio_at_most_half": float((after <= before / 2).mean())}
    old, new = np.array(found["label NLL (old)"]), np.array(found["confidence log loss (new)"])
    summary["new_better"], summary["old_better"] = float((new < old).mean()), float((old < new).mean())
    summary["T_old_mean"], summary["T_new_mean"] = float(np.mean(found["T old"])), float(np.mean(found["T new"]))
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from bert_ft.calibration import calibrate, expected_calibration_error, log_loss
    from bert_ft.inference import decode_batches

    task, model, tokenizer, meta, examples, sources, model_dir = load_run(args)
    max_seq_length = meta.get("max_seq_length", 128)
    stamp = hashlib.sha256(json.dumps([os.path.abspath(model_dir), os.path.getmtime(model_dir),
                                       sources]).encode()).hexdigest()[:12]
    print(f"{meta['task']} ({'CRF' if meta.get('head_options', {}).get('use_crf') else 'linear/classifier'} head), "
          f"model {model_dir}; stored T {model.temperature}", flush=True)
    data = {}
    for split, items in examples.items():
        print(f"{split}: {len(items)} examples from {sources[split]}", flush=True)
        data[split] = scored_split(task, model, tokenizer, items, max_seq_length, args.batch_size, args.cache,
                                   f"{stamp}-{split}")

    def outputs_at(split: str, temperature: float) -> list[dict]:
        features, scored = data[split]
        return decode_batches(model, scored, len(features), temperature=temperature)

    def pairs_at(split: str, temperature: float) -> list[tuple[float, bool]]:
        features, _ = data[split]
        return task.confidences(examples[split], features, outputs_at(split, temperature), model.labels)

    fits = {"raw": {"temperature": 1.0, "objective": "-", "seconds": 0.0}}
    plan = [("label NLL (old)", "validation", "label"), ("confidence log loss (new)", "validation", "confidence")]
    if args.oracle and "test" in data:
        plan.append(("oracle: confidence log loss on test", "test", "confidence"))
    for name, split, objective in plan:  # what training runs with --calibration_objective label / confidence
        start = time.perf_counter()
        fits[name] = calibrate(model, data[split][1], lambda t, split=split: pairs_at(split, t), None, objective)
        fits[name]["seconds"] = time.perf_counter() - start

    reference = {split: outputs_at(split, 1.0) for split in data}
    results = {}
    for name, fit in fits.items():
        temperature = fit["temperature"]
        row = {"temperature": temperature, "objective": fit["objective"], "fit_seconds": round(fit["seconds"], 1)}
        for split in data:
            outputs = outputs_at(split, temperature)
            pairs = task.confidences(examples[split], data[split][0], outputs, model.labels)
            row[f"{split}_ece"] = expected_calibration_error(pairs)
            row[f"{split}_log_loss"] = log_loss(pairs)
            row[f"{split}_predictions"] = len(pairs)
            row[f"{split}_correct"] = sum(correct for _, correct in pairs)
            row[f"{split}_changed"] = sum(not np.array_equal(output["pred"], before["pred"])
                                          for output, before in zip(outputs, reference[split]))
        results[name] = row
    raw = results["raw"]
    print(f"\n{meta['task']}: validation {raw['validation_predictions']} predictions "
          f"({raw['validation_correct']} correct), test {raw.get('test_predictions')} "
          f"({raw.get('test_correct')} correct)")
    print("| fit | objective used | T | validation ECE | test ECE | test ECE / raw | validation log loss | "
          "test log loss | predictions changed | fit seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def shown(value, form: str = "{:.4f}") -> str:
        return form.format(value) if value is not None else "-"

    for name, row in results.items():
        ratio = row["test_ece"] / raw["test_ece"] if row.get("test_ece") is not None and raw["test_ece"] else None
        print(f"| {name} | {row['objective']} | {row['temperature']:.4f} | {shown(row['validation_ece'])} | "
              f"{shown(row.get('test_ece'))} | {shown(ratio, '{:.2f}')} | {shown(row['validation_log_loss'])} | "
              f"{shown(row.get('test_log_loss'))} | {row['validation_changed'] + row.get('test_changed', 0)} | "
              f"{row['fit_seconds']} |")
    if args.bins:
        from bert_ft.calibration import ECE_BINS

        for name, fit in fits.items():
            for split in data:
                cells = [[0, 0.0, 0] for _ in range(ECE_BINS)]
                for value, correct in pairs_at(split, fit["temperature"]):
                    cell = cells[min(max(math.ceil(float(value) * ECE_BINS) - 1, 0), ECE_BINS - 1)]
                    cell[0], cell[1], cell[2] = cell[0] + 1, cell[1] + float(value), cell[2] + bool(correct)
                print(f"{name}, {split} at T {fit['temperature']:.4f}, per bin (count: mean confidence / right): "
                      + ", ".join(f"{count}: {total / count:.2f}/{right / count:.2f}"
                                  for count, total, right in cells if count))
    scan = []
    if args.scan:
        low, high, step = args.scan
        print("\n| T | " + " | ".join(f"{split} ECE | {split} log loss | {split} Brier" for split in data) + " |")
        print("|---|" + "---|---|---|" * len(data))
        for index in range(int(round((high - low) / step)) + 1):
            temperature = round(low + index * step, 6)
            row = {"temperature": temperature}
            for split in data:
                pairs = pairs_at(split, temperature)
                row[split] = {"ece": expected_calibration_error(pairs), "log_loss": log_loss(pairs),
                              "brier": sum((value - correct) ** 2 for value, correct in pairs) / len(pairs)}
            scan.append(row)
            print(f"| {temperature:.3f} | " + " | ".join(f"{row[split]['ece']:.4f} | {row[split]['log_loss']:.4f} | "
                                                        f"{row[split]['brier']:.5f}" for split in data) + " |",
                  flush=True)
    crossed = None
    if args.cross_fit:
        start = time.perf_counter()
        grid, nll, confidence = unit_statistics(task, model, tokenizer, examples["validation"], max_seq_length,
                                                args.unit_size, args.cache, f"{stamp}-validation")
        crossed = cross_fit(grid, nll, confidence, args.cross_fit)
        print(f"\ncross-fit on validation ({crossed['units']} units of {args.unit_size} examples, {args.cross_fit} "
              f"random half/half splits, {time.perf_counter() - start:.0f} s): fit on one half, ECE on the other")
        print("| fit | mean T | held-out ECE before | after | after / before (mean) | splits with ratio <= 0.5 |")
        print("|---|---|---|---|---|---|")
        for name, key in (("label NLL (old)", "T_old_mean"), ("confidence log loss (new)", "T_new_mean")):
            row = crossed[name]
            print(f"| {name} | {crossed[key]:.3f} | {crossed['ece_before_mean']:.4f} | {row['ece_after_mean']:.4f} | "
                  f"{row['ratio_mean']:.2f} | {row['ratio_at_most_half']:.0%} |")
        print(f"new fit lower held-out ECE in {crossed['new_better']:.0%} of the splits, old fit in "
              f"{crossed['old_better']:.0%}")
    summary = {"run_dir": args.run_dir, "model_dir": model_dir, "task": meta["task"],
               "head_options": meta.get("head_options", {}), "sources": sources, "torch": torch.__version__,
               "threads": args.threads, "fits": {name: {key: value for key, value in fit.items()}
                                                 for name, fit in fits.items()}, "results": results,
               "scan": scan, "cross_fit": crossed}
    if args.output:
        from bert_ft.io import atomic_write_json

        atomic_write_json(args.output, summary)
    return summary


if __name__ == "__main__":
    main()
