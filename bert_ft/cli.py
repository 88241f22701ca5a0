"""Command line: `run_task.py TASK [flags]` trains; `run_task.py predict --model_dir DIR` predicts.

The registry of tasks is passed in (the core never imports `tasks`), extended by plugins (`bert_ft.plugins`);
every flag comes from a dataclass.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from .config import TrainConfig, add_dataclass_flags, flag, resolve
from .errors import BertFtError, UsageError
from .export import ExportConfig
from .plugins import ENTRY_POINT_GROUP, split_task_modules, task_registry


@dataclass
class PredictConfig:
    model_dir: str = flag(None, "a bert-ft model folder (RUN/model)")
    input_file: str | None = flag(None, "one text per line, or JSONL with a \"text\" key (default: arguments or stdin)")
    output_file: str | None = flag(None, "write JSONL here (default: stdout)")
    max_seq_length: int | None = flag(None, "window size in sub-words (default: the training run's)")
    input_is_document: bool = flag(False, "the inputs are consecutive sentences of one document: each gets its "
                                   "neighbours as context (NER models trained with --context_size)")
    batch_size: int = flag(64, "inputs per forward pass")
    debug: bool = flag(False, "show full tracebacks on errors")


def build_parser(tasks: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_task.py", description="Fine-tune a BERT encoder with a task head, or predict with a trained one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks:\n" + "\n".join(f"  {name:<10} {task.description}" for name, task in tasks.items())
        + "\n  predict    predict on raw text with a trained model folder (or an export folder)"
        + "\n  export     export a trained model folder to ONNX (optionally int8), checked against the original"
        + "\n\n`run_task.py TASK --help` lists every flag. Tasks from outside bert-ft: --task_module MODULE, or the "
        + f"entry-point group {ENTRY_POINT_GROUP!r} (README: Custom tasks).")
    parser.add_argument("--task_module", metavar="MODULE", action="append",
                        help="import MODULE and register the Task subclasses it defines (repeatable)")
    commands = parser.add_subparsers(dest="task", metavar="{" + ",".join([*tasks, "predict", "export"]) + "}",
                                     required=True)
    for name, task in tasks.items():
        sub = commands.add_parser(name, help=task.description, description=task.description,
                                  argument_default=argparse.SUPPRESS)
        add_dataclass_flags(sub, TrainConfig, "training flags (shared by every task)")
        add_dataclass_flags(sub, task.options_type, f"{name} flags")
    predict = commands.add_parser("predict", help="predict on raw text with a trained model folder",
                                  argument_default=argparse.SUPPRESS)
    predict.add_argument("texts", nargs="*", help="texts to label (else --input_file or stdin)")
    add_dataclass_flags(predict, PredictConfig, "predict flags")
    export = commands.add_parser("export", help="export a trained model folder to ONNX, checked against it",
                                 argument_default=argparse.SUPPRESS)
    add_dataclass_flags(export, ExportConfig, "export flags")
    return parser


def parse(tasks: dict, argv: list[str]):
    """(task name, TrainConfig or PredictConfig, task instance or texts), after validating every flag at once."""
    namespace = build_parser(tasks).parse_args(argv)
    del namespace.task_module  # already read by split_task_modules
    if namespace.task == "predict":
        texts = getattr(namespace, "texts", [])
        values = {key: value for key, value in vars(namespace).items() if key != "texts"}
        (config,), problems = resolve(argparse.Namespace(**values), [PredictConfig])
        if not config.model_dir:
            problems.append("--model_dir: required (a RUN/model folder of a finished run)")
        if problems:
            raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
        return "predict", config, texts
    if namespace.task == "export":
        (config,), problems = resolve(namespace, [ExportConfig])
        if not config.model_dir:
            problems.append("--model_dir: required (a RUN/model folder of a finished run)")
        if config.max_eval_samples is not None and config.max_eval_samples < 1:
            problems.append(f"--max_eval_samples: must be >= 1, got {config.max_eval_samples}")
        if config.batch_size < 1:
            problems.append(f"--batch_size: must be >= 1, got {config.batch_size}")
        if problems:
            raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
        return "export", config, None
    task_type = tasks[namespace.task]
    (config, options), problems = resolve(namespace, [TrainConfig, task_type.options_type])
    task = task_type(options)
    problems += config.problems() + task.problems(config)
    if problems:
        raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
    return namespace.task, config, task


def predict_command(tasks: dict, config: PredictConfig, texts: list[str]) -> None:
    from .heads import load_model
    from .predict import predict_examples, read_inputs, write_results

    if not os.path.isdir(config.model_dir):
        raise UsageError(f"--model_dir {config.model_dir}: no such folder")
    inputs = read_inputs(texts, config.input_file)
    model, tokenizer, meta = load_model(config.model_dir, tasks)
    task_type = tasks[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    results = predict_examples(task, model, tokenizer, inputs, config.max_seq_length or meta.get("max_seq_length", 128),
                               config.batch_size, config.input_is_document)
    write_results(results, config.output_file)


def check_data_command(task, config: TrainConfig) -> None:
    """--check_data: read and encode every split exactly as training would, print the report, train nothing."""
    from .check_data import data_report
    from .train import prepare_data

    data = prepare_data(task, config)
    print(data_report(task, {split: getattr(data.splits, split) for split in data.features}, data.splits.sources,
                      data.features, data.labels, data.tokenizer, data.max_seq_length))


def main(tasks: dict, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        modules, argv = split_task_modules(argv)
        tasks = task_registry(tasks, modules)
        name, config, extra = parse(tasks, argv)
        if name == "predict":
            predict_command(tasks, config, extra)
            return 0
        if name == "export":
            from .export import export

            export(config, tasks)
            return 0
        if config.check_data:
            check_data_command(extra, config)
            return 0
        if config.hp_search:
            from .hpsearch import search

            search(extra, config, task_module=modules[0] if modules else None)
            return 0
        from .train import run

        run(extra, config, task_module=modules[0] if modules else None)
        return 0
    except BertFtError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
