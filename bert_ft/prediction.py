"""Prediction on raw inputs with a trained model folder: the `predict` command and the Python API's `predict`.

The outline is the same for every task: the task turns inputs into examples and features, the one inference
loop (`bert_ft.inference.infer`) runs the model on sorted padded batches, and the task turns the outputs into one
JSON-ready dict per input.
"""

from __future__ import annotations

import json
import sys
import weakref
from typing import Any, Iterable

import torch

from .annotation import detect_tool, read_tool_records, tool_output
from .data import Collator, looks_like_jsonl, read_jsonl_records, read_text_lines
from .errors import DataError, UsageError
from .inference import eval_loader, infer, packing_is_exact
from .io import atomic_write_lines


# Whether packed rows reproduced padded ones, per loaded model: the answer is the architecture's, and the check's
# forward passes on new shapes cost more than a small predict call (oneDNN builds kernels per shape on CPUs), so it
# runs on the first call's inputs only.
_PACKING_EXACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # {model: bool}


def predict_examples(task: Any, model: torch.nn.Module, tokenizer: Any, inputs: list, max_seq_length: int,
                     batch_size: int, document: bool = False, pack: bool = False) -> list[dict]:
    """One result per input, in input order (long texts through the task's windows). `document`: the inputs are
    consecutive sentences of one document (for tasks with `document_inputs`, e.g. NER with document context).
    `pack`: several inputs per row (fewer padding tokens on short inputs), used only where `packing_is_exact`
    found packed rows reproduce padded ones for this model (checked once, on the first call with two or more
    inputs)."""
    if document and not getattr(task, "document_inputs", False):
        raise UsageError(f"--input_is_document: the {task.name} task has no document context; drop the flag")
    examples = task.input_examples(list(inputs), document=True) if document else task.input_examples(list(inputs))
    if not examples:
        return []
    features = task.encode(examples, tokenizer, max_seq_length, model.labels)
    pad_values = task.pad_values(tokenizer)
    if pack and task.packable and model not in _PACKING_EXACT and len(features) >= 2:  # one feature proves nothing
        _PACKING_EXACT[model] = packing_is_exact(model, features, pad_values)
    pack = pack and task.packable and _PACKING_EXACT.get(model, False)
    loader = eval_loader(features, Collator(pad_values, pack=pack), batch_size)
    outputs = infer(model, loader, len(features))
    return task.results(examples, features, outputs, model.labels)


def read_inputs(texts: list[str], input_file: str | None) -> list:
    """Raw inputs: text arguments, else --input_file (one text per line, or JSONL objects), else stdin."""
    if texts:
        return list(texts)
    if input_file and detect_tool(input_file):  # a Label Studio / doccano export: every task, as ToolRecords
        records = list(read_tool_records(input_file, detect_tool(input_file), source="any"))
        if not records:
            raise DataError(input_file, None, "no task with a text", "export the tasks to pre-annotate")
        return records
    if input_file:
        lines, source = read_text_lines(input_file), input_file
    else:
        lines, source = sys.stdin.read().splitlines(), "<stdin>"
    if looks_like_jsonl(lines):
        inputs = [record for _, record in read_jsonl_records(source, lines)]
    else:
        inputs = [line for line in lines if line.strip()]
    if not inputs:
        raise DataError(source, None, "no input text", "give texts as arguments, --input_file, or on stdin")
    return inputs


def write_pre_annotations(predictions: list, output_format: str, model_version: str, output_file: str | None
                          ) -> None:
    """The file an annotation tool imports: a Label Studio task array or doccano JSON Lines (to stdout without
    --output_file)."""
    lines = tool_output(predictions, output_format, model_version)
    if output_file:
        atomic_write_lines(output_file, lines)
        what = "Label Studio tasks with predictions (JSON)" if output_format == "label-studio" else \
            "doccano records (JSON Lines)"
        print(f"wrote {len(predictions)} {what} to {output_file}", file=sys.stderr)
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))


def write_results(results: Iterable[dict], output_file: str | None, what: str = "predictions") -> None:
    """JSON Lines to `output_file` (atomically, then one line on stderr saying where and what) or to stdout."""
    lines = [json.dumps(result, ensure_ascii=False) for result in results]
    if output_file:
        atomic_write_lines(output_file, lines)
        print(f"wrote {len(lines)} {what} (JSON Lines, one per input) to {output_file}", file=sys.stderr)
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
