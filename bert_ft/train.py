"""The one training loop: prepare, accumulate, clip, step; evaluate with gather_for_metrics; best checkpoint.

Nothing here knows which task it trains: the Task plugin reads data, builds features and the head, and scores the
gathered outputs. See `run` for the order of things.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .adversarial import build_adversary
from .config import TrainConfig, to_dict
from .data import LengthGroupedSampler, PaddingCollator, padding_stats
from .encoder import load_tokenizer, resolve_model_path, transfer_encoder
from .errors import DataError, TrainingDiverged, UsageError
from .heads import load_model, save_model
from .io import atomic_write_json, atomic_write_text
from .optim import build_optimizer, format_groups, parameter_groups, set_frozen, unfreeze_all
from .report import write_plots
from .task import Evaluation, Task

RUN_MARKERS = ("metrics.json", "config.json", "model", "report.txt")


@dataclass
class Splits:
    train: list = field(default_factory=list)
    validation: list | None = None
    test: list | None = None
    sources: dict = field(default_factory=dict)  # split -> file it came from (for the report)


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


# ----------------------------------------------------------------------------------------------------- data

def _sample(examples: list, limit: int | None) -> list:
    return examples if limit is None else examples[:limit]


def load_splits(task: Task, config: TrainConfig) -> Splits:
    """Read train/validation/test from flags, a Hub dataset, or the task's shipped sample."""
    splits = Splits()
    if config.dataset_name:
        hub = _load_hub_dataset(config.dataset_name)
        splits.train = task.from_hub(hub["train"], "train")
        splits.sources["train"] = f"{config.dataset_name}[train]"
        for split, names in (("validation", ("validation", "dev")), ("test", ("test",))):
            for name in names:
                if name in hub:
                    setattr(splits, split, task.from_hub(hub[name], name))
                    splits.sources[split] = f"{config.dataset_name}[{name}]"
                    break
    else:
        defaults = task.default_files() if not config.train_file else {}
        files = {"train": config.train_file or defaults.get("train"),
                 "validation": config.validation_file or (None if config.validation_split else defaults.get("validation")),
                 "test": config.test_file or defaults.get("test")}
        for split, path in files.items():
            if path:
                setattr(splits, split, task.read(path))
                splits.sources[split] = path
    if config.validation_split:
        order = list(range(len(splits.train)))
        random.Random(config.seed).shuffle(order)
        held_out = set(order[: max(1, round(config.validation_split * len(order)))])
        splits.validation = [example for index, example in enumerate(splits.train) if index in held_out]
        splits.train = [example for index, example in enumerate(splits.train) if index not in held_out]
        splits.sources["validation"] = f"{splits.sources['train']} ({config.validation_split:.0%} seeded split, seed {config.seed})"
    splits.train = _sample(splits.train, config.max_train_samples)
    splits.validation = _sample(splits.validation, config.max_eval_samples) if splits.validation else None
    splits.test = _sample(splits.test, config.max_eval_samples) if splits.test else None
    return splits


def _load_hub_dataset(name: str):
    import datasets

    path, _, subset = name.partition("/")
    try:
        return datasets.load_dataset(path, subset or None)
    except Exception as error:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        raise UsageError(f"--dataset_name {name}: cannot load it ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}).\n  The Hub needs the network; "
                         "offline, download the files elsewhere and pass --train_file/--validation_file/--test_file "
                         "(formats in README.md).") from None


def check_labels(task: Task, splits: Splits, labels: list[str]) -> None:
    """Validation/test labels never seen in training make the scores meaningless: refuse them."""
    known = set(labels)
    for split in ("validation", "test"):
        for index, example in enumerate(getattr(splits, split) or []):
            unseen = sorted(set(task.labels_of(example)) - known)
            if unseen:
                raise DataError(splits.sources[split], getattr(example, "line", None),
                                f"example {index + 1} has label(s) {unseen} that never occur in the training data "
                                f"({splits.sources['train']}; known: {sorted(known)})",
                                "fix the label spelling, or add training examples with that label")


def _loader(features: list[dict], collator: PaddingCollator, batch_size: int, seed: int, shuffle: bool,
            mega_batch_factor: int) -> DataLoader:
    sampler = LengthGroupedSampler([len(feature["input_ids"]) for feature in features], batch_size, seed,
                                   mega_batch_factor=mega_batch_factor, shuffle=shuffle)
    # Its own generator: creating an iterator must not consume the global RNG, or a resumed run's dropout
    # masks would drift from an uninterrupted run's.
    return DataLoader(features, batch_sampler=sampler, collate_fn=collator, generator=torch.Generator().manual_seed(seed))


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


def _indexed(features: list[dict]) -> list[dict]:
    return [{**feature, "feature_index": index} for index, feature in enumerate(features)]


# ------------------------------------------------------------------------------------------------ inference

def infer(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, count: int) -> list[dict]:
    """Per-feature outputs of `model.predict`, in feature order, each feature exactly once across processes."""
    network = accelerator.unwrap_model(model)
    network.eval()
    rows: list[dict | None] = [None] * count
    with torch.inference_mode():
        for batch in loader:
            indices = batch.pop("feature_index")
            outputs = network.predict(**batch)
            indices = accelerator.gather_for_metrics(indices).tolist()
            gathered = {}
            for key, value in outputs.items():
                if value.dim() > 1:  # token-level outputs: ranks may have padded to different lengths
                    value = accelerator.pad_across_processes(value, dim=1, pad_index=0)
                gathered[key] = accelerator.gather_for_metrics(value).cpu().numpy()
            for row, index in enumerate(indices):
                rows[index] = {key: value[row] for key, value in gathered.items()}
    missing = [index for index, row in enumerate(rows) if row is None]
    if missing:
        raise RuntimeError(f"evaluation lost {len(missing)} features (first: {missing[:5]}); please report this")
    return rows


def evaluate_split(accelerator, model, task: Task, examples, features, loader, labels, source) -> tuple[Evaluation, float]:
    start = time.perf_counter()
    outputs = infer(accelerator, model, loader, len(features))
    seconds = time.perf_counter() - start
    return task.evaluate(examples, features, outputs, labels, source), seconds


# ------------------------------------------------------------------------------------------------ checkpoints

def _checkpoints(output_dir: str) -> list[str]:
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
        for old in _checkpoints(config.output_dir)[: -config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(config: TrainConfig) -> str:
    if config.resume_from_checkpoint == "latest":
        found = _checkpoints(config.output_dir)
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
    present += [os.path.basename(path) for path in _checkpoints(config.output_dir)]
    if present:
        raise UsageError(f"--output_dir {config.output_dir} holds another run ({', '.join(present[:4])}).\n"
                         "  fix: choose a new --output_dir, add --overwrite_output_dir to replace it, or "
                         "--resume_from_checkpoint latest to continue it")


# ------------------------------------------------------------------------------------------------ the run

def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_accelerator(config: TrainConfig) -> Accelerator:
    kwargs: dict[str, Any] = {}
    if config.report_to != "none":
        kwargs.update(log_with=config.report_to, project_dir=config.output_dir)
    if config.torch_compile:
        kwargs["dynamo_backend"] = "inductor"
    # cpu=True when there is no GPU: only then does Accelerate form a multi-process (gloo) group on CPUs.
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=config.gradient_accumulation_steps, **kwargs)


def run(task: Task, config: TrainConfig, options: Any, task_name: str) -> dict:
    """Train, pick the best epoch on validation, score test, write the run folder; returns metrics.json."""
    accelerator = make_accelerator(config)
    log = accelerator.print
    if accelerator.num_processes > 1 and config.unfreeze_at_epoch:
        raise UsageError("--unfreeze_at_epoch: not supported with several processes (DDP fixes the trainable "
                         "parameters at start); run it in one process or drop the flag")
    check_output_dir(config)
    set_seed(config.seed)

    # Data first: bad input must fail before anything is written.
    splits = load_splits(task, config)
    labels = task.build_labels(splits.train)
    check_labels(task, splits, labels)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    task.prepare_tokenizer(tokenizer)
    encoded = {split: _indexed(task.encode(examples, tokenizer, config.max_seq_length, labels))
               for split in ("train", "validation", "test") if (examples := getattr(splits, split))}
    log("data: " + ", ".join(f"{split} {len(getattr(splits, split))} examples ({splits.sources[split]})"
                              for split in encoded))

    model = task.build_model(resolve_model_path(config.model_name_or_path), labels, tokenizer,
                             config.trust_remote_code)
    if config.init_from:
        source, _, _ = load_model(config.init_from)
        transfer_encoder(model, source, log)
        del source
    set_frozen(model, config.freeze_encoder, config.freeze_layers)
    groups = parameter_groups(model, config.learning_rate, config.head_learning_rate, config.layer_lr_decay,
                              config.weight_decay)
    log(format_groups(groups))
    optimizer = build_optimizer(groups, config.weight_decay)

    pad_multiple = 8 if accelerator.device.type == "cuda" else None
    collator = PaddingCollator(task.pad_values(tokenizer), pad_multiple)
    train_loader = _loader(encoded["train"], collator, config.per_device_train_batch_size, config.seed, True,
                           config.mega_batch_factor)
    eval_loaders = {split: _loader(features, collator, config.per_device_eval_batch_size, config.seed, False,
                                   config.mega_batch_factor)  # unshuffled: one sort by length, the factor unused
                    for split, features in encoded.items() if split != "train"}
    train_sampler = train_loader.batch_sampler
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.num_train_epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    network = accelerator.unwrap_model(model)
    adversary = build_adversary(config.adversarial, network.get_input_embeddings().weight, config.adv_epsilon,
                                config.adv_steps, config.adv_alpha,
                                params=[param for param in network.parameters() if param.requires_grad])
    if config.report_to != "none":
        accelerator.init_trackers("bert_ft", config={key: value for key, value in to_dict(config).items()
                                                     if isinstance(value, (int, float, str, bool))})

    state = TrainerState()
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(config)
        accelerator.load_state(checkpoint)
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            state = TrainerState(**json.load(handle))
        log(f"resumed from {checkpoint}: step {state.global_step}, epoch {state.epoch + 1}, "
            f"batch {state.batches_in_epoch}")
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        atomic_write_json(os.path.join(config.output_dir, "config.json"),
                          {"task": task_name, **to_dict(config), **to_dict(options),
                           "resolved_model_path": resolve_model_path(config.model_name_or_path),
                           "num_processes": accelerator.num_processes, "labels": labels})

    lengths = [len(feature["input_ids"]) for feature in encoded["train"]]
    model_dir = os.path.join(config.output_dir, "model")
    bad_step = torch.tensor(-1, device=accelerator.device)  # first non-finite loss step, checked without syncing
    stop = False
    for epoch in range(state.epoch, config.num_train_epochs):
        if config.unfreeze_at_epoch and epoch + 1 == config.unfreeze_at_epoch:
            unfreeze_all(network)
            log(f"epoch {epoch + 1}: encoder unfrozen")
        model.train()
        epoch_loader = train_loader
        if state.batches_in_epoch:
            epoch_loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        # Through Accelerate's loader: it re-sets the sampler's epoch from its own counter when iteration starts,
        # which after a resume (or on a skip loader) would otherwise not be this epoch.
        epoch_loader.set_epoch(epoch)
        # Padding statistics come from this epoch's batches (the same on every process).
        real, padded = padding_stats(lengths, train_sampler.batches(), pad_multiple)
        # Summed on the device and read only at logging/saving points: no host sync per step.
        running_loss = torch.zeros((), device=accelerator.device)
        running_count = 0

        def fold_running_loss() -> float:
            """Move the device-side loss sum into the (checkpointed) epoch totals; return the interval mean."""
            nonlocal running_count
            total = accelerator.reduce(running_loss.clone(), reduction="mean").item()
            state.epoch_loss_sum += total
            state.epoch_loss_count += running_count
            mean = total / max(running_count, 1)
            running_loss.zero_()
            running_count = 0
            return mean
        progress = tqdm(total=len(train_loader), initial=state.batches_in_epoch, desc=f"epoch {epoch + 1}",
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        start = time.perf_counter()
        for batch in rng_neutral(epoch_loader):
            batch.pop("feature_index")
            with accelerator.accumulate(model):
                if adversary is None:
                    loss = model(**batch)["loss"]
                    accelerator.backward(loss)
                else:
                    adversary.before_backward()
                    with accelerator.no_sync(model):  # the clean pass: local grads only, one all-reduce later
                        loss = model(**batch)["loss"]
                        accelerator.backward(loss)
                    adversary.adversarial_backward(lambda: accelerator.backward(model(**batch)["loss"]))
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            detached = loss.detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(detached),
                                   torch.tensor(state.global_step + 1, device=bad_step.device), bad_step)
            running_loss += detached.float()
            running_count += 1
            state.batches_in_epoch += 1
            progress.update(1)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            if state.global_step % config.logging_steps == 0 or state.batches_in_epoch == len(train_loader):
                if bad_step.item() >= 0:  # one host sync per logging interval, not per step
                    stop = True
                    break
                mean_loss = fold_running_loss()
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
                accelerator.log({"train_loss": mean_loss, "lr": scheduler.get_last_lr()[-1]}, step=state.global_step)
            if config.save_steps and state.global_step % config.save_steps == 0:
                if bad_step.item() >= 0:  # never save a checkpoint that already holds NaN weights
                    stop = True
                    break
                state.train_seconds += time.perf_counter() - start
                fold_running_loss()
                save_checkpoint(accelerator, config, state)
                start = time.perf_counter()
        progress.close()
        if stop or bad_step.item() >= 0:
            kept = _checkpoints(config.output_dir)
            raise TrainingDiverged(
                f"the training loss became NaN/inf at optimiser step {bad_step.item()} (epoch {epoch + 1}); "
                f"training stopped. Last good checkpoint: {kept[-1] if kept else 'none saved yet'}"
                f"{'; best model: ' + model_dir if os.path.isdir(model_dir) else ''}.\n"
                "  fix: lower --learning_rate, use --mixed_precision bf16 instead of fp16, or check the data")
        state.train_seconds += time.perf_counter() - start
        state.real_tokens += real
        state.padded_tokens += padded
        fold_running_loss()
        record: dict[str, Any] = {"epoch": epoch + 1,
                                  "train_loss": state.epoch_loss_sum / max(state.epoch_loss_count, 1)}
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        improved = True
        if "validation" in encoded:
            evaluation, _ = evaluate_split(accelerator, model, task, splits.validation, encoded["validation"],
                                           eval_loaders["validation"], labels, splits.sources["validation"])
            score = evaluation.metrics[task.metric]
            record[f"eval_{task.metric}"] = score
            improved = state.best_metric is None or score > state.best_metric
            log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, validation {task.metric} {score:.4f}"
                f"{' (best so far)' if improved else ''}")
            accelerator.log({f"eval_{task.metric}": score}, step=state.global_step)
        state.history.append(record)
        if improved:
            state.best_metric, state.best_epoch = record.get(f"eval_{task.metric}"), epoch + 1
            state.epochs_without_improvement = 0
            if accelerator.is_main_process:
                save_model(network, tokenizer, model_dir, task_name,
                           {"max_seq_length": config.max_seq_length, "task_options": to_dict(options)})
        else:
            state.epochs_without_improvement += 1
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        save_checkpoint(accelerator, config, state)
        if config.early_stopping_patience and state.epochs_without_improvement >= config.early_stopping_patience:
            log(f"early stopping: no better validation {task.metric} for {state.epochs_without_improvement} epochs")
            break
    accelerator.wait_for_everyone()

    # Training is over (the checkpoints hold the optimiser): free AdamW's two moment buffers, as large as the model,
    # before a second copy of the weights is loaded, so the end of the run stays under the training peak.
    optimizer.state.clear()
    # Score the best checkpoint (the saved one) on validation and test.
    best, _, _ = load_model(model_dir)
    network.load_state_dict(best.state_dict())
    del best
    metrics = _final_metrics(state, splits, accelerator)
    report_sections = [f"bert-ft {task_name} run: {config.output_dir}",
                       f"best epoch: {state.best_epoch} (by validation {task.metric})" if "validation" in encoded
                       else "no validation set: the last epoch is kept"]
    test_evaluation = None
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in encoded:
            continue
        evaluation, seconds = evaluate_split(accelerator, model, task, getattr(splits, split), encoded[split],
                                             eval_loaders[split], labels, splits.sources[split])
        metrics.update({f"{prefix}_{key}": value for key, value in evaluation.metrics.items()})
        metrics[f"{prefix}_runtime"] = round(seconds, 3)
        metrics[f"{prefix}_samples_per_second"] = round(len(getattr(splits, split)) / max(seconds, 1e-9), 2)
        report_sections.append(f"== {split}: {splits.sources[split]} ==\n{evaluation.report}")
        if split == "test":
            test_evaluation = evaluation
    report_sections.append(_speed_section(metrics))
    if accelerator.is_main_process:
        if test_evaluation is not None:
            task.write_predictions(os.path.join(config.output_dir, task.predictions_file), splits.test,
                                   test_evaluation.predictions)
        atomic_write_text(os.path.join(config.output_dir, "report.txt"), "\n\n".join(report_sections) + "\n")
        atomic_write_json(os.path.join(config.output_dir, "metrics.json"), metrics)
        write_plots(config.output_dir, state.history, task.metric,
                    test_evaluation.confusion if test_evaluation else None)
        log("\n\n".join(report_sections[2:]))
        log(f"run folder: {config.output_dir}")
    accelerator.end_training()
    return metrics


def _final_metrics(state: TrainerState, splits: Splits, accelerator: Accelerator) -> dict:
    seconds = max(state.train_seconds, 1e-9)
    epochs_done = len(state.history)
    return {
        "train_runtime": round(state.train_seconds, 3),
        "train_samples": len(splits.train),
        "epochs_trained": epochs_done,
        "best_epoch": state.best_epoch,
        "train_samples_per_second": round(len(splits.train) * epochs_done / seconds, 3),
        "train_tokens_per_second": round(state.real_tokens / seconds, 1),
        "padding_ratio": round(1 - state.real_tokens / max(state.padded_tokens, 1), 4),
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "num_processes": accelerator.num_processes,
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
    }


def _speed_section(metrics: dict) -> str:
    keys = ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "padding_ratio",
            "peak_memory_mb", "eval_samples_per_second", "test_samples_per_second", "num_processes")
    return "== speed ==\n" + "\n".join(f"{key:<26} {metrics[key]}" for key in keys if key in metrics)
