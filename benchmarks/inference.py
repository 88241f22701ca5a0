"""CPU inference: transformers.pipeline vs bert-ft predict (PyTorch) vs the ONNX exports (fp32, int8), same texts.

    python benchmarks/inference.py ner --model_dir /work/runs_export/ner/model \
        --data ../shared/data/conll2003/test.txt
    python benchmarks/inference.py sentence --model_dir /work/runs_export/sst2/model \
        --data ../shared/data/sst2/dev.tsv

Every side gets the same raw texts (NER: the test sentences' words joined by spaces; sentence: the text column),
the same batch size (`--batch_size`, 32) and the same threads (`--threads`, 2: torch intra-op threads for the
pipeline and bert-ft's PyTorch side, onnxruntime intra-op threads for the exports; one inter-op thread):
  pipeline   transformers.pipeline on the PyTorch model folder ("token-classification" with
             aggregation_strategy="first", "text-classification"), the same weights;
  pytorch    bert-ft predict (`predict_examples`) on the model folder;
  onnx-fp32  bert-ft predict on the fp32 export folder (`run_task.py export`);
  onnx-int8  bert-ft predict on the int8 export folder (`run_task.py export --quantize int8`).
Missing export folders (RUN/onnx, RUN/onnx-int8) are made first. Measured per side: batched throughput (texts/s
over all texts, the best of `--repeats` runs, after a warm-up), batch-1 latency p50/p95 over `--latency_texts`
texts spread over the file (each text alone, tokenisation and decoding included). Scored on the labelled file
for the bert-ft sides: the task's metric (seqeval F1 / accuracy) and the expected calibration error (15 bins; raw
and at the model's fitted temperature); for the pipeline, the share of texts where its output equals bert-ft
PyTorch's (entities: type and character span; sentence: label).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("task", choices=("ner", "sentence"))
    parser.add_argument("--model_dir", required=True, help="a bert-ft model folder (RUN/model)")
    parser.add_argument("--data", required=True, help="labelled file whose texts are run and scored")
    parser.add_argument("--onnx_dir", help="fp32 export folder (default RUN/onnx; made when missing)")
    parser.add_argument("--int8_dir", help="int8 export folder (default RUN/onnx-int8; made when missing)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per side (the best is kept)")
    parser.add_argument("--latency_texts", type=int, default=200)
    parser.add_argument("--sides", nargs="+", default=["pipeline", "pytorch", "onnx-fp32", "onnx-int8"])
    parser.add_argument("--output", help="write the results as JSON here")
    return parser.parse_args(argv)


def texts_of(task_name: str, examples: list) -> list:
    if task_name == "ner":
        return [" ".join(example.words) for example in examples]
    return [example.text if example.text_pair is None else {"text": example.text, "text_pair": example.text_pair}
            for example in examples]


def pipeline_outputs(task_name: str, model_dir: str, batch_size: int):
    from transformers import pipeline

    if task_name == "ner":
        runner = pipeline("token-classification", model=model_dir, aggregation_strategy="first", device="cpu")
    else:
        runner = pipeline("text-classification", model=model_dir, device="cpu")

    def run(texts: list, size: int = batch_size) -> list:
        return runner(texts, batch_size=size)

    return run


def comparable(task_name: str, output) -> object:
    """Pipeline and bert-ft outputs in one form: entity (type, start, end) tuples, or the label."""
    if task_name == "ner":
        if isinstance(output, dict):
            return [(entity["type"], entity["start"], entity["end"]) for entity in output["entities"]]
        return [(entity["entity_group"], entity["start"], entity["end"]) for entity in output]
    if isinstance(output, list):
        output = output[0]
    return output["label"]


def timed_throughput(run, texts: list, repeats: int) -> tuple[float, list]:
    run(texts[:64])  # warm-up
    best, outputs = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = run(texts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best, outputs


def latencies(run_one, texts: list, count: int) -> tuple[float, float]:
    step = max(len(texts) // count, 1)
    chosen = texts[::step][:count]
    for text in chosen[:5]:
        run_one(text)
    times = []
    for text in chosen:
        start = time.perf_counter()
        run_one(text)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


def score(task, model, tokenizer, examples: list, max_seq_length: int, batch_size: int) -> dict:
    """The task's metrics and ECE (raw, and at the model's temperature) on the labelled examples."""
    from bert_ft.calibration import expected_calibration_error
    from bert_ft.data import Collator
    from bert_ft.inference import decode_batches, eval_loader, score_batches

    features = task.encode(examples, tokenizer, max_seq_length, model.labels)
    loader = eval_loader(features, Collator(task.pad_values(tokenizer)), batch_size)
    scored = score_batches(model, loader)
    result = {}
    for name, temperature in (("raw", 1.0), ("calibrated", None)):
        outputs = decode_batches(model, scored, len(features), temperature=temperature)
        evaluation = task.evaluate(examples, features, outputs, model.labels, "benchmark")
        if name == "raw":
            result.update(evaluation.metrics)
        result[f"ece_{name}"] = expected_calibration_error(evaluation.confidences)
    result["temperature"] = model.temperature
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import onnxruntime

    from bert_ft.export import ExportConfig, default_output_dir, export
    from bert_ft.model_folder import is_export_folder, load_exported
    from bert_ft.model_folder import load_model
    from bert_ft.prediction import predict_examples
    from bert_ft.plugins import registered_tasks
    TASKS = registered_tasks()

    model, tokenizer, meta = load_model(args.model_dir)
    task_type = TASKS[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    max_seq_length = meta.get("max_seq_length", 128)
    examples = task.read(args.data)
    texts = texts_of(args.task, examples)
    folders = {"onnx-fp32": args.onnx_dir or default_output_dir(args.model_dir, "none"),
               "onnx-int8": args.int8_dir or default_output_dir(args.model_dir, "int8")}
    for side, quantize in (("onnx-fp32", "none"), ("onnx-int8", "int8")):
        if side in args.sides and not is_export_folder(folders[side]):
            export(ExportConfig(model_dir=args.model_dir, quantize=quantize, output_dir=folders[side],
                                threads=args.threads))
    print(f"{args.task}: {len(texts)} texts from {args.data}; batch {args.batch_size}; {args.threads} threads; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}", flush=True)

    results, reference_outputs = {}, None
    for side in args.sides:
        if side == "pipeline":
            run = pipeline_outputs(args.task, args.model_dir, args.batch_size)
            throughput, outputs = timed_throughput(run, texts, args.repeats)
            p50, p95 = latencies(lambda text: run([text], 1), texts, args.latency_texts)
            results[side] = {"throughput": throughput, "p50_ms": p50, "p95_ms": p95,
                             "_outputs": [comparable(args.task, output) for output in outputs]}
        else:
            side_model = model if side == "pytorch" else load_exported(folders[side], args.threads)[0]

            def run(batch: list, size: int = args.batch_size) -> list:
                return predict_examples(task, side_model, tokenizer, batch, max_seq_length, size)

            throughput, outputs = timed_throughput(run, texts, args.repeats)
            p50, p95 = latencies(lambda text: run([text], 1), texts, args.latency_texts)
            results[side] = {"throughput": throughput, "p50_ms": p50, "p95_ms": p95,
                             **score(task, side_model, tokenizer, examples, max_seq_length, args.batch_size),
                             "_outputs": [comparable(args.task, output) for output in outputs]}
            if side == "pytorch":
                reference_outputs = results[side]["_outputs"]
        print(f"  {side}: {results[side]['throughput']:.1f} texts/s, p50 {results[side]['p50_ms']:.1f} ms, "
              f"p95 {results[side]['p95_ms']:.1f} ms", flush=True)
    metric = task.metric
    base = results.get("pipeline", {}).get("throughput")
    rows = ["| side | texts/s (batch %d) | vs pipeline | batch-1 p50 ms | p95 ms | %s | drop (points) | "
            "same output as bert-ft PyTorch | ECE raw | ECE calibrated |" % (args.batch_size, metric),
            "|---|---|---|---|---|---|---|---|---|---|"]
    reference_score = results.get("pytorch", {}).get(metric)

    def shown(value, form: str = "{:.4f}") -> str:
        return form.format(value) if value is not None else ""

    for side, values in results.items():
        same = sum(a == b for a, b in zip(values["_outputs"], reference_outputs)) if reference_outputs else None
        drop = (reference_score - values[metric]) * 100 if metric in values and reference_score is not None else None
        rows.append(" | ".join([
            f"| {side}", f"{values['throughput']:.1f}", shown(values["throughput"] / base if base else None, "{:.2f}x"),
            f"{values['p50_ms']:.1f}", f"{values['p95_ms']:.1f}",
            shown(values.get(metric)) or "(same weights)", shown(drop, "{:+.2f}"),
            f"{same}/{len(texts)}" if same is not None else "", shown(values.get("ece_raw")),
            shown(values.get("ece_calibrated"))]) + " |")
    print("\n".join(rows))
    summary = {"task": args.task, "data": args.data, "texts": len(texts), "batch_size": args.batch_size,
               "threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "load_average_at_end": os.getloadavg(),
               "sides": {side: {key: value for key, value in values.items() if key != "_outputs"}
                         for side, values in results.items()}}
    if args.output:
        from bert_ft.io import atomic_write_json

        atomic_write_json(args.output, summary)
    return summary


if __name__ == "__main__":
    main()
