"""Export a trained model folder to ONNX, check the export against the PyTorch model, and run export folders.

The exported graph is the head's `scores` (token or class logits) computed from the padded batch tensors, with
dynamic batch and sequence axes: the stock encoder (a sentence head's [CLS]-only top layer is switched off while
tracing), traced at 2 x 16 or more so that no axis is frozen. Everything after the scores runs outside the graph
through the head's own `decode_scores`: the CRF's constrained Viterbi and marginals, softmax, the temperature.
`OnnxModel` is called like a head (`model(**batch, decode=True)`), so `bert_ft.predict.predict_examples` and
`bert_ft.inference.infer` run an export folder by the same code as a PyTorch folder: relation markers, windows over
long texts and sentence pairs included.

An export folder holds model.onnx, bert_ft.json (the source's, plus an "export" record), the transformers
config.json (no weights), the tokenizer, bert_ft_head.safetensors when the head has layers outside the encoder
(the CRF's transitions), and export_report.json (the parity check). `heads.load_model` recognises it from its files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import flag
from .errors import UsageError

GRAPH_FILE = "model.onnx"
REPORT_FILE = "export_report.json"
OUTPUT_NAME = "scores"
# Built from the batch inside the graph: a padded batch holds one example per row, from position 0.
DERIVED_KEYS = ("example_row", "example_offset", "example_length")
NEAR_TIE = 1e-4  # a changed prediction counts as a near-tie when PyTorch's own scores for both differ by less
REGRESSION_TOLERANCE = 1e-4  # fp32 regression exports: the largest value difference, relative to the values
INT8_MAX_DROP = 0.5  # points of the task's metric: the int8 export is flagged above this drop
TRACE_ROWS, TRACE_WIDTH = 2, 16


@dataclass
class ExportConfig:
    model_dir: str = flag(None, "the bert-ft model folder (RUN/model) to export")
    format: str = flag("onnx", "export format", choices=("onnx",))
    quantize: str = flag("none", "weights: none (fp32) or int8 (onnxruntime dynamic quantisation)",
                         choices=("none", "int8"))
    output_dir: str = flag(None, "the export folder (default: RUN/onnx, or RUN/onnx-int8 with --quantize int8)")
    validation_file: str | None = flag(None, "labelled file the parity check scores with both models (default: the "
                                             "run's validation data, else its test data)")
    max_eval_samples: int | None = flag(None, "score only the first N examples in the parity check")
    max_seq_length: int | None = flag(None, "window size in sub-words for the parity check (default: the run's)")
    batch_size: int = flag(64, "inputs per forward pass in the parity check")
    threads: int | None = flag(None, "onnxruntime and torch threads in the parity check (default: torch's)")
    debug: bool = flag(False, "show full tracebacks on errors")


# ----------------------------------------------------------------------------------------------- the graph

class _KeyRecorder(dict):
    """A batch that notes which keys are read (to find the inputs a head's `scores` uses)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[str] = []

    def __getitem__(self, key):
        if key not in self.read:
            self.read.append(key)
        return super().__getitem__(key)


class ScoresGraph(nn.Module):
    """The traced module: the head's `scores` on a padded batch given as named tensors."""

    def __init__(self, head: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.head, self.names = head, list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.names, tensors))
        rows = batch["input_ids"].size(0)
        device = batch["input_ids"].device
        batch["example_row"] = torch.arange(rows, device=device)
        batch["example_offset"] = torch.zeros(rows, dtype=torch.long, device=device)
        batch["example_length"] = batch["attention_mask"].sum(dim=1)
        return self.head.scores(batch)


def graph_inputs(head: nn.Module, batch: dict) -> list[str]:
    """The batch keys the head's `scores` reads (encoder inputs, relation marker positions, ...), in batch order;
    the attention mask always (the graph derives each example's length from it)."""
    recorder = _KeyRecorder({key: value for key, value in batch.items() if key not in ("feature_index", "labels")})
    with torch.no_grad():
        head.scores(recorder)
    read = set(recorder.read) | {"attention_mask"}
    return [key for key in batch if key in read and key not in DERIVED_KEYS]


def trace_batch(features: Any, collator: Any, pad_values: dict) -> dict:
    """A padded batch of at least TRACE_ROWS rows and TRACE_WIDTH columns from the first features: exported at
    sizes other than 0 and 1, no axis of the graph is specialised to the traced size."""
    chosen = list(range(min(len(features), TRACE_ROWS)))
    while len(chosen) < TRACE_ROWS:
        chosen.append(chosen[-1])
    batch = collator([(index, features.inputs[index]) for index in chosen])
    width = batch["input_ids"].size(1)
    if width < TRACE_WIDTH:
        for key in (*pad_values, "attention_mask"):
            if key in batch and batch[key].dim() == 2 and batch[key].size(1) == width:
                pad = pad_values.get(key, 0)
                extra = torch.full((batch[key].size(0), TRACE_WIDTH - width), pad, dtype=batch[key].dtype)
                batch[key] = torch.cat([batch[key], extra], dim=1)
    return batch


def export_graph(head: nn.Module, batch: dict, path: str) -> list[str]:
    """Write the ONNX graph of `head.scores` (dynamic batch and sequence axes) to `path`; returns its input names."""
    from .heads import full_top_layer

    head = head.eval()
    with full_top_layer(head.model, needed=True):  # the stock encoder, not the [CLS]-only top layer
        names = graph_inputs(head, batch)
        inputs = tuple(batch[name] for name in names)
        width = batch["input_ids"].size(1)
        limit = getattr(head.config, "max_position_embeddings", None)
        rows = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence", max=limit) if limit else torch.export.Dim("sequence")
        shapes = tuple({0: rows, 1: sequence} if tensor.dim() >= 2 and tensor.size(1) == width else {0: rows}
                       for tensor in inputs)
        with torch.no_grad(), _quiet("torch.onnx"):
            torch.onnx.export(ScoresGraph(head, names).eval(), inputs, path, dynamo=True, input_names=names,
                              output_names=[OUTPUT_NAME], dynamic_shapes=(shapes,), optimize=True,
                              external_data=False, verbose=False)
    return names


@contextmanager
def _quiet(logger: str):
    """The exporters' warnings (missing torchvision ops, deprecations, axis renames) are not the user's business."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def quantize_int8(source: str, target: str) -> None:
    """Dynamic int8 quantisation (onnxruntime) of the weights of every MatMul, per output channel (per-tensor
    scales lost 1.5 F1 points on CoNLL-2003 with MiniLM, per-channel 0.1), on 7 bits (`reduce_range`: no overflow
    in the u8 x s8 products of CPUs without VNNI, so the export scores the same on any x86 CPU); activations are
    quantised on the fly. The embeddings stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet("root"):  # "consider pre-processing": shape inference, which the exported graph already has
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul"])


# ---------------------------------------------------------------------------------------- running an export

class EncoderStandIn(nn.Module):
    """Where a head keeps its encoder, in an export folder's model: the config only (the graph has the weights)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, *args, **kwargs):
        raise RuntimeError("this head has no encoder weights (an export folder): the ONNX graph computes its scores")


class OnnxModel(nn.Module):
    """An export folder's model: the ONNX session computes `scores`, the task head's own `decode_scores` decodes.

    It is called like a head (`model(**batch)` -> {"logits"}, `model(**batch, decode=True)` -> decoded outputs),
    and has the head's `labels` and `temperature`."""

    def __init__(self, session: Any, head: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.session, self.head, self.input_names = session, head, list(input_names)
        self.labels = head.labels

    @property
    def temperature(self) -> float:
        return self.head.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.head.temperature = value

    def scores(self, batch: dict) -> torch.Tensor:
        if "position_ids" in batch:
            raise ValueError("an ONNX export runs padded batches (one example per row), not packed ones")
        feeds = {name: batch[name].detach().cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])

    def decode_scores(self, scores: torch.Tensor, batch: dict, temperature: float | None = None) -> dict:
        return self.head.decode_scores(scores, batch, temperature)

    def calibration_nll(self, scores: torch.Tensor, batch: dict, temperature: float):
        return self.head.calibration_nll(scores, batch, temperature)

    def prediction_scores(self, scores: torch.Tensor, batch: dict, pred: torch.Tensor) -> torch.Tensor:
        return self.head.prediction_scores(scores, batch, pred)

    def forward(self, labels: torch.Tensor | None = None, decode: bool = False, **batch: torch.Tensor) -> dict:
        scores = self.scores(batch)
        return self.decode_scores(scores, batch) if decode else {"logits": scores}


def is_export_folder(folder: str) -> bool:
    if not os.path.isfile(os.path.join(folder, GRAPH_FILE)):
        return False
    try:
        with open(os.path.join(folder, "bert_ft.json"), encoding="utf-8") as handle:
            return "export" in json.load(handle)
    except (OSError, ValueError):
        return False


def session(path: str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with all graph optimisations and `threads` intra-op threads (default: torch's)."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("running an ONNX export needs onnxruntime: pip install -e \".[export]\"") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def load_exported(folder: str, tasks: dict, threads: int | None = None) -> tuple[OnnxModel, Any, dict]:
    """(OnnxModel, tokenizer, meta) of an export folder; `tasks` is the task registry."""
    from .encoder import load_config, load_tokenizer
    from .heads import task_of

    task_type, meta = task_of(folder, tasks)
    head_type = task_type.head_type
    head = head_type(EncoderStandIn(load_config(folder)), meta["labels"], **meta.get("head_options", {}))
    head.load_extra_modules(folder, meta)
    model = OnnxModel(session(os.path.join(folder, GRAPH_FILE), threads), head.eval(), meta["export"]["inputs"])
    return model.eval(), load_tokenizer(folder), meta


# ------------------------------------------------------------------------------------------- parity check

def parity_examples(task: Any, model_dir: str, validation_file: str | None, limit: int | None) -> tuple[list, str]:
    """The labelled examples of the parity check: --validation_file, else the run's own validation data (read
    as training read it, from RUN/config.json), else its test data, else the task's shipped sample."""
    if validation_file:
        examples, source = task.read(validation_file), validation_file
    else:
        run_config = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.json")
        examples, source = None, None
        if os.path.isfile(run_config):
            import dataclasses

            from .config import TrainConfig
            from .train import load_splits

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
    from .data import Collator
    from .inference import _complete, _store, eval_loader

    labels = reference.labels
    features = task.encode(examples, tokenizer, max_seq_length, labels)
    loader = eval_loader(features, Collator(task.pad_values(tokenizer)), batch_size)
    rows = {"pytorch": [None] * len(features), "exported": [None] * len(features)}
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
                _store(rows["pytorch"], indices, torch_out, None)
                _store(rows["exported"], indices, onnx_out, None)
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
            _store(rows["pytorch"], indices, torch_out, None)
            _store(rows["exported"], indices, onnx_out, None)
    evaluations = {side: task.evaluate(examples, features, _complete(outputs), labels, source)
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


def check_export(export_dir: str, model_dir: str, tasks: dict, validation_file: str | None = None,
                 max_eval_samples: int | None = None, max_seq_length: int | None = None, batch_size: int = 64,
                 threads: int | None = None) -> dict:
    """The parity check of an existing export folder against its PyTorch model folder."""
    from .heads import load_model

    reference, tokenizer, meta = load_model(model_dir, tasks)
    exported, _, exported_meta = load_exported(export_dir, tasks, threads)
    task_type = tasks[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    examples, source = parity_examples(task, model_dir, validation_file, max_eval_samples)
    return parity_check(task, reference, exported, tokenizer, examples, source,
                        max_seq_length or meta.get("max_seq_length", 128), batch_size,
                        exported_meta["export"].get("quantize", "none") != "none")


# ---------------------------------------------------------------------------------------------- the command

def default_output_dir(model_dir: str, quantize: str) -> str:
    run = os.path.dirname(os.path.abspath(model_dir.rstrip("/")))
    return os.path.join(run, "onnx" if quantize == "none" else f"onnx-{quantize}")


def export(config: ExportConfig, tasks: dict, log=print) -> dict:
    """Export `config.model_dir`, run the parity check, write the folder; returns the parity report.

    Raises UsageError after writing the folder when the fp32 export changes a prediction beyond near-ties."""
    from . import __version__
    from .data import Collator
    from .heads import HEAD_WEIGHTS, has_score_seam, load_model
    from .io import atomic_directory, atomic_write_json

    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UsageError(f"export needs {error.name}: pip install -e \".[export]\" (onnx, onnxscript, "
                         "onnxruntime)") from None
    if not config.model_dir or not os.path.isdir(config.model_dir):
        raise UsageError(f"--model_dir {config.model_dir}: no such folder")
    if is_export_folder(config.model_dir):
        raise UsageError(f"--model_dir {config.model_dir}: is an export folder; give the PyTorch model (RUN/model)")
    output_dir = config.output_dir or default_output_dir(config.model_dir, config.quantize)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not is_export_folder(output_dir):
        raise UsageError(f"--output_dir {output_dir}: holds something other than an export (it would be replaced); "
                         "choose a new or empty folder, e.g. RUN/onnx")
    if config.threads:
        torch.set_num_threads(config.threads)
    head, tokenizer, meta = load_model(config.model_dir, tasks)
    if not has_score_seam(head):
        raise UsageError(f"the {meta['task']} task's head ({type(head).__name__}) does not split its forward into "
                         "scores() and decode_scores() (bert_ft.heads.Head), which the export needs")
    task_type = tasks[meta["task"]]
    task = task_type(task_type.options_type(**meta.get("task_options", {})))
    max_seq_length = config.max_seq_length or meta.get("max_seq_length", 128)
    examples, source = parity_examples(task, config.model_dir, config.validation_file, config.max_eval_samples)
    features = task.encode(examples, tokenizer, max_seq_length, head.labels)
    pad_values = task.pad_values(tokenizer)
    batch = trace_batch(features, Collator(pad_values), pad_values)
    quantized = config.quantize != "none"
    with atomic_directory(output_dir) as temp:
        start = time.perf_counter()
        graph = os.path.join(temp, GRAPH_FILE)
        fp32 = os.path.join(temp, "model.fp32.onnx") if quantized else graph
        names = export_graph(head, batch, fp32)
        if quantized:
            quantize_int8(fp32, graph)
            os.remove(fp32)
        export_seconds = time.perf_counter() - start
        head.model.config.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        if os.path.isfile(os.path.join(config.model_dir, HEAD_WEIGHTS)):
            shutil.copyfile(os.path.join(config.model_dir, HEAD_WEIGHTS), os.path.join(temp, HEAD_WEIGHTS))
        record = {"format": config.format, "quantize": config.quantize, "inputs": names, "output": OUTPUT_NAME,
                  "traced_shape": list(batch["input_ids"].shape), "source": os.path.abspath(config.model_dir),
                  "bert_ft_version": __version__, "torch": torch.__version__,
                  "onnxruntime": onnxruntime.__version__}
        atomic_write_json(os.path.join(temp, "bert_ft.json"), {**meta, "export": record})
        exported, _, _ = load_exported(temp, tasks, config.threads)
        report = parity_check(task, head, exported, tokenizer, examples, source, max_seq_length,
                              config.batch_size, quantized)
        report = {"export": record, "export_seconds": round(export_seconds, 2),
                  "graph_mb": round(os.path.getsize(graph) / 2**20, 2), **report}
        atomic_write_json(os.path.join(temp, REPORT_FILE), report)
        del exported
    log(f"exported {config.model_dir} -> {output_dir} ({GRAPH_FILE}, {config.quantize if quantized else 'fp32'}, "
        f"{report['graph_mb']} MB, inputs {', '.join(names)}; {report['export_seconds']} s)")
    log(format_report(report))
    log(f"report: {os.path.join(output_dir, REPORT_FILE)}")
    if not report["passed"]:
        if quantized:
            log(f"warning: the int8 export loses more than {INT8_MAX_DROP} points of {report['metric']}; "
                "serve the fp32 export (--quantize none) where that matters")
        else:
            raise UsageError(f"the ONNX export of {config.model_dir} changes {report['changed_predictions'] - report['changed_near_ties']} "
                             f"predictions beyond near-ties (report: {os.path.join(output_dir, REPORT_FILE)}); "
                             "please report this with the model")
    return report
