"""Command line: `run_task.py TASK [flags]` trains; `run_task.py predict --model_dir DIR` predicts.

The registry of tasks is passed in (the core never imports `tasks`); every flag comes from a dataclass.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from .config import TrainConfig, add_dataclass_flags, flag, resolve
from .errors import BertFtError, UsageError


@dataclass
class PredictConfig:
    model_dir: str = flag(None, "a bert-ft model folder (RUN/model)")
    input_file: str | None = flag(None, "one text per line, or JSONL with a \"text\" key (default: arguments or stdin)")
    output_file: str | None = flag(None, "write JSONL here (default: stdout)")
    max_seq_length: int | None = flag(None, "window size in sub-words (default: the training run's)")
    batch_size: int = flag(64, "inputs per forward pass")
    debug: bool = flag(False, "show full tracebacks on errors")


def build_parser(tasks: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_task.py", description="Fine-tune a BERT encoder with a task head, or predict with a trained one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks:\n" + "\n".join(f"  {name:<10} {task.description}" for name, task in tasks.items())
        + "\n  predict    predict on raw text with a trained model folder"
        + "\n\n`run_task.py TASK --help` lists every flag.")
    commands = parser.add_subparsers(dest="task", metavar="{" + ",".join([*tasks, "predict"]) + "}", required=True)
    for name, task in tasks.items():
        sub = commands.add_parser(name, help=task.description, description=task.description,
                                  argument_default=argparse.SUPPRESS)
        add_dataclass_flags(sub, TrainConfig, "training flags (shared by every task)")
        add_dataclass_flags(sub, task.options_type, f"{name} flags")
    predict = commands.add_parser("predict", help="predict on raw text with a trained model folder",
                                  argument_default=argparse.SUPPRESS)
    predict.add_argument("texts", nargs="*", help="texts to label (else --input_file or stdin)")
    add_dataclass_flags(predict, PredictConfig, "predict flags")
    return parser


def parse(tasks: dict, argv: list[str]):
    """(task name, TrainConfig or PredictConfig, task options or texts), after validating every flag at once."""
    namespace = build_parser(tasks).parse_args(argv)
    if namespace.task == "predict":
        texts = getattr(namespace, "texts", [])
        values = {key: value for key, value in vars(namespace).items() if key != "texts"}
        (config,), problems = resolve(argparse.Namespace(**values), [PredictConfig])
        if not config.model_dir:
            problems.append("--model_dir: required (a RUN/model folder of a finished run)")
        if problems:
            raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
        return "predict", config, texts
    task = tasks[namespace.task]
    (config, options), problems = resolve(namespace, [TrainConfig, task.options_type])
    problems += config.problems()
    if hasattr(options, "problems"):
        problems += options.problems(config)
    if problems:
        raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
    return namespace.task, config, options


def predict_command(tasks: dict, config: PredictConfig, texts: list[str]) -> None:
    from .heads import load_model
    from .predict import read_inputs, write_results

    if not os.path.isdir(config.model_dir):
        raise UsageError(f"--model_dir {config.model_dir}: no such folder")
    inputs = read_inputs(texts, config.input_file)
    model, tokenizer, meta = load_model(config.model_dir)
    if meta.get("task") not in tasks:
        raise UsageError(f"{config.model_dir}: trained for task {meta.get('task')!r}, which this bert-ft lacks")
    task = tasks[meta["task"]](tasks[meta["task"]].options_type(**meta.get("task_options", {})))
    results = task.predict(model, tokenizer, inputs, config.max_seq_length or meta.get("max_seq_length", 128),
                           config.batch_size)
    write_results(results, config.output_file)


def main(tasks: dict, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        name, config, extra = parse(tasks, argv)
        if name == "predict":
            predict_command(tasks, config, extra)
            return 0
        from .train import run

        run(tasks[name](extra), config, extra, name)
        return 0
    except BertFtError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
