"""The Task protocol: what a task plugin in `tasks/` provides to the task-independent core.

The core reads data, builds features and the head, runs the one training loop and writes the run folder by calling
these methods only; it never looks at a task's name. A task module exposes a class implementing this protocol and is
registered in `tasks.TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


@dataclass
class Evaluation:
    """What a task's `evaluate` returns for one split."""

    metrics: dict[str, float]  # flat, e.g. {"f1": .9, "precision": ...}; the core prefixes "eval_"/"test_"
    report: str  # human-readable tables for report.txt
    predictions: list[Any]  # one per example, in input order (written by `write_predictions`)
    confusion: tuple[list[str], list[list[int]]] | None = None  # (class names, matrix rows=gold) for the plot


class Task(Protocol):
    name: str  # the CLI sub-command, e.g. "ner"
    description: str  # one line for `run_task.py --help`
    options_type: type  # dataclass of this task's own flags (fields built with bert_ft.config.flag)
    metric: str  # key of Evaluation.metrics that picks the best checkpoint (higher is better)
    predictions_file: str  # e.g. "test_predictions.txt"

    def __init__(self, options: Any) -> None: ...

    def default_files(self) -> dict[str, str | None]:
        """{"train": path, "validation": path|None, "test": path|None}: the shipped sample used without flags."""

    def read(self, path: str) -> list[Any]:
        """Parse one data file into examples; raise DataError naming file, line, problem and fix."""

    def from_hub(self, dataset: Any, split: str) -> list[Any]:
        """Convert a `datasets` split (from --dataset_name) into examples."""

    def labels_of(self, example: Any) -> Sequence[str]:
        """The gold label strings of one example (used to build and check the label set)."""

    def build_labels(self, train_examples: list[Any]) -> list[str]:
        """The ordered label list of the model (index = class id)."""

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Add task tokens (e.g. entity markers) before the model is built."""

    def build_model(self, model_path: str, labels: list[str], tokenizer: Any, trust_remote_code: bool) -> torch.nn.Module:
        """A head from bert_ft.heads on the encoder at `model_path`."""

    def encode(self, examples: list[Any], tokenizer: Any, max_seq_length: int, labels: list[str]) -> list[dict]:
        """Model features; each has input ids and "example_index" (several features may share one example)."""

    def evaluate(self, examples: list[Any], features: list[dict], outputs: list[dict], labels: list[str],
                 source: str) -> Evaluation:
        """Score per-feature model outputs (aligned with `features`) against the examples' gold labels."""

    def write_predictions(self, path: str, examples: list[Any], predictions: list[Any]) -> None:
        """Write the predictions file atomically, one entry per example in input order."""

    def predict(self, model: torch.nn.Module, tokenizer: Any, inputs: list[str], max_seq_length: int,
                batch_size: int) -> list[dict]:
        """Predictions on raw user inputs (one JSON-ready dict per input)."""
