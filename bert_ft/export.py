"""Export a trained model folder to ONNX (`run_task.py export`): the graph, int8 quantisation, and the command that
writes an export folder after the parity check (`bert_ft.parity`) has compared it with the PyTorch model.

The exported graph is the head's `scores` (token or class logits) computed from the padded batch tensors, with
dynamic batch and sequence axes: the stock encoder (a sentence head's [CLS]-only top layer is switched off while
tracing), traced at 2 x 16 or more so that no axis is frozen. Everything after the scores runs outside the graph
through the head's own `decode_scores` (`bert_ft.onnx_model.OnnxModel`): the CRF's constrained Viterbi and
marginals, softmax, the temperature. So `bert_ft.prediction.predict_examples` and `bert_ft.inference.infer` run an
export folder by the same code as a PyTorch folder: relation markers, windows over long texts and sentence pairs
included.

An export folder holds model.onnx, bert_ft.json (the source's, plus an "export" record), the transformers
config.json (no weights), the tokenizer, bert_ft_head.safetensors when the head has layers outside the encoder
(the CRF's transitions), and export_report.json (the parity check). `bert_ft.model_folder.load_model` recognises
it from its files. onnx, onnxscript and onnxruntime are imported only when an export runs (see bert_ft.lazy).
"""

from __future__ import annotations

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

from .checks import model_length_limit
from .config import flag
from .data import Collator
from .errors import UsageError
from .heads import HEAD_WEIGHTS, full_top_layer, has_score_seam
from .io import atomic_directory, atomic_write_json
from .model_folder import META_FILE, is_export_folder, load_exported, load_model
from .modelcard import write_export_card
from .onnx_model import GRAPH_FILE, OUTPUT_NAME
from .parity import INT8_MAX_DROP, format_report, parity_check, parity_examples
from .plugins import registered_tasks
from .version import __version__

REPORT_FILE = "export_report.json"
# Built from the batch inside the graph: a padded batch holds one example per row, from position 0.
DERIVED_KEYS = ("example_row", "example_offset", "example_length")
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
    head = head.eval()
    with full_top_layer(head.model, needed=True):  # the stock encoder, not the [CLS]-only top layer
        names = graph_inputs(head, batch)
        inputs = tuple(batch[name] for name in names)
        width = batch["input_ids"].size(1)
        limit = model_length_limit(None, head.config)  # RoBERTa: max_position_embeddings - padding_idx - 1
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


# ---------------------------------------------------------------------------------------------- the command

def default_output_dir(model_dir: str, quantize: str) -> str:
    run = os.path.dirname(os.path.abspath(model_dir.rstrip("/")))
    return os.path.join(run, "onnx" if quantize == "none" else f"onnx-{quantize}")


def export(config: ExportConfig, log=print) -> dict:
    """Export `config.model_dir`, run the parity check, write the folder; returns the parity report.

    Raises UsageError after writing the folder when the fp32 export changes a prediction beyond near-ties."""
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
    head, tokenizer, meta = load_model(config.model_dir)
    if not has_score_seam(head):
        raise UsageError(f"the {meta['task']} task's head ({type(head).__name__}) does not split its forward into "
                         "scores() and decode_scores() (bert_ft.heads.Head), which the export needs")
    task_type = registered_tasks()[meta["task"]]
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
        try:
            names = export_graph(head, batch, fp32)
        except Exception as error:  # an operator or control flow torch.onnx cannot express for this family
            family = getattr(head.config, "model_type", "this")
            raise UsageError(f"the ONNX export of a {family} model failed in torch.onnx ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}).\n  fix: serve the PyTorch "
                             f"folder ({config.model_dir}) with `run_task.py predict` or transformers.pipeline, or "
                             "try a newer torch / onnxscript") from None
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
        atomic_write_json(os.path.join(temp, META_FILE), {**meta, "export": record})
        exported, _, _ = load_exported(temp, config.threads)
        report = parity_check(task, head, exported, tokenizer, examples, source, max_seq_length,
                              config.batch_size, quantized)
        report = {"export": record, "export_seconds": round(export_seconds, 2),
                  "graph_mb": round(os.path.getsize(graph) / 2**20, 2), **report}
        atomic_write_json(os.path.join(temp, REPORT_FILE), report)
        write_export_card(temp, config.model_dir, report, final_dir=output_dir)
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
