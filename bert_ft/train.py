"""The one training loop: `run` reads top to bottom, and `train_epoch` + `train_step` take one batch to the next.

Nothing here knows which task it trains: the Task plugin reads data, builds features and the head, and scores the
gathered outputs. The stages `run` calls live beside the loop, each in its own module:
  data_stage.prepare_data          read the splits, build and check labels, tokenizer, encode (also --check_data)
  training_setup.build_training    the model and its CPU speed-ups, lr groups, optimiser, schedule, loaders (packed or
                                   padded), Accelerate's prepare
  train_epoch (here)               one epoch of `train_step`, with logging, step checkpoints and the one NaN/inf exit
  checkpoints                      checkpoint-STEP folders, resume, the --output_dir check
  scoring.final_scoring            reload the best model, fit a temperature on validation, score validation and
                                   test, write the run folder
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .checkpoints import TrainerState, check_output_dir, list_checkpoints, resume_state, save_checkpoint
from .checks import check_output_dir_path
from .compiling import timed_step
from .config import TrainConfig, to_dict
from .data import padding_stats
from .data_stage import Data, prepare_data
from .encoder import resolve_model_path
from .errors import TrainingDiverged, UsageError
from .flops import batches_training_flops, passes_per_step
from .io import atomic_write_json
from .lora import ADAPTER_DIR, merged, save_adapter
from .model_folder import save_model
from .optim import unfreeze_all
from .run_folder import check_input_files, choose_output_dir, point_latest, same_on_every_process
from .scoring import evaluate_split, final_scoring
from .sparse_embedding import clip_gradients, materialize
from .task import Task
from .trackers import Throughput, epoch_values, log_final, start_trackers
from .training_setup import Training, build_training, make_accelerator, precision_name


def run(task: Task, config: TrainConfig, task_module: str | None = None, on_epoch=None) -> dict:
    """Train, pick the best epoch on validation, score test, write the run folder; returns metrics.json.
    `on_epoch(record)` (the hyperparameter search's pruning hook) sees each epoch's history record after
    validation; returning True ends training there, as early stopping does."""
    check_input_files(config)  # a misspelled --train_file is named before anything about the output folder
    default_folder = choose_output_dir(config, task.name)
    check_output_dir_path(config.output_dir)
    accelerator = make_accelerator(config)
    config.output_dir = same_on_every_process(accelerator, config.output_dir)
    log = accelerator.print
    if accelerator.num_processes > 1 and config.unfreeze_at_epoch:
        raise UsageError("--unfreeze_at_epoch: not supported with several processes (DDP fixes the trainable "
                         "parameters at start); run it in one process or drop the flag")
    check_output_dir(config)
    set_seed(config.seed)

    data = prepare_data(task, config, log, accelerator)  # bad input fails here, before anything is written
    training = build_training(task, config, data, accelerator, log)
    start_trackers(accelerator, config, {"task": task.name, **to_dict(config), **to_dict(task.options)})
    state = resume_state(accelerator, config, log)
    precision = precision_name(accelerator)
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        if default_folder:
            point_latest(config.output_dir, log)
        atomic_write_json(os.path.join(config.output_dir, "config.json"),
                          {"task": task.name, **to_dict(config), **to_dict(task.options),
                           "max_seq_length": data.max_seq_length, "precision": precision,
                           "packing": training.packing, "class_weights_resolved": training.class_weights,
                           "resolved_model_path": resolve_model_path(config.model_name_or_path),
                           "num_processes": accelerator.num_processes, "labels": data.labels,
                           "data_sources": data.splits.sources})

    model_dir = os.path.join(config.output_dir, "model")
    meta = {"max_seq_length": data.max_seq_length, "task_options": to_dict(task.options),
            "task_module": task_module or type(task).__module__, **task.model_meta(data.splits.train, data.labels)}

    def save_best() -> None:
        if accelerator.is_main_process:
            if not config.lora_r or config.lora_merge:
                save_model(merged(training.network), data.tokenizer, model_dir, task.name, meta)
            if config.lora_r:
                save_adapter(training.network, data.tokenizer, os.path.join(config.output_dir, ADAPTER_DIR),
                             task.name, meta, config.model_name_or_path, config.init_from)

    lengths = data.features["train"].lengths
    for epoch in range(state.epoch, training.epochs):
        if config.unfreeze_at_epoch and epoch + 1 == config.unfreeze_at_epoch:
            unfreeze_all(training.network)
            log(f"epoch {epoch + 1}: encoder unfrozen")
        train_epoch(epoch, training, state, config, lengths)
        if end_of_epoch(epoch, training, task, data, state, config, save_best) or \
                (on_epoch is not None and on_epoch(state.history[-1])):
            break
        if config.max_steps and state.global_step >= config.max_steps:
            log(f"--max_steps {config.max_steps} reached (epoch {epoch + 1})")
            break
    accelerator.wait_for_everyone()
    metrics = final_scoring(task, config, data, training, state, model_dir)
    log_final(accelerator, metrics, state.global_step)
    accelerator.end_training()
    return metrics


def train_epoch(epoch: int, training: Training, state: TrainerState, config: TrainConfig, lengths: list[int]) -> None:
    """One epoch (or its rest, after a resume): steps, logging, step checkpoints; raises on a NaN/inf loss."""
    accelerator, model = training.accelerator, training.model
    model.train()
    loader = training.train_loader
    if state.batches_in_epoch:
        loader = accelerator.skip_first_batches(training.train_loader, state.batches_in_epoch)
    # Through Accelerate's loader: it re-sets the sampler's epoch from its own counter when iteration starts,
    # which after a resume (or on a skip loader) would otherwise not be this epoch.
    loader.set_epoch(epoch)
    epoch_batches = training.sampler.batches()  # the same on every process
    monitor, throughput = LossMonitor(accelerator, state), Throughput(accelerator.num_processes)
    batches = len(training.train_loader)
    progress = tqdm(total=batches, initial=state.batches_in_epoch, desc=f"epoch {epoch + 1}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start = time.perf_counter()
    for batch in rng_neutral(loader):
        batch.pop("feature_index")
        throughput.add(batch)
        loss = timed_step(training.compiled, state.global_step + 1, train_step, accelerator, model, batch,
                          training.optimizer, training.scheduler, training.adversary, config.max_grad_norm)
        monitor.add(loss, state.global_step + 1)
        state.batches_in_epoch += 1
        progress.update(1)
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        logging_point = state.global_step % config.logging_steps == 0 or state.batches_in_epoch == batches
        saving_point = bool(config.save_steps) and state.global_step % config.save_steps == 0
        if logging_point or saving_point:
            if (step := monitor.diverged_at()) is not None:  # never log or save past a NaN
                progress.close()
                stop_diverged(step, epoch, config)
        if logging_point:
            mean_loss = monitor.fold()
            lr = training.scheduler.get_last_lr()[-1]
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"train_loss": mean_loss, "lr": lr, **throughput.read()}, step=state.global_step)
        if saving_point:
            state.train_seconds += time.perf_counter() - start
            monitor.fold()
            materialize(training.optimizer)  # every embedding row up to date before the weights are written
            save_checkpoint(accelerator, config, state)
            start = time.perf_counter()
        if config.max_steps and state.global_step >= config.max_steps:
            break
    progress.close()
    if training.compiled is not None:
        accelerator.print(training.compiled.describe())
    if (step := monitor.diverged_at()) is not None:
        stop_diverged(step, epoch, config)
    state.train_seconds += time.perf_counter() - start
    # Padding statistics and model FLOPs over the batches this epoch trained on (all unless --max_steps cut it).
    trained = epoch_batches[:state.batches_in_epoch * accelerator.num_processes]
    count_trained(training, state, config, lengths, trained)
    monitor.fold()


def count_trained(training: Training, state: TrainerState, config: TrainConfig, lengths: list[int],
                  trained: list[list[int]]) -> None:
    """Add an epoch's trained batches (feature indices) to the state's samples, real and padded tokens and model
    FLOPs (bert_ft.flops; None for an architecture without BERT's size fields: null in metrics.json)."""
    real, slots = padding_stats(lengths, trained, training.collator)
    state.trained_samples += sum(len(batch) for batch in trained)
    state.real_tokens += int(real)  # numpy ints would be saved as strings in trainer_state.json
    state.padded_tokens += int(slots)
    if training.flop_model is None:
        state.train_flops = None
    elif state.train_flops is not None:
        state.train_flops += batches_training_flops(training.flop_model, lengths, trained,
                                                    passes_per_step(config.adversarial, config.adv_steps))


def train_step(accelerator: Accelerator, model: torch.nn.Module, batch: dict, optimizer, scheduler, adversary,
               max_grad_norm: float) -> torch.Tensor:
    """One micro-batch: forward, backward (plus the adversarial pass), and on an accumulation boundary clip and
    step. Returns the detached loss (on the device: reading it would synchronise)."""
    def forward_loss() -> torch.Tensor:
        with accelerator.autocast():  # bf16/fp16 where the run uses it; a no-op in fp32
            return model(**batch)["loss"]

    with accelerator.accumulate(model):
        if adversary is None:
            loss = forward_loss()
            accelerator.backward(loss)
        else:
            adversary.before_backward()
            with accelerator.no_sync(model):  # the clean pass: local grads only, one all-reduce later
                loss = forward_loss()
                accelerator.backward(loss)
            adversary.adversarial_backward(lambda: accelerator.backward(forward_loss()))
        if accelerator.sync_gradients and max_grad_norm:
            clip_gradients(accelerator, model.parameters(), max_grad_norm)  # counts sparse embedding rows too
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def end_of_epoch(epoch: int, training: Training, task: Task, data: Data, state: TrainerState,
                 config: TrainConfig, save_best) -> bool:
    """Validate, keep the best model, checkpoint; returns True when early stopping ends training."""
    materialize(training.optimizer)  # sparse embedding updates: every row caught up before anything reads them
    record: dict[str, Any] = {"epoch": epoch + 1,
                              "train_loss": state.epoch_loss_sum / max(state.epoch_loss_count, 1)}
    state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
    improved = True
    if "validation" in data.features:
        evaluation, _ = evaluate_split(training, task, data, "validation")
        score = evaluation.metrics[task.metric]
        record[f"eval_{task.metric}"] = score
        improved = state.best_metric is None or score > state.best_metric
        training.accelerator.print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, validation "
                                   f"{task.metric} {score:.4f}{' (best so far)' if improved else ''}")
        training.accelerator.log(epoch_values(record, evaluation.metrics), step=state.global_step)
    state.history.append(record)
    if improved:
        state.best_metric, state.best_epoch = record.get(f"eval_{task.metric}"), epoch + 1
        state.epochs_without_improvement = 0
        save_best()
    else:
        state.epochs_without_improvement += 1
    state.epoch, state.batches_in_epoch = epoch + 1, 0
    save_checkpoint(training.accelerator, config, state)
    if config.early_stopping_patience and state.epochs_without_improvement >= config.early_stopping_patience:
        training.accelerator.print(f"early stopping: no better validation {task.metric} for "
                                   f"{state.epochs_without_improvement} epochs")
        return True
    return False


class LossMonitor:
    """Sums the loss on the device (no host sync per step), notes the first non-finite step, and folds the sum
    into the checkpointed epoch totals only at logging and saving points."""

    def __init__(self, accelerator: Accelerator, state: TrainerState) -> None:
        self.accelerator, self.state = accelerator, state
        self.running = torch.zeros((), device=accelerator.device)
        self.count = 0
        self.bad_step = torch.tensor(-1, device=accelerator.device)  # first optimiser step with a non-finite loss

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss),
                                    torch.tensor(step, device=self.bad_step.device), self.bad_step)
        self.running += loss.float()
        self.count += 1

    def diverged_at(self) -> int | None:
        step = int(self.bad_step.item())  # one host sync, at logging/saving points only
        return step if step >= 0 else None

    def fold(self) -> float:
        """Move the running sum into the epoch totals; return the interval's mean loss."""
        total = self.accelerator.reduce(self.running.clone(), reduction="mean").item()
        self.state.epoch_loss_sum += total
        self.state.epoch_loss_count += self.count
        mean = total / max(self.count, 1)
        self.running.zero_()
        self.count = 0
        return mean


def stop_diverged(step: int, epoch: int, config: TrainConfig) -> None:
    """The one NaN/inf exit: name the step and what was kept."""
    kept = list_checkpoints(config.output_dir)
    model_dir = os.path.join(config.output_dir, "model")
    raise TrainingDiverged(
        f"the training loss became NaN/inf at optimiser step {step} (epoch {epoch + 1}); training stopped. "
        f"Last good checkpoint: {kept[-1] if kept else 'none saved yet'}"
        f"{'; best model: ' + model_dir if os.path.isdir(model_dir) else ''}.\n"
        "  fix: lower --learning_rate, use --mixed_precision bf16 instead of fp16, or check the data")


def rng_neutral(loader):
    """Iterate `loader` without letting iterator creation draw from the global torch RNG.

    A DataLoader draws a base seed from the global RNG when its iterator starts. An uninterrupted run does that at
    the start of the epoch, a resumed run right after restoring the RNG, which would shift every later dropout mask;
    restoring the RNG around the first batch makes both runs identical.
    """
    state = torch.random.get_rng_state()
    iterator = iter(loader)
    first = next(iterator, None)
    torch.random.set_rng_state(state)
    if first is None:
        return
    yield first
    yield from iterator
