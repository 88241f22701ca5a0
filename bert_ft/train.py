"""The one training loop: prepare, accumulate, clip, step; evaluate with gather_for_metrics; best checkpoint.

Nothing here knows which task it trains: the Task plugin reads data, builds features and the head, and scores the
gathered outputs. `run` reads top to bottom through named stages:
  prepare_data   read the splits, build and check labels, tokenizer, encode (also what --check_data runs)
  build_training the model, lr groups, optimiser, schedule, loaders (packed or padded), Accelerate's prepare
  train_epoch    one epoch of `train_step`, with logging, step checkpoints and the one NaN/inf exit
  final_scoring  reload the best model, fit a temperature on validation, score validation and test, write the
                 run folder
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .adversarial import build_adversary
from .config import TrainConfig, to_dict
from .data import Collator, FeatureDataset, LengthGroupedSampler, padding_stats
from .dataset import DataCache, take
from .cpu import reuse_freed_memory, use_bulk_dropout
from .checks import check_label_variety, check_output_dir_path, clamp_max_seq_length
from .encoder import load_config, load_tokenizer, resolve_model_path, transfer_encoder
from .errors import DataError, TrainingDiverged, UsageError
from .calibration import calibrate, calibration_section, expected_calibration_error
from .heads import has_score_seam, read_meta, save_model, write_temperature
from .inference import decode_batches, eval_loader, infer, score_batches
from .io import atomic_write_json, atomic_write_text
from .lora import ADAPTER_DIR, apply_lora, load_adapter, merged, model_folders, save_adapter, trainable_parameters
from .losses import format_weights, label_counts, resolve_class_weights
from .modelcard import write_model_cards
from .optim import build_optimizer, format_groups, parameter_groups, set_frozen, unfreeze_all
from .report import write_plots
from .task import Evaluation, Features, Task
from .trackers import Throughput, accelerator_kwargs, epoch_values, log_final, start_trackers

RUN_MARKERS = ("metrics.json", "config.json", "model", "report.txt")
SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: list = field(default_factory=list)
    validation: list | None = None
    test: list | None = None
    sources: dict = field(default_factory=dict)  # split -> file it came from (for the report)
    declared_labels: list[str] | None = None  # a Hub dataset's own class order


@dataclass
class Data:
    """Everything `prepare_data` produces: what training and --check_data consume."""

    splits: Splits
    labels: list[str]
    tokenizer: Any
    features: dict[str, Features]  # split -> encoded features (only the splits present)
    max_seq_length: int
    seconds: float = 0.0  # the data stage's wall time (reading, checks, tokenizer, encoding)


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


# ----------------------------------------------------------------------------------------------------- data

def _sample(examples: Sequence, limit: int | None) -> Sequence:
    return examples if limit is None or limit >= len(examples) else take(examples, range(limit))


def data_cache(config: TrainConfig, accelerator: Accelerator | None = None, log=print) -> DataCache:
    """The run's Arrow cache; under several processes the main one builds an entry before the others read it."""
    main = accelerator is None or accelerator.is_main_process
    return DataCache(config.data_cache_dir, overwrite=config.overwrite_cache and main,
                     num_workers=config.preprocessing_num_workers,
                     first=accelerator.main_process_first if accelerator is not None else contextlib.nullcontext,
                     log=log)


def load_splits(task: Task, config: TrainConfig, cache: DataCache | None = None) -> Splits:
    """Read train/validation/test from flags (through the Arrow cache), a Hub dataset, or the task's sample."""
    cache = cache or data_cache(config)
    splits = Splits()
    if config.dataset_name:
        hub = _load_hub_dataset(config.dataset_name)
        splits.train = task.from_hub(hub["train"], "train")
        splits.sources["train"] = f"{config.dataset_name}[train]"
        splits.declared_labels = task.hub_label_names(hub["train"])
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
                setattr(splits, split, cache.examples(task, path))
                splits.sources[split] = path
    if config.validation_split:
        order = list(range(len(splits.train)))
        random.Random(config.seed).shuffle(order)
        held_out = set(order[: max(1, round(config.validation_split * len(order)))])
        # Both parts keep file order (an index map over the cached table, not a copy).
        splits.validation = take(splits.train, [index for index in range(len(order)) if index in held_out])
        splits.train = take(splits.train, [index for index in range(len(order)) if index not in held_out])
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


def prepare_data(task: Task, config: TrainConfig, log=print, accelerator: Accelerator | None = None) -> Data:
    """Read and check every split, load the tokenizer, encode: everything that can fail on the user's data.
    Files go through the Arrow cache (`bert_ft.dataset`): a second run on the same data skips reading and
    encoding."""
    start = time.perf_counter()
    cache = data_cache(config, accelerator, log)
    splits = load_splits(task, config, cache)
    labels = train_labels(task, splits, cache)
    check_labels(task, splits, labels)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    task.prepare_tokenizer(tokenizer)
    # Above the position table the first long input would crash inside transformers: clamp, as the HF scripts do.
    max_seq_length = clamp_max_seq_length(config.max_seq_length, tokenizer,
                                          load_config(config.model_name_or_path, config.trust_remote_code), log)
    features = {split: cache.features(task, examples, tokenizer, max_seq_length, labels)
                for split in SPLITS if (examples := getattr(splits, split))}
    log("data: " + ", ".join(f"{split} {len(getattr(splits, split))} examples ({splits.sources[split]})"
                              for split in features)
        + f"; data stage {time.perf_counter() - start:.1f} s (cache: {cache.root})")
    return Data(splits, labels, tokenizer, features, max_seq_length, round(time.perf_counter() - start, 3))


def train_labels(task: Task, splits: Splits, cache: DataCache) -> list[str]:
    """The model's label list from the training examples, after the label-variety check; for a cached training
    table both are remembered with it (a pure function of its rows), so a cache hit does not walk the corpus."""
    key = getattr(splits.train, "key", None)
    path = os.path.join(cache.root, "labels", f"{key}-{task.name}.json") if key else None
    if path and os.path.isfile(path) and not cache.overwrite:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("declared") == splits.declared_labels:
            return saved["labels"]
    check_label_variety(task, splits.train, splits.sources["train"])
    labels = task.build_labels(splits.train, splits.declared_labels)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {"labels": labels, "declared": splits.declared_labels})
    return labels


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


# ------------------------------------------------------------------------------------------------ set-up

def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def native_bf16() -> bool:
    """bf16 that the hardware computes natively: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX.

    (torch's generic bf16 check is also true where bf16 is only emulated, which is slower than fp32.)
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(requested: str) -> str:
    """The precision to run: "auto" becomes bf16 where it is native (see native_bf16), else no (fp32)."""
    if requested == "auto":
        return "bf16" if native_bf16() else "no"
    return requested


def precision_name(accelerator: Accelerator) -> str:
    """What the training step runs in: "fp32", "bf16" or "fp16" (evaluation always runs in fp32)."""
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision


def make_accelerator(config: TrainConfig) -> Accelerator:
    kwargs: dict[str, Any] = accelerator_kwargs(config.report_to, config.output_dir)
    if config.torch_compile:
        kwargs["dynamo_backend"] = "inductor"
    # cpu=True when there is no GPU: only then does Accelerate form a multi-process (gloo) group on CPUs.
    return Accelerator(mixed_precision=resolve_precision(config.mixed_precision), cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=config.gradient_accumulation_steps, **kwargs)


def _train_loader(features: Features, collator: Collator, config: TrainConfig, mega_batch_factor: int) -> DataLoader:
    sampler = LengthGroupedSampler(features.lengths, config.per_device_train_batch_size, config.seed,
                                   mega_batch_factor=mega_batch_factor)
    # Its own generator: creating an iterator must not consume the global RNG, or a resumed run's dropout
    # masks would drift from an uninterrupted run's.
    return DataLoader(FeatureDataset(features.inputs), batch_sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(config.seed))


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


def packing_is_exact(model: torch.nn.Module, features: Features, pad_values: dict, count: int = 6) -> bool:
    """Packed rows give the same loss and outputs as padded ones, on the first training features (>= 3 per row).

    Positions restarting at 0 are right for BERT-style encoders but not, e.g., for RoBERTa's offset positions:
    checking the real model on real features is what makes packing safe by construction.
    """
    items = [(index, features.inputs[index]) for index in range(min(count, len(features)))]
    if len(items) < 2:
        return True
    total = sum(features.lengths[index] for index, _ in items)
    padded = Collator(pad_values)(items)
    packed = Collator(pad_values, pack=True, row_capacity=max(total // 2 + 1, max(features.lengths[:count])))(items)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = []
            for batch in (padded, packed):
                batch = {key: value.to(device) for key, value in batch.items() if key != "feature_index"}
                results.append((model(**batch), model(**batch, decode=True)))
        (padded_train, padded_decoded), (packed_train, packed_decoded) = results
        same = all(torch.allclose(padded_decoded[key].float(), packed_decoded[key].float(), atol=1e-4, rtol=1e-3)
                   for key in padded_decoded if padded_decoded[key].is_floating_point())
        if "loss" in padded_train:
            same = same and torch.allclose(padded_train["loss"], packed_train["loss"], atol=1e-4, rtol=1e-3)
    except Exception:  # an architecture whose forward refuses the packed inputs: pad instead
        same = False
    model.train(was_training)
    return same


@dataclass
class Training:
    """What `build_training` assembles for the loop."""

    accelerator: Accelerator
    model: torch.nn.Module  # prepared (possibly wrapped) model: call it
    network: torch.nn.Module  # the unwrapped head: save it, read its parameters
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loaders: dict
    collator: Collator  # the training collator (packed or padded), for the padding statistics
    sampler: LengthGroupedSampler  # the training batch sampler (its batches give the padding statistics)
    adversary: Any
    packing: str  # "on", or why it is off
    epochs: int  # epochs to run: --num_train_epochs, or as many as --max_steps needs
    class_weights: dict | None = None  # {label: weight} the loss uses (--class_weights), None: unweighted


def build_training(task: Task, config: TrainConfig, data: Data, accelerator: Accelerator, log) -> Training:
    model = task.build_model(resolve_model_path(config.model_name_or_path), data.labels, data.tokenizer,
                             config.trust_remote_code)
    class_weights = set_training_loss(model, task, config, data, log)
    if config.bulk_dropout and accelerator.device.type == "cpu" and not config.torch_compile:
        switched = use_bulk_dropout(model)
        log(f"dropout masks drawn in bulk: {', '.join(switched) or 'no dropout layers found'}")
    if config.init_from:
        transfer_encoder(model, config.init_from, log)
    set_frozen(model, config.freeze_encoder, config.freeze_layers)
    if config.lora_r:  # after --init_from: the adapters start from its weights
        apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                   resolve_model_path(config.model_name_or_path), config.trust_remote_code, log)
    groups = parameter_groups(model, config.learning_rate, config.head_learning_rate, config.layer_lr_decay,
                              config.weight_decay)
    log(format_groups(groups))
    optimizer = build_optimizer(groups, config.weight_decay)

    pad_values = task.pad_values(data.tokenizer)
    pad_multiple = 8 if accelerator.device.type == "cuda" else None
    if not config.packing:
        packing = "off (--packing false)"
    elif not task.packable:
        packing = f"off (the {task.name} task's inputs cannot share a row)"
    elif not packing_is_exact(model, data.features["train"], pad_values):
        packing = "off (packed rows did not reproduce padded ones for this architecture; padding instead)"
    else:
        packing = "on"
    collator = Collator(pad_values, pack=packing == "on", pad_to_multiple_of=pad_multiple)
    described = "packed: random batches, several examples per row" if packing == "on" else f"padded; packing {packing}"
    log(f"batches: {described}; training precision: {precision_name(accelerator)}")
    # Packed batches are random batches; padded ones are length-grouped unless --mega_batch_factor 1.
    train_loader = _train_loader(data.features["train"], collator, config,
                                 1 if packing == "on" else config.mega_batch_factor)
    # Evaluation packs too when packing is exact: sorted padded batches of 128 still carry much padding (their
    # longest member sets the width), and packed ones ran 1.7x faster on CoNLL-2003 test (measured, README).
    eval_collator = Collator(pad_values, pack=packing == "on", pad_to_multiple_of=pad_multiple)
    eval_loaders = {split: eval_loader(features, eval_collator, config.per_device_eval_batch_size)
                    for split, features in data.features.items() if split != "train"}
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    # --max_steps (as in the HF scripts) replaces the epoch count: the schedule ends at that step, and the last
    # epoch is cut short there.
    total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
    epochs = math.ceil(config.max_steps / steps_per_epoch) if config.max_steps else config.num_train_epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    sampler = train_loader.batch_sampler
    model_, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    # Autocast only the training step (train_step): Accelerate wraps forward in autocast, which would also put
    # evaluation in bf16; stripping it keeps evaluation in fp32, so reported scores are what predict and
    # transformers.pipeline reproduce from the saved folder.
    network = accelerator.unwrap_model(model_, keep_fp32_wrapper=False)
    adversary = build_adversary(config.adversarial, network.get_input_embeddings().weight, config.adv_epsilon,
                                config.adv_steps, config.adv_alpha,
                                params=[param for param in network.parameters() if param.requires_grad])
    return Training(accelerator, model_, network, optimizer, scheduler, train_loader, eval_loaders, collator,
                    sampler, adversary, packing, epochs, class_weights)


def set_training_loss(model: torch.nn.Module, task: Task, config: TrainConfig, data: Data, log) -> dict | None:
    """Resolve --class_weights over the training labels (as `task.labels_of` gives them: NER counts word tags),
    print them, and hand them with --loss/--focal_gamma to the head (`Head.set_loss`). Returns {label: weight}
    (None without class weights) for config.json."""
    if config.class_weights == "none" and config.loss == "cross_entropy":
        return None  # the default: no pass over the training examples (a million of them on a large corpus)
    counts = label_counts(task.labels_of(example) for example in data.splits.train)
    if hasattr(data.splits.train, "release"):
        data.splits.train.release()  # the pass mapped the whole training table in: unmap it before training
    weights = resolve_class_weights(config.class_weights, data.labels, counts, log)
    if weights is not None:
        log(f"class weights ({config.class_weights}): label, training count, weight\n"
            + format_weights(weights, counts))
    if config.loss != "cross_entropy":
        log(f"loss: {config.loss} (gamma {config.focal_gamma})")
    if weights is not None or config.loss != "cross_entropy":
        if not hasattr(model, "set_loss"):
            raise UsageError(f"--class_weights/--loss: the {task.name} task's head ({type(model).__name__}) is not a "
                             "bert_ft.heads.Head and cannot take loss settings; use the defaults")
        model.set_loss(None if weights is None else [weights[label] for label in data.labels], config.loss,
                       config.focal_gamma)
    return weights


# ------------------------------------------------------------------------------------------------ the loop

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
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


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
    kept = _checkpoints(config.output_dir)
    model_dir = os.path.join(config.output_dir, "model")
    raise TrainingDiverged(
        f"the training loss became NaN/inf at optimiser step {step} (epoch {epoch + 1}); training stopped. "
        f"Last good checkpoint: {kept[-1] if kept else 'none saved yet'}"
        f"{'; best model: ' + model_dir if os.path.isdir(model_dir) else ''}.\n"
        "  fix: lower --learning_rate, use --mixed_precision bf16 instead of fp16, or check the data")


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
        loss = train_step(accelerator, model, batch, training.optimizer, training.scheduler, training.adversary,
                          config.max_grad_norm)
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
            save_checkpoint(accelerator, config, state)
            start = time.perf_counter()
        if config.max_steps and state.global_step >= config.max_steps:
            break
    progress.close()
    if (step := monitor.diverged_at()) is not None:
        stop_diverged(step, epoch, config)
    state.train_seconds += time.perf_counter() - start
    # Padding statistics over the batches this epoch trained on (all of them unless --max_steps cut it short).
    trained = epoch_batches[:state.batches_in_epoch * accelerator.num_processes]
    real, slots = padding_stats(lengths, trained, training.collator)
    state.trained_samples += sum(len(batch) for batch in trained)
    state.real_tokens += real
    state.padded_tokens += slots
    monitor.fold()


def score_splits(task: Task, data: Data, training: Training, objective: str = "confidence"
                 ) -> tuple[dict | None, dict]:
    """Score validation and test with the best model, fitting a temperature on validation in between.

    The encoder runs once per split (`score_batches`); the temperature is fitted on the stored validation scores
    (`calibrate` with `objective`; the confidence fit decodes them again at every temperature it tries), then each
    split's scores are decoded at the fitted temperature and at 1 (for the uncalibrated ECE). Returns (the fit, or
    None without validation labels; {split: (evaluation, evaluation with raw confidences, seconds)}). A head
    without the scores/decode_scores seam is evaluated as during training and not calibrated."""
    present = [split for split in ("validation", "test") if split in data.features]
    scored, seconds = {}, {}
    if has_score_seam(training.network):
        for split in present:
            start = time.perf_counter()
            scored[split] = score_batches(training.model, training.eval_loaders[split], training.accelerator)
            seconds[split] = time.perf_counter() - start
    calibration = None
    if "validation" in scored:
        calibration = calibrate(training.network, scored["validation"],
                                validation_confidences(training, task, data, scored["validation"]),
                                training.accelerator, objective)
    training.network.temperature = calibration["temperature"] if calibration else 1.0
    evaluations = {}
    for split in present:
        if split in scored:
            evaluation, raw, decode_seconds = evaluate_scored(training, task, data, split, scored.pop(split))
            evaluations[split] = (evaluation, raw, seconds[split] + decode_seconds)
        else:
            evaluation, split_seconds = evaluate_split(training, task, data, split)
            evaluations[split] = (evaluation, evaluation, split_seconds)
    return calibration, evaluations


def validation_confidences(training: Training, task: Task, data: Data, scored: list):
    """T -> the validation set's (confidence, correct) pairs with confidences at T: the stored scores decoded at T
    (gathered, so every process gets all pairs) and judged by the task."""
    features, examples = data.features["validation"], data.splits.validation

    def confidences_at(temperature: float) -> list[tuple[float, bool]] | None:
        outputs = decode_batches(training.network, scored, len(features), training.accelerator, temperature)
        return task.confidences(examples, features, outputs, data.labels)

    return confidences_at


def calibration_results(calibration: dict | None, evaluations: dict) -> tuple[dict, str | None]:
    """(metrics: {prefix}_ece before, {prefix}_ece_calibrated after, the temperature, predictions it changed (0);
    the report.txt section), from the evaluations of `score_splits`; nothing for a task without confidences."""
    metrics, rows, note, changed = {}, [], "", 0
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in evaluations:
            continue
        evaluation, raw, _ = evaluations[split]
        changed += sum(mine != theirs for mine, theirs in zip(evaluation.predictions, raw.predictions))
        if raw.confidences is None:
            continue
        before = metrics[f"{prefix}_ece"] = expected_calibration_error(raw.confidences)
        after = None
        if calibration:
            after = metrics[f"{prefix}_ece_calibrated"] = expected_calibration_error(evaluation.confidences)
        rows.append((f"{split} ({len(raw.confidences)} predictions)", before, after))
        note = evaluation.confidence_note
    if calibration:
        metrics.update(calibration_temperature=calibration["temperature"],
                       calibration_objective=calibration["objective"], calibration_changed_predictions=changed)
    return metrics, calibration_section(calibration, rows, note, changed) if rows else None


def evaluate_scored(training: Training, task: Task, data: Data, split: str, scored: list
                    ) -> tuple[Evaluation, Evaluation, float]:
    """(evaluation at the head's temperature, evaluation with raw confidences (the same object at temperature 1),
    seconds spent decoding) from `score_batches`' result for `split`."""
    features, examples, source = data.features[split], getattr(data.splits, split), data.splits.sources[split]

    def decoded(temperature: float | None) -> list[dict]:
        return decode_batches(training.network, scored, len(features), training.accelerator, temperature)

    start = time.perf_counter()
    outputs = decoded(None)
    seconds = time.perf_counter() - start
    evaluation = task.evaluate(examples, features, outputs, data.labels, source)
    raw = evaluation if training.network.temperature == 1.0 else \
        task.evaluate(examples, features, decoded(1.0), data.labels, source)
    return evaluation, raw, seconds


def evaluate_split(training: Training, task: Task, data: Data, split: str) -> tuple[Evaluation, float]:
    start = time.perf_counter()
    features = data.features[split]
    outputs = infer(training.model, training.eval_loaders[split], len(features), training.accelerator)
    seconds = time.perf_counter() - start
    return task.evaluate(getattr(data.splits, split), features, outputs, data.labels,
                         data.splits.sources[split]), seconds


def end_of_epoch(epoch: int, training: Training, task: Task, data: Data, state: TrainerState,
                 config: TrainConfig, save_best) -> bool:
    """Validate, keep the best model, checkpoint; returns True when early stopping ends training."""
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


def run(task: Task, config: TrainConfig, task_module: str | None = None, on_epoch=None) -> dict:
    """Train, pick the best epoch on validation, score test, write the run folder; returns metrics.json.
    `on_epoch(record)` (the hyperparameter search's pruning hook) sees each epoch's history record after
    validation; returning True ends training there, as early stopping does."""
    check_output_dir_path(config.output_dir)
    accelerator = make_accelerator(config)
    log = accelerator.print
    if accelerator.num_processes > 1 and config.unfreeze_at_epoch:
        raise UsageError("--unfreeze_at_epoch: not supported with several processes (DDP fixes the trainable "
                         "parameters at start); run it in one process or drop the flag")
    check_output_dir(config)
    set_seed(config.seed)

    data = prepare_data(task, config, log, accelerator)  # bad input fails here, before anything is written
    if accelerator.device.type == "cpu":
        reuse_freed_memory()  # after the data stage: training's large blocks are reused instead of re-faulted
    training = build_training(task, config, data, accelerator, log)
    start_trackers(accelerator, config, {"task": task.name, **to_dict(config), **to_dict(task.options)})
    state = TrainerState()
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(config)
        accelerator.load_state(checkpoint)
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            state = TrainerState(**json.load(handle))
        log(f"resumed from {checkpoint}: step {state.global_step}, epoch {state.epoch + 1}, "
            f"batch {state.batches_in_epoch}")
    precision = precision_name(accelerator)
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        atomic_write_json(os.path.join(config.output_dir, "config.json"),
                          {"task": task.name, **to_dict(config), **to_dict(task.options),
                           "max_seq_length": data.max_seq_length, "precision": precision,
                           "packing": training.packing, "class_weights_resolved": training.class_weights,
                           "resolved_model_path": resolve_model_path(config.model_name_or_path),
                           "num_processes": accelerator.num_processes, "labels": data.labels,
                           "data_sources": data.splits.sources})

    model_dir = os.path.join(config.output_dir, "model")
    meta = {"max_seq_length": data.max_seq_length, "task_options": to_dict(task.options),
            "task_module": task_module or type(task).__module__}

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


def final_scoring(task: Task, config: TrainConfig, data: Data, training: Training, state: TrainerState,
                  model_dir: str) -> dict:
    """Reload the best (saved) model, fit a temperature and score validation and test (`score_splits`), write
    metrics, report, predictions and plots."""
    accelerator = training.accelerator
    # Training is over (the checkpoints hold the optimiser): free AdamW's two moment buffers, as large as the model,
    # before a second copy of the weights is loaded, so the end of the run stays under the training peak.
    training.optimizer.state.clear()
    adapter_dir = os.path.join(config.output_dir, ADAPTER_DIR)
    best = load_adapter(adapter_dir, task.head_type, read_meta(adapter_dir)) if config.lora_r else \
        task.head_type.load(model_dir, read_meta(model_dir))
    training.network.load_state_dict(best.state_dict())
    del best
    metrics = _final_metrics(state, data, accelerator, training)
    report_sections = [f"bert-ft {task.name} run: {config.output_dir}",
                       f"best epoch: {state.best_epoch} (by validation {task.metric})" if "validation" in data.features
                       else "no validation set: the last epoch is kept"]
    calibration, evaluations = score_splits(task, data, training, config.calibration_objective)
    test_evaluation = None
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in evaluations:
            continue
        evaluation, _, seconds = evaluations[split]
        metrics.update({f"{prefix}_{key}": value for key, value in evaluation.metrics.items()})
        metrics[f"{prefix}_runtime"] = round(seconds, 3)
        metrics[f"{prefix}_samples"] = len(getattr(data.splits, split))
        metrics[f"{prefix}_samples_per_second"] = round(len(getattr(data.splits, split)) / max(seconds, 1e-9), 2)
        report_sections.append(f"== {split}: {data.splits.sources[split]} ==\n{evaluation.report}")
        if split == "test":
            test_evaluation = evaluation
    calibration_metrics, section = calibration_results(calibration, evaluations)
    metrics.update(calibration_metrics)
    if section:
        report_sections.append(section)
    if calibration and accelerator.is_main_process:
        for folder in model_folders(config.output_dir):
            write_temperature(folder, calibration["temperature"],
                              {**calibration, "fitted_on": data.splits.sources["validation"],
                               **{key: metrics[key] for key in ("eval_ece", "eval_ece_calibrated") if key in metrics}})
    report_sections.append(_speed_section(metrics))
    if accelerator.is_main_process:
        if test_evaluation is not None:
            task.write_predictions(os.path.join(config.output_dir, task.predictions_file), data.splits.test,
                                   test_evaluation.predictions)
        atomic_write_text(os.path.join(config.output_dir, "report.txt"), "\n\n".join(report_sections) + "\n")
        atomic_write_json(os.path.join(config.output_dir, "metrics.json"), metrics)
        write_model_cards(config.output_dir)
        write_plots(config.output_dir, state.history, task.metric,
                    test_evaluation.confusion if test_evaluation else None)
        accelerator.print("\n\n".join(report_sections[2:]))
        accelerator.print(f"run folder: {config.output_dir}")
    return metrics


def _final_metrics(state: TrainerState, data: Data, accelerator: Accelerator, training: Training) -> dict:
    seconds = max(state.train_seconds, 1e-9)
    epochs_done = len(state.history)
    return {
        "train_runtime": round(state.train_seconds, 3),
        "train_samples": len(data.splits.train),
        "data_runtime": data.seconds,
        "epochs_trained": epochs_done,
        "best_epoch": state.best_epoch,
        "train_samples_per_second": round(state.trained_samples / seconds, 3),
        "train_tokens_per_second": round(state.real_tokens / seconds, 1),
        "padding_ratio": round(1 - state.real_tokens / max(state.padded_tokens, 1), 4),
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        # the largest encoding worker (--preprocessing_num_workers); 0 when encoding ran in this process
        "worker_peak_memory_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "num_processes": accelerator.num_processes,
        "precision": precision_name(accelerator),
        "packing": training.packing,
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
        "trainable_parameters": trainable_parameters(training.network),
    }


def _speed_section(metrics: dict) -> str:
    keys = ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "padding_ratio",
            "peak_memory_mb", "precision", "packing", "eval_samples_per_second", "test_samples_per_second",
            "num_processes")
    return "== speed ==\n" + "\n".join(f"{key:<26} {metrics[key]}" for key in keys if key in metrics)
