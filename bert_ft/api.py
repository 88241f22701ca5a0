"""The Python API for notebooks: the same validation, loop and prediction as the command line."""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, to_dict
from .errors import UsageError


def finetune(task: Any, config: TrainConfig | None = None, **flags: Any) -> dict:
    """Train `task` (an instance from tasks.TASKS) and write the run folder; returns metrics.json as a dict.

    `flags` override fields of `config` (e.g. finetune(task, output_dir="runs/x", num_train_epochs=1)).
    """
    from .train import run

    config = TrainConfig(**{**to_dict(config or TrainConfig()), **flags})
    problems = config.problems() + (task.options.problems(config) if hasattr(task.options, "problems") else [])
    if problems:
        raise UsageError("invalid settings:\n  " + "\n  ".join(problems))
    return run(task, config, task.options, task.name)


def predict(task: Any, model_dir: str, inputs: list, max_seq_length: int | None = None,
            batch_size: int = 64) -> list[dict]:
    """Predictions of a trained model folder on raw inputs (strings, or dicts for relation spans)."""
    from .heads import load_model

    model, tokenizer, meta = load_model(model_dir)
    return task.predict(model, tokenizer, list(inputs), max_seq_length or meta.get("max_seq_length", 128), batch_size)
