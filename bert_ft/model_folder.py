"""Model folders: saving a trained head, reading its metadata, and opening any bert-ft folder (a PyTorch model folder
or an ONNX export folder) for prediction. Training (`save_model`, `write_temperature`), export, the parity check,
predict and the Python API all go through this module.

A model folder is a `save_pretrained` folder of the inner transformers model (so token and sequence classifiers
load in `transformers.pipeline`), plus `bert_ft_head.safetensors` for extra layers (CRF, entity-pair layer) and
`bert_ft.json` naming the task; `load_model` finds the head class through the task registry
(`bert_ft.plugins.registered_tasks`). An export folder adds model.onnx and an "export" record in bert_ft.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .encoder import load_config, load_tokenizer
from .errors import UsageError
from .heads import META_FILE, Head
from .lora import load_adapter
from .io import atomic_directory, atomic_write_json
from .onnx_model import GRAPH_FILE, EncoderStandIn, OnnxModel, session
from .plugins import registered_tasks
from .version import __version__



def save_model(model: Head, tokenizer: Any, folder: str, task_name: str, extra: dict | None = None) -> None:
    """Write `folder` atomically: transformers weights/config, tokenizer, extra head weights and bert_ft.json."""
    meta = {"bert_ft_version": __version__, "task": task_name, "labels": model.labels,
            "head_options": dict(model.options), **(extra or {})}
    if getattr(model, "temperature", 1.0) != 1.0:
        meta["temperature"] = model.temperature
    with atomic_directory(folder) as temp:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        with open(os.path.join(temp, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2, ensure_ascii=False)


def write_temperature(folder: str, temperature: float, details: dict) -> None:
    """Record a fitted temperature (and how it was fitted) in the folder's bert_ft.json, atomically."""
    meta = read_meta(folder)
    meta["temperature"] = temperature
    meta["calibration"] = details
    atomic_write_json(os.path.join(folder, META_FILE), meta)


def update_meta(folder: str, fields: dict) -> None:
    """Add `fields` (e.g. tuned decision thresholds) to the folder's bert_ft.json, atomically."""
    meta = read_meta(folder)
    meta.update(fields)
    atomic_write_json(os.path.join(folder, META_FILE), meta)


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{folder}: not a bert-ft model folder (no {META_FILE}); give RUN/model of a finished run")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def task_of(folder: str, task_type: type | None = None) -> tuple[Any, dict]:
    """(the task class that trained `folder`, its meta), from the task registry, or `task_type` when given (a task
    class that need not be registered, such as one defined in a notebook; it must carry the folder's task name)."""
    meta = read_meta(folder)
    name = meta.get("task")
    tasks = {task_type.name: task_type} if task_type is not None else registered_tasks()
    if name not in tasks:
        module = meta.get("task_module")
        hint = (f"; it comes from {module}: pass --task_module {module} (in Python: "
                f"bert_ft.plugins.use_task_modules([{module!r}]))") if module else ""
        raise UsageError(f"{folder}: trained for task {name!r}, which is not registered (known: "
                         f"{', '.join(sorted(tasks))}){hint}")
    return tasks[name], meta


def load_model(folder: str, task_type: type | None = None) -> tuple[Head, Any, dict]:
    """Load any bert-ft model folder: (model in eval mode, tokenizer, meta); its task class comes from the registry
    (`bert_ft.plugins.registered_tasks`), or is `task_type` when given.

    An export folder (`run_task.py export`) loads as an onnxruntime-backed model with the same interface."""
    if is_export_folder(folder):
        return load_exported(folder, task_type=task_type)
    task_type, meta = task_of(folder, task_type)
    if "adapter" in meta:  # RUN/adapter of a --lora_r run: base model + adapter, merged for inference
        model = load_adapter(folder, task_type.head_type, meta, merge=True)
    else:
        model = task_type.head_type.load(folder, meta)
    return model.eval(), load_tokenizer(folder), meta


def is_export_folder(folder: str) -> bool:
    """Whether `folder` is an ONNX export folder (`run_task.py export`): model.onnx and an "export" record."""
    if not os.path.isfile(os.path.join(folder, GRAPH_FILE)):
        return False
    try:
        with open(os.path.join(folder, META_FILE), encoding="utf-8") as handle:
            return "export" in json.load(handle)
    except (OSError, ValueError):
        return False


def load_exported(folder: str, threads: int | None = None, task_type: type | None = None
                  ) -> tuple[OnnxModel, Any, dict]:
    """(OnnxModel, tokenizer, meta) of an export folder (`task_type` as in `load_model`)."""
    task_type, meta = task_of(folder, task_type)
    head_type = task_type.head_type
    head = head_type(EncoderStandIn(load_config(folder)), meta["labels"], **meta.get("head_options", {}))
    head.load_extra_modules(folder, meta)
    model = OnnxModel(session(os.path.join(folder, GRAPH_FILE), threads), head.eval(), meta["export"]["inputs"])
    return model.eval(), load_tokenizer(folder), meta
