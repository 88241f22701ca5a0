"""The Python API for notebooks: the same validation, loop and prediction as the command line."""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, to_dict
from .errors import UsageError
from .model_folder import load_model
from .prediction import predict_examples
from .train import run
from .verbosity import set_verbose


def finetune(task: Any, config: TrainConfig | None = None, **flags: Any) -> dict:
    """Train `task` (an instance of a Task subclass, e.g. bert_ft_tasks.ner.NerTask(), or any from
    bert_ft.plugins.registered_tasks()) and write the run folder; returns metrics.json as a dict. `flags` override
    fields of `config` (finetune(task, output_dir="runs/x"))."""
    config = TrainConfig(**{**to_dict(config or TrainConfig()), **flags})
    problems = config.problems() + task.problems(config)
    if problems:
        raise UsageError("invalid settings:\n  " + "\n  ".join(problems))
    set_verbose(config.verbose)
    return plain(run(task, config))


def plain(value: Any) -> Any:
    """`value` with numpy and torch scalars (and arrays) made plain Python numbers and lists, recursively."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    for kind in (bool, int, float, str):  # bool before int; numpy's float64 is a float subclass
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return plain(value.tolist())
    return value


def predict(task: Any, model_dir: str, inputs: list, max_seq_length: int | None = None,
            batch_size: int = 64, document: bool = False) -> list[dict]:
    """Predictions of a trained model folder of `task` on raw inputs (strings, or dicts for relation spans).
    `document`: the inputs are consecutive sentences of one document (NER with document context); `task`'s own
    options apply (give NER the --context_size the model was trained with)."""
    model, tokenizer, meta = load_model(model_dir, type(task))
    return plain(predict_examples(task, model, tokenizer, list(inputs),
                                  max_seq_length or meta.get("max_seq_length", 128), batch_size, document))
