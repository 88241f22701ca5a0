"""Command line: `bert-ft TASK [flags]` (or `python run_task.py TASK [flags]`) trains; `bert-ft predict --model_dir
DIR` predicts; `bert-ft export --model_dir DIR` exports to ONNX.

The sub-commands come from the task registry (`bert_ft.plugins.registered_tasks`: entry points plus
--task_module; the core never imports a task package); every flag comes from a dataclass.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import dataclass

from .annotation import OUTPUT_FORMATS
from .check_data import data_report
from .config import TrainConfig, add_dataclass_flags, flag, resolve
from .data_stage import prepare_data
from .errors import BertFtError, UsageError
from .export import ExportConfig, export
from .hpsearch import search
from .model_folder import load_model
from .plugins import ENTRY_POINT_GROUP, registered_commands, registered_tasks, split_task_modules, use_task_modules
from .prediction import predict_examples, read_inputs, write_pre_annotations, write_results
from .train import run
from .verbosity import set_verbose


PREDICT_LEGEND = """\
output fields:
  NER        entities: {text, type, start, end (character offsets, end exclusive), score, probability}
               probability  the probability that this exact entity (its span and type) is right: calibrated when
                            the run fitted a temperature (report.txt, calibration); use it to rank or threshold
               score        the mean of its words' tag probabilities (what transformers' pipeline reports);
                            higher than probability for long or uncertain spans, not calibrated
  relation   label, probability (of that label, calibrated as above), probabilities (every label)
  sentence   label, probabilities (of every label, calibrated as above; the label has the highest)
Labels keep their type: a model trained on integer labels (e.g. 1-5 star ratings) predicts integers.
--output_format label-studio|doccano writes pre-annotations to import into those tools instead (scores: the
probabilities above); an --input_file exported from either tool is read as its tasks."""


@dataclass
class PredictConfig:
    model_dir: str = flag(None, "a bert-ft model folder (RUN/model)")
    input_file: str | None = flag(None, "one text per line, or JSONL with a \"text\" key (default: arguments or stdin)")
    output_file: str | None = flag(None, "write JSONL here (default: stdout)")
    output_format: str = flag("json", "json: one result per input (JSONL); label-studio: tasks with predictions "
                              "(model_version, scores) to import into Label Studio; doccano: JSONL to import into "
                              "doccano. An --input_file exported from either tool is read as its tasks",
                              choices=OUTPUT_FORMATS)
    max_seq_length: int | None = flag(None, "window size in sub-words (default: the training run's)")
    input_is_document: bool = flag(False, "the inputs are consecutive sentences of one document: each gets its "
                                   "neighbours as context (NER models trained with --context_size)")
    batch_size: int = flag(64, "inputs per forward pass")
    debug: bool = flag(False, "show full tracebacks on errors")


def program_name() -> str:
    """How the user called us, for usage lines: `bert-ft` (the console script) or `run_task.py`."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "bert-ft" if called == "bert-ft" else "run_task.py"


def build_parser() -> argparse.ArgumentParser:
    tasks, extra_commands = registered_tasks(), registered_commands()
    parser = argparse.ArgumentParser(
        prog=program_name(), allow_abbrev=False,
        description="Fine-tune a BERT encoder with a task head, or predict with a trained one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks:\n" + "\n".join(f"  {name:<10} {task.description}" for name, task in tasks.items())
        + "\n  predict    predict on raw text with a trained model folder (or an export folder)"
        + "\n  export     export a trained model folder to ONNX (optionally int8), checked against the original"
        + "".join(f"\n  {name:<10} {command.description}" for name, command in extra_commands.items())
        + f"\n\n`{program_name()} TASK --help` lists every flag. Tasks from outside bert-ft: --task_module MODULE, "
        + f"or the entry-point group {ENTRY_POINT_GROUP!r} (README: Custom tasks).")
    parser.add_argument("--task_module", metavar="MODULE", action="append",
                        help="import MODULE and register the Task subclasses it defines (repeatable)")
    commands = parser.add_subparsers(dest="task", metavar="{" + ",".join([*tasks, "predict", "export",
                                                                         *extra_commands]) + "}", required=True)
    for name, task in tasks.items():
        sub = commands.add_parser(name, help=task.description, description=task.description,
                                  argument_default=argparse.SUPPRESS, allow_abbrev=False)
        add_dataclass_flags(sub, TrainConfig, "training flags (shared by every task)")
        add_dataclass_flags(sub, task.options_type, f"{name} flags")
    predict = commands.add_parser("predict", help="predict on raw text with a trained model folder",
                                  description="Predict on raw text with a trained model folder: one JSON object per "
                                  "input.", epilog=PREDICT_LEGEND, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  argument_default=argparse.SUPPRESS, allow_abbrev=False)
    predict.add_argument("texts", nargs="*", help="texts to label (else --input_file or stdin)")
    add_dataclass_flags(predict, PredictConfig, "predict flags")
    export = commands.add_parser("export", help="export a trained model folder to ONNX, checked against it",
                                 argument_default=argparse.SUPPRESS, allow_abbrev=False)
    add_dataclass_flags(export, ExportConfig, "export flags")
    for name, command in extra_commands.items():
        sub = commands.add_parser(name, help=command.description, description=command.description,
                                  epilog=command.epilog or None, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  argument_default=argparse.SUPPRESS, allow_abbrev=False)
        if command.takes_texts:
            sub.add_argument("texts", nargs="*", help="texts (else --input_file or stdin)")
        add_dataclass_flags(sub, command.config_type, f"{name} flags")
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(action.choices)


def refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit (status 2) with the command's own usage and, for each unknown flag, the nearest known ones."""
    sub = _subparsers(parser).get(command, parser)
    known = [option for action in sub._actions for option in action.option_strings if option.startswith("--")]
    hints = []
    for item in unknown:
        if item.startswith("--"):
            close = difflib.get_close_matches(item.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{item.split('=', 1)[0]}: did you mean {' or '.join(close)}?")
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + ("\n  " + "\n  ".join(hints) if hints else "")
              + f"\n  (`{program_name()} {command} --help` lists every flag)")


def parse(argv: list[str]):
    """(task name, TrainConfig or PredictConfig, task instance or texts), after validating every flag at once."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(parser, namespace.task, unknown)
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
    if namespace.task in registered_commands():
        command = registered_commands()[namespace.task]()
        texts = getattr(namespace, "texts", [])
        values = {key: value for key, value in vars(namespace).items() if key != "texts"}
        (config,), problems = resolve(argparse.Namespace(**values), [command.config_type])
        problems += command.problems(config)
        if problems:
            raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
        return namespace.task, config, (command, texts)
    task_type = registered_tasks()[namespace.task]
    (config, options), problems = resolve(namespace, [TrainConfig, task_type.options_type])
    task = task_type(options)
    problems += config.problems() + task.problems(config)
    if problems:
        raise UsageError("invalid flags:\n  " + "\n  ".join(problems))
    return namespace.task, config, task


def predict_command(config: PredictConfig, texts: list[str]) -> None:
    if not os.path.isdir(config.model_dir):
        raise UsageError(f"--model_dir {config.model_dir}: no such folder")
    inputs = read_inputs(texts, config.input_file)
    model, tokenizer, meta = load_model(config.model_dir)
    task_type = registered_tasks()[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    max_seq_length = config.max_seq_length or meta.get("max_seq_length", 128)

    def predict(items: list) -> list[dict]:
        return predict_examples(task, model, tokenizer, items, max_seq_length, config.batch_size,
                                config.input_is_document)

    if config.output_format == "json":
        write_results(predict(task.tool_inputs(inputs)), config.output_file,
                      f"{meta['task']} predictions of {config.model_dir}")
        return
    folder = os.path.abspath(config.model_dir)
    model_version = f"bert-ft {meta['task']} {os.path.basename(os.path.dirname(folder))}/{os.path.basename(folder)}"
    write_pre_annotations(task.pre_annotations(inputs, predict), config.output_format, model_version,
                          config.output_file)


def check_data_command(task, config: TrainConfig) -> None:
    """--check_data: read and encode every split exactly as training would, print the report, train nothing."""
    data = prepare_data(task, config)
    print(data_report(task, {split: getattr(data.splits, split) for split in data.features}, data.splits.sources,
                      data.features, data.labels, data.tokenizer, data.max_seq_length))


def main(argv: list[str] | None = None) -> int:
    """The `bert-ft` console script and `python run_task.py`: returns the exit status (2 on a reported error)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        modules, argv = split_task_modules(argv)
        use_task_modules(modules)
        name, config, extra = parse(argv)
        set_verbose(getattr(config, "verbose", False))
        if name == "predict":
            predict_command(config, extra)
            return 0
        if name == "export":
            export(config)
            return 0
        if isinstance(extra, tuple):  # a plugin command (bert_ft.plugins.Command): (command, texts)
            command, texts = extra
            command.run(config, texts)
            return 0
        if config.check_data:
            check_data_command(extra, config)
            return 0
        if config.hp_search:
            search(extra, config, task_module=modules[0] if modules else None)
            return 0
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
