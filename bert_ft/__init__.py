"""bert-ft: fine-tune BERT encoders for NER, relation and sentence classification.

    from bert_ft import TrainConfig, finetune, predict, load_model
    from bert_ft_tasks.ner import NerTask       # a shipped task; bert_ft.plugins.registered_tasks() lists every task

The public names below load on first use (PEP 562), each from the one module that defines it: importing a part of
bert-ft (a task plugin importing bert_ft.task, the export's parity check) loads what that part imports and no
more, not the trainer behind `finetune`. This table is the only place where the core imports its own modules by
name instead of with an import statement.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_PUBLIC = {"TrainConfig": "config", "finetune": "api", "predict": "api", "load_model": "model_folder",
           "Task": "task", "ClassificationTask": "task", "Features": "task", "Evaluation": "task", "Head": "heads"}

__all__ = ["TrainConfig", "finetune", "predict", "load_model", "Task", "ClassificationTask", "Head", "Features",
           "Evaluation", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
