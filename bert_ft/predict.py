"""Inference outside training: batched, length-sorted, under torch.inference_mode; the `predict` command."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

import torch

from .data import LengthGroupedSampler, PaddingCollator, read_jsonl_records
from .errors import DataError
from .io import atomic_write_lines


def run_model(model: torch.nn.Module, features: list[dict], pad_values: dict, batch_size: int) -> list[dict]:
    """`model.predict` outputs per feature (numpy rows), in feature order."""
    device = next(model.parameters()).device
    collator = PaddingCollator(pad_values)
    sampler = LengthGroupedSampler([len(feature["input_ids"]) for feature in features], batch_size, 0, shuffle=False)
    rows: list[Any] = [None] * len(features)
    model.eval()
    with torch.inference_mode():
        for indices in sampler:
            batch = {key: value.to(device) for key, value in collator([features[i] for i in indices]).items()}
            outputs = {key: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                       for key, value in model.predict(**batch).items()}
            for row, index in enumerate(indices):
                rows[index] = {key: value[row] for key, value in outputs.items()}
    return rows


def read_inputs(texts: list[str], input_file: str | None) -> list[str]:
    """Raw inputs: text arguments, else --input_file (one text per line, or JSONL with "text"), else stdin."""
    if texts:
        return list(texts)
    if input_file:
        from .data import read_text_lines

        lines, source = read_text_lines(input_file), input_file
    else:
        lines, source = sys.stdin.read().splitlines(), "<stdin>"
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("{"):
        inputs = [record for _, record in read_jsonl_records(source, lines)]
    else:
        inputs = [line for line in lines if line.strip()]
    if not inputs:
        raise DataError(source, None, "no input text", "give texts as arguments, --input_file, or on stdin")
    return inputs


def write_results(results: Iterable[dict], output_file: str | None) -> None:
    lines = [json.dumps(result, ensure_ascii=False) for result in results]
    if output_file:
        atomic_write_lines(output_file, lines)
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
