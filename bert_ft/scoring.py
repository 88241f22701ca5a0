"""Scoring at the end of a run (and validation after each epoch): the best model reloaded, a temperature fitted on
validation, validation and test scored, and the run folder's metrics.json, report.txt, predictions and plots
written.
"""

from __future__ import annotations

import os
import resource
import time

import torch
from accelerate import Accelerator

from .calibration import calibrate, calibration_section, expected_calibration_error, fit_decision
from .checkpoints import TrainerState
from .config import TrainConfig
from .data_stage import Data
from .flops import peak_tflops, training_metrics
from .heads import has_score_seam
from .inference import decode_batches, infer, score_batches
from .io import atomic_write_json, atomic_write_text
from .lora import ADAPTER_DIR, load_adapter, model_folders, trainable_parameters
from .modelcard import write_model_cards
from .model_folder import read_meta, update_meta, write_temperature
from .report import write_plots
from .task import Evaluation, Task
from .training_setup import Training, precision_name


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def score_splits(task: Task, data: Data, training: Training, objective: str = "confidence"
                 ) -> tuple[dict | None, dict]:
    """Score validation and test with the best model, fitting a temperature on validation in between.

    The encoder runs once per split (`score_batches`); the temperature is fitted on the stored validation scores
    (`calibrate` with `objective`; the confidence fit decodes them again at every temperature it tries), then each
    split's scores are decoded at the fitted temperature and at 1 (for the uncalibrated ECE). Returns (the fit, or
    None without validation labels; {split: (evaluation, evaluation with raw confidences, seconds)}). A head
    without the scores/decode_scores seam is evaluated as during training and not calibrated."""
    present = [split for split in ("validation", "test") if split in data.features]
    scored, seconds = {}, {}
    if has_score_seam(training.network):
        for split in present:
            start = time.perf_counter()
            scored[split] = score_batches(training.model, training.eval_loaders[split], training.accelerator)
            seconds[split] = time.perf_counter() - start
    calibration = None
    if "validation" in scored:
        calibration = calibrate(training.network, scored["validation"],
                                validation_confidences(training, task, data, scored["validation"]),
                                training.accelerator, objective)
    training.network.temperature = calibration["temperature"] if calibration else 1.0
    if "validation" in scored:  # decision rules tuned on validation (multi-label thresholds), before any decoding
        training.decision = fit_decision(training.network, scored["validation"], len(data.features["validation"]),
                                         data.features["validation"], training.accelerator)
    evaluations = {}
    for split in present:
        if split in scored:
            evaluation, raw, decode_seconds = evaluate_scored(training, task, data, split, scored.pop(split))
            evaluations[split] = (evaluation, raw, seconds[split] + decode_seconds)
        else:
            evaluation, split_seconds = evaluate_split(training, task, data, split)
            evaluations[split] = (evaluation, evaluation, split_seconds)
    return calibration, evaluations


def validation_confidences(training: Training, task: Task, data: Data, scored: list):
    """T -> the validation set's (confidence, correct) pairs with confidences at T: the stored scores decoded at T
    (gathered, so every process gets all pairs) and judged by the task."""
    features, examples = data.features["validation"], data.splits.validation

    def confidences_at(temperature: float) -> list[tuple[float, bool]] | None:
        outputs = decode_batches(training.network, scored, len(features), training.accelerator, temperature)
        return task.confidences(examples, features, outputs, data.labels)

    return confidences_at


def calibration_results(calibration: dict | None, evaluations: dict) -> tuple[dict, str | None]:
    """(metrics: {prefix}_ece before, {prefix}_ece_calibrated after, the temperature, predictions it changed (0);
    the report.txt section), from the evaluations of `score_splits`; nothing for a task without confidences."""
    metrics, rows, note, changed = {}, [], "", 0
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in evaluations:
            continue
        evaluation, raw, _ = evaluations[split]
        changed += sum(mine != theirs for mine, theirs in zip(evaluation.predictions, raw.predictions))
        if raw.confidences is None:
            continue
        before = metrics[f"{prefix}_ece"] = expected_calibration_error(raw.confidences)
        after = None
        if calibration:
            after = metrics[f"{prefix}_ece_calibrated"] = expected_calibration_error(evaluation.confidences)
        rows.append((f"{split} ({len(raw.confidences)} predictions)", before, after))
        note = evaluation.confidence_note
    if calibration:
        metrics.update(calibration_temperature=calibration["temperature"],
                       calibration_objective=calibration["objective"], calibration_changed_predictions=changed)
    return metrics, calibration_section(calibration, rows, note, changed) if rows else None


def evaluate_scored(training: Training, task: Task, data: Data, split: str, scored: list
                    ) -> tuple[Evaluation, Evaluation, float]:
    """(evaluation at the head's temperature, evaluation with raw confidences (the same object at temperature 1),
    seconds spent decoding) from `score_batches`' result for `split`."""
    features, examples, source = data.features[split], getattr(data.splits, split), data.splits.sources[split]

    def decoded(temperature: float | None) -> list[dict]:
        return decode_batches(training.network, scored, len(features), training.accelerator, temperature)

    start = time.perf_counter()
    outputs = decoded(None)
    seconds = time.perf_counter() - start
    evaluation = task.evaluate(examples, features, outputs, data.labels, source)
    raw = evaluation if training.network.temperature == 1.0 else \
        task.evaluate(examples, features, decoded(1.0), data.labels, source)
    return evaluation, raw, seconds


def evaluate_split(training: Training, task: Task, data: Data, split: str) -> tuple[Evaluation, float]:
    start = time.perf_counter()
    features = data.features[split]
    outputs = infer(training.model, training.eval_loaders[split], len(features), training.accelerator)
    seconds = time.perf_counter() - start
    return task.evaluate(getattr(data.splits, split), features, outputs, data.labels,
                         data.splits.sources[split]), seconds


def final_scoring(task: Task, config: TrainConfig, data: Data, training: Training, state: TrainerState,
                  model_dir: str) -> dict:
    """Reload the best (saved) model, fit a temperature and score validation and test (`score_splits`), write
    metrics, report, predictions and plots."""
    accelerator = training.accelerator
    # Training is over (the checkpoints hold the optimiser): free AdamW's two moment buffers, as large as the model,
    # before a second copy of the weights is loaded, so the end of the run stays under the training peak.
    training.optimizer.state.clear()
    adapter_dir = os.path.join(config.output_dir, ADAPTER_DIR)
    best = load_adapter(adapter_dir, task.head_type, read_meta(adapter_dir)) if config.lora_r else \
        task.head_type.load(model_dir, read_meta(model_dir))
    training.network.load_state_dict(best.state_dict())
    del best
    metrics = _final_metrics(state, data, accelerator, training, config.peak_tflops)
    report_sections = [f"bert-ft {task.name} run: {config.output_dir}",
                       f"best epoch: {state.best_epoch} (by validation {task.metric})" if "validation" in data.features
                       else "no validation set: the last epoch is kept"]
    calibration, evaluations = score_splits(task, data, training, config.calibration_objective)
    test_evaluation = None
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in evaluations:
            continue
        evaluation, _, seconds = evaluations[split]
        metrics.update({f"{prefix}_{key}": value for key, value in evaluation.metrics.items()})
        metrics[f"{prefix}_runtime"] = round(seconds, 3)
        metrics[f"{prefix}_samples"] = len(getattr(data.splits, split))
        metrics[f"{prefix}_samples_per_second"] = round(len(getattr(data.splits, split)) / max(seconds, 1e-9), 2)
        report_sections.append(f"== {split}: {data.splits.sources[split]} ==\n{evaluation.report}")
        if split == "test":
            test_evaluation = evaluation
    calibration_metrics, section = calibration_results(calibration, evaluations)
    metrics.update(calibration_metrics)
    if section:
        report_sections.append(section)
    for folder in model_folders(config.output_dir) if accelerator.is_main_process else []:  # model/, adapter/
        if calibration:
            write_temperature(folder, calibration["temperature"],
                              {**calibration, "fitted_on": data.splits.sources["validation"],
                               **{key: metrics[key] for key in ("eval_ece", "eval_ece_calibrated") if key in metrics}})
        if training.decision:
            update_meta(folder, training.decision)
    report_sections.append(_speed_section(metrics))
    if accelerator.is_main_process:
        if test_evaluation is not None:
            task.write_predictions(os.path.join(config.output_dir, task.predictions_file), data.splits.test,
                                   test_evaluation.predictions)
        lr_section = f"== learning-rate groups ==\n{training.lr_table}"  # in the file only: the screen had one line
        atomic_write_text(os.path.join(config.output_dir, "report.txt"),
                          "\n\n".join(report_sections + [lr_section]) + "\n")
        atomic_write_json(os.path.join(config.output_dir, "metrics.json"), metrics)
        write_model_cards(config.output_dir)
        write_plots(config.output_dir, state.history, task.metric,
                    test_evaluation.confusion if test_evaluation else None)
        accelerator.print("\n\n".join(report_sections[2:]))
        accelerator.print(f"run folder: {config.output_dir}")
    return metrics


def _final_metrics(state: TrainerState, data: Data, accelerator: Accelerator, training: Training,
                   peak_setting: float | None) -> dict:
    seconds = max(state.train_seconds, 1e-9)
    epochs_done = len(state.history)
    peak = peak_tflops(accelerator.device, precision_name(accelerator), peak_setting)
    return {
        "train_runtime": round(state.train_seconds, 3),
        "train_samples": len(data.splits.train),
        "data_runtime": data.seconds,
        "epochs_trained": epochs_done,
        "best_epoch": state.best_epoch,
        "train_samples_per_second": round(state.trained_samples / seconds, 3),
        "train_tokens_per_second": round(state.real_tokens / seconds, 1),
        "padding_ratio": round(1 - state.real_tokens / max(state.padded_tokens, 1), 4),
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        # the largest encoding worker (--preprocessing_num_workers); 0 when encoding ran in this process
        "worker_peak_memory_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "num_processes": accelerator.num_processes,
        "precision": precision_name(accelerator),
        "packing": training.packing,
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
        "trainable_parameters": trainable_parameters(training.network),
        # model FLOPs (bert_ft.flops: matrix products, per-example attention, 3 x forward) over real tokens
        **training_metrics(state.train_flops, state.real_tokens, state.train_seconds, peak,
                           accelerator.num_processes),
        # --torch_compile: graphs compiled, the steps that compiled, the step time after them (bert_ft.compiling)
        **(training.compiled.metrics() if training.compiled is not None
           else {"torch_compile": training.compile_note} if training.compile_note else {}),
    }


def _speed_section(metrics: dict) -> str:
    keys = ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "padding_ratio",
            "train_model_flops_per_token", "train_model_gflops_per_second", "train_mfu", "mfu_peak_tflops",
            "mfu_peak_source", "peak_memory_mb", "precision", "packing", "eval_samples_per_second",
            "test_samples_per_second", "num_processes")
    return "== speed ==\n" + "\n".join(f"{key:<30} {metrics[key]}" for key in keys if key in metrics)
