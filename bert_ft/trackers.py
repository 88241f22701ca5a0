"""Experiment trackers through Accelerate (--report_to tensorboard,mlflow,...; --run_name).

What a run logs, on the main process only (Accelerate's trackers live there):
  once, at the start      every flag (TrainConfig and the task's options) as the run's parameters
  every --logging_steps   train_loss (mean over the interval), lr, train_samples_per_second (the interval's)
  every epoch             epoch, epoch_train_loss and every validation metric as eval_<name>
  at the end              every number of metrics.json under its own name (so a tracker's latest values are
                          metrics.json)
MLflow writes where MLFLOW_TRACKING_URI points (MLflow's own default: a local store in the working directory);
nothing here contacts a server unless that variable names one.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from .config import report_to_list

# init_trackers keyword arguments that carry the run name, per tracker (Accelerate passes them to the tracker).
RUN_NAME_KWARGS = {"mlflow": "run_name", "wandb": "name", "aim": "run_name", "swanlab": "experiment_name",
                   "trackio": "name", "clearml": "task_name"}
PROJECT = "bert_ft"  # the experiment / project name (MLFLOW_EXPERIMENT_NAME overrides it for MLflow)


def accelerator_kwargs(report_to: str, output_dir: str) -> dict:
    """Accelerator(...) keyword arguments for --report_to (none: {})."""
    names = report_to_list(report_to)
    return {"log_with": names, "project_dir": output_dir} if names else {}


def run_name(config: Any) -> str:
    return config.run_name or os.path.basename(os.path.abspath(config.output_dir))


def loggable_flags(flags: dict) -> dict:
    """The flags trackers accept as parameters: scalars (None, lists and dicts are left out)."""
    return {key: value for key, value in flags.items() if isinstance(value, (int, float, str, bool))}


def start_trackers(accelerator: Any, config: Any, flags: dict) -> None:
    """Open the trackers of --report_to and log the flags once (no-op for --report_to none)."""
    names = report_to_list(config.report_to)
    if not names:
        return
    name = run_name(config)
    init_kwargs = {tracker: {keyword: name} for tracker, keyword in RUN_NAME_KWARGS.items()
                   if tracker in names or "all" in names}
    accelerator.init_trackers(PROJECT, config=loggable_flags(flags), init_kwargs=init_kwargs)


def epoch_values(record: dict, metrics: dict) -> dict:
    """What an epoch logs: its number, its mean training loss and every validation metric as eval_<name>."""
    values = {"epoch": record["epoch"], "epoch_train_loss": record["train_loss"]}
    values.update({f"eval_{key}": value for key, value in metrics.items() if _number(value)})
    return values


def log_final(accelerator: Any, metrics: dict, step: int) -> None:
    """Every number of metrics.json, at the last step."""
    accelerator.log({key: value for key, value in metrics.items() if _number(value)}, step=step)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Throughput:
    """Training examples per second between two logging points (counted from batch shapes: no device sync)."""

    def __init__(self, num_processes: int) -> None:
        self.num_processes, self.samples, self.start = num_processes, 0, time.perf_counter()

    def add(self, batch: dict) -> None:
        self.samples += int(batch["example_length"].shape[0]) * self.num_processes

    def read(self) -> dict:
        now = time.perf_counter()
        rate = self.samples / max(now - self.start, 1e-9)
        self.samples, self.start = 0, now
        return {"train_samples_per_second": round(rate, 3)}
