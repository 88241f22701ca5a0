"""Checkpoints: what a run needs to continue exactly (`TrainerState` beside Accelerate's model, optimiser, scheduler
and RNG state), written atomically as checkpoint-STEP folders, found again for --resume_from_checkpoint, and the
check that an --output_dir does not already hold another run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field

from accelerate import Accelerator

from .config import TrainConfig
from .errors import UsageError
from .io import atomic_write_json

RUN_MARKERS = ("metrics.json", "config.json", "model", "report.txt")


@dataclass
class TrainerState:
    """What a checkpoint needs beyond model/optimizer/scheduler/RNG to continue exactly."""

    global_step: int = 0  # optimiser steps done
    epoch: int = 0  # epochs completed
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    history: list = field(default_factory=list)  # one dict per epoch: train_loss, eval metric
    epoch_loss_sum: float = 0.0  # training loss summed over this epoch's micro-batches so far
    epoch_loss_count: int = 0
    train_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    trained_samples: int = 0  # training examples seen, over every process (what samples/s counts)
    train_flops: float | None = 0.0  # model FLOPs of the batches trained (bert_ft.flops), every process; None:
    # the architecture's config lacks BERT's size fields


def list_checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoint-STEP folders of `output_dir`, oldest step first."""
    paths = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    return sorted((path for path in paths if os.path.basename(path).split("-")[-1].isdigit()),
                  key=lambda path: int(path.rsplit("-", 1)[-1]))


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, state: TrainerState) -> None:
    """checkpoint-STEP, written to a temporary folder and renamed: a SIGKILL leaves no half checkpoint."""
    final = os.path.join(config.output_dir, f"checkpoint-{state.global_step}")
    temp = os.path.join(config.output_dir, f".tmp-checkpoint-{state.global_step}")
    if accelerator.is_main_process and os.path.exists(temp):
        shutil.rmtree(temp)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp)
    if accelerator.is_main_process:
        atomic_write_json(os.path.join(temp, "trainer_state.json"), state.__dict__)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temp, final)
        for old in list_checkpoints(config.output_dir)[: -config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(config: TrainConfig) -> str:
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: no checkpoint-STEP folder in {config.output_dir}")
        return found[-1]
    path = config.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise UsageError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no trainer_state.json)")
    return path


def check_output_dir(config: TrainConfig) -> None:
    """Refuse to mix two runs in one folder (nothing has been written yet when this runs)."""
    if config.overwrite_output_dir or config.resume_from_checkpoint or not os.path.isdir(config.output_dir):
        return
    present = [name for name in RUN_MARKERS if os.path.exists(os.path.join(config.output_dir, name))]
    present += [os.path.basename(path) for path in list_checkpoints(config.output_dir)]
    if present:
        raise UsageError(f"--output_dir {config.output_dir} holds another run ({', '.join(present[:4])}).\n"
                         "  fix: choose a new --output_dir, add --overwrite_output_dir to replace it, or "
                         "--resume_from_checkpoint latest to continue it")


def resume_state(accelerator: Accelerator, config: TrainConfig, log=print) -> TrainerState:
    """--resume_from_checkpoint: restore model, optimiser, scheduler and RNG from the checkpoint (Accelerate), and
    return its TrainerState; without the flag, a fresh state."""
    if not config.resume_from_checkpoint:
        return TrainerState()
    checkpoint = find_checkpoint(config)
    accelerator.load_state(checkpoint)
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
        state = TrainerState(**json.load(handle))
    log(f"resumed from {checkpoint}: step {state.global_step}, epoch {state.epoch + 1}, "
        f"batch {state.batches_in_epoch}")
    return state
