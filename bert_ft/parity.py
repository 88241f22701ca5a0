"""The parity check of an ONNX export against its PyTorch model: the same labelled examples scored by both, and
their scores, predictions and the task's metric compared (`run_task.py export` runs it before it writes a folder;
`check_export` runs it on an existing one).

fp32 passes when no prediction changes except near-ties (PyTorch's own scores for both predictions within
NEAR_TIE); int8 passes when the metric drops by at most INT8_MAX_DROP points.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .data import Collator
from .data_stage import load_splits
from .errors import UsageError
from .inference import FeatureOutputs, eval_loader
from .model_folder import load_exported, load_model
from .onnx_model import OnnxModel
from .plugins import registered_tasks

NEAR_TIE = 1e-4  # a changed prediction counts as a near-tie when PyTorch's own scores for both differ by less
REGRESSION_TOLERANCE = 1e-4  # fp32 regression exports: the largest value difference, relative to the values
INT8_MAX_DROP = 0.5  # points of the task's metric: the int8 export is flagged above this drop


def parity_examples(task: Any, model_dir: str, validation_file: str | None, limit: int | None) -> tuple[list, str]:
    """The labelled examples of the parity check: --validation_file, else the run's own validation data (read
    as training read it, from RUN/config.json), else its test data, else the task's shipped sample."""
    if validation_file:
        examples, source = task.read(validation_file), validation_file
    else:
        run_config = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.json")
        examples, source = None, None
        if os.path.isfile(run_config):
            with open(run_config, encoding="utf-8") as handle:
                saved = json.load(handle)
            names = {item.name for item in dataclasses.fields(TrainConfig)}
            config = TrainConfig(**{key: value for key, value in saved.items() if key in names})
            try:
                splits = load_splits(task, config)
            except Exception as error:  # files moved since training: say so and how to point at the data
                raise UsageError(f"the run's data ({run_config}) cannot be read for the parity check ({error}); "
                                 "pass --validation_file") from None
            for split in ("validation", "test"):
                if getattr(splits, split):
                    examples, source = getattr(splits, split), splits.sources[split]
                    break
        if examples is None:
            defaults = task.default_files()
            path = defaults.get("validation") or defaults.get("test")
            if not path:
                raise UsageError("no labelled data for the parity check: pass --validation_file")
            examples, source = task.read(path), path
    return (examples[:limit] if limit else examples), source


def _units(pred: torch.Tensor) -> torch.Tensor:
    """The predictions that count: every element, except -1 (a token that is not a word start)."""
    return pred >= 0


def parity_check(task: Any, reference: nn.Module, exported: OnnxModel, tokenizer: Any, examples: list,
                 source: str, max_seq_length: int, batch_size: int, quantized: bool) -> dict:
    """Score `examples` with the PyTorch head and the export; compare scores, predictions and the task's metric."""
    labels = reference.labels
    features = task.encode(examples, tokenizer, max_seq_length, labels)
    loader = eval_loader(features, Collator(task.pad_values(tokenizer)), batch_size)
    rows = {"pytorch": FeatureOutputs(len(features)), "exported": FeatureOutputs(len(features))}
    seconds = {"pytorch": 0.0, "exported": 0.0}
    largest, units, changed, near_ties, worst_margin = 0.0, 0, 0, 0, 0.0
    regression, value_scale = False, 0.0
    reference.eval()
    with torch.inference_mode():
        for batch in loader:
            indices = batch.pop("feature_index")
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            start = time.perf_counter()
            torch_scores = reference.scores(inputs).float()
            seconds["pytorch"] += time.perf_counter() - start
            start = time.perf_counter()
            onnx_scores = exported.scores(inputs).float()
            seconds["exported"] += time.perf_counter() - start
            difference = (torch_scores - onnx_scores).abs()
            if difference.dim() == 3 and difference.shape[:2] == batch["attention_mask"].shape:
                difference = difference[batch["attention_mask"].bool()]  # real tokens only
            largest = max(largest, float(difference.max()) if difference.numel() else 0.0)
            torch_out = reference.decode_scores(torch_scores, inputs)
            onnx_out = exported.decode_scores(onnx_scores, inputs)
            if torch_out["pred"].is_floating_point():  # regression: values, compared by their difference
                regression = True
                units += int(torch_out["pred"].numel())
                value_scale = max(value_scale, float(torch_out["pred"].abs().max()))
                rows["pytorch"].add(indices, torch_out)
                rows["exported"].add(indices, onnx_out)
                continue
            counted = _units(torch_out["pred"]) | _units(onnx_out["pred"])
            different = (torch_out["pred"] != onnx_out["pred"]) & counted
            units += int(counted.sum())
            if bool(different.any()):
                margin = reference.prediction_scores(torch_scores, inputs, torch_out["pred"]) - \
                    reference.prediction_scores(torch_scores, inputs, onnx_out["pred"])  # (examples,), >= 0
                per_example = different.reshape(different.size(0), -1).sum(dim=1)
                changed += int(per_example.sum())
                near_ties += int(per_example[margin.abs() < NEAR_TIE].sum())
                worst_margin = max(worst_margin, float(margin[per_example > 0].abs().max()))
            rows["pytorch"].add(indices, torch_out)
            rows["exported"].add(indices, onnx_out)
    evaluations = {side: task.evaluate(examples, features, outputs.complete(), labels, source)
                   for side, outputs in rows.items()}
    metric = task.metric
    ours, theirs = evaluations["pytorch"].metrics[metric], evaluations["exported"].metrics[metric]
    drop = round((ours - theirs) * 100, 4)
    report = {
        "file": source, "examples": len(examples), "features": len(features), "metric": metric,
        "pytorch": evaluations["pytorch"].metrics, "exported": evaluations["exported"].metrics,
        "drop_points": drop, "max_abs_logit_difference": largest, "predictions_compared": units,
        "changed_predictions": changed, "changed_near_ties": near_ties,
        "largest_changed_margin": worst_margin, "near_tie_margin": NEAR_TIE,
        "seconds": {side: round(value, 3) for side, value in seconds.items()},
    }
    if quantized:
        report["passed"] = drop <= INT8_MAX_DROP
        report["criterion"] = f"int8: {metric} drop <= {INT8_MAX_DROP} points"
    elif regression:
        tolerance = REGRESSION_TOLERANCE * max(1.0, value_scale)
        report["passed"] = largest <= tolerance
        report["criterion"] = (f"fp32 regression: largest |value difference| <= {tolerance:.3g} "
                               f"({REGRESSION_TOLERANCE:g} x the largest |value|, at least 1)")
    else:
        report["passed"] = changed == near_ties
        report["criterion"] = (f"fp32: no changed prediction except near-ties (PyTorch's scores for both "
                               f"predictions within {NEAR_TIE})")
    return report


def format_report(report: dict) -> str:
    metric = report["metric"]
    lines = [f"parity check on {report['file']} ({report['examples']} examples, {report['features']} model inputs):",
             f"  {metric}: PyTorch {report['pytorch'][metric]:.4f}, export {report['exported'][metric]:.4f} "
             f"(drop {report['drop_points']:+.2f} points)",
             f"  largest |logit difference| {report['max_abs_logit_difference']:.3g}",
             f"  changed predictions: {report['changed_predictions']} of {report['predictions_compared']} "
             f"({report['changed_near_ties']} near-ties, top-two margin < {report['near_tie_margin']:g})",
             f"  {report['criterion']}: {'passed' if report['passed'] else 'FAILED'}"]
    return "\n".join(lines)


def check_export(export_dir: str, model_dir: str, validation_file: str | None = None,
                 max_eval_samples: int | None = None, max_seq_length: int | None = None, batch_size: int = 64,
                 threads: int | None = None) -> dict:
    """The parity check of an existing export folder against its PyTorch model folder."""
    reference, tokenizer, meta = load_model(model_dir)
    exported, _, exported_meta = load_exported(export_dir, threads)
    task_type = registered_tasks()[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    examples, source = parity_examples(task, model_dir, validation_file, max_eval_samples)
    return parity_check(task, reference, exported, tokenizer, examples, source,
                        max_seq_length or meta.get("max_seq_length", 128), batch_size,
                        exported_meta["export"].get("quantize", "none") != "none")

