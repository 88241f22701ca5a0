"""Set-up of a training run: the Accelerator and precision, the model with its CPU speed-ups, loss, freezing and
layer-wise learning-rate groups, the optimiser and schedule, and the loaders (packed when packing is exact for the
architecture, else padded), all prepared by Accelerate into one `Training` record that the loop reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from .adversarial import build_adversary
from .block_attention import use_block_attention
from .compiling import CompiledLayers, compile_encoder_layers
from .config import TrainConfig
from .cpu import apply_cpu_speedups
from .data import Collator, FeatureDataset, LengthGroupedSampler
from .data_stage import Data
from .encoder import resolve_model_path, transfer_encoder
from .errors import UsageError
from .flops import EncoderFlops, first_token_top_layer, known_flops
from .heads import reads_first_token_only
from .inference import eval_loader, packing_is_exact  # the check lives beside inference (predict packs too)
from .lora import apply_lora
from .losses import format_weights, label_counts, resolve_class_weights
from .optim import build_optimizer, format_groups, parameter_groups, set_frozen, summarize_groups
from .sparse_embedding import sparse_updates_off_reason
from .task import Features, Task
from .trackers import accelerator_kwargs


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
    # --torch_compile compiles the encoder layers itself (bert_ft.compiling), not the whole model through
    # Accelerate's dynamo plugin: the heads' data-dependent gathers would break and recompile that graph.
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
    lr_table: str = ""  # the learning-rate groups (format_groups), for report.txt
    decision: dict | None = None  # what the head tuned on validation (multi-label thresholds), for bert_ft.json
    compiled: CompiledLayers | None = None  # --torch_compile's compiled encoder layers (None: eager)
    compile_note: str = ""  # --torch_compile: "on", or why it is off ("" without the flag)
    flop_model: EncoderFlops | None = None  # the model FLOPs a trained example costs (None: no BERT size fields)


def build_training(task: Task, config: TrainConfig, data: Data, accelerator: Accelerator, log) -> Training:
    model = task.build_model(resolve_model_path(config.model_name_or_path), data.labels, data.tokenizer,
                             config.trust_remote_code)
    class_weights = set_training_loss(model, task, config, data, log)
    apply_cpu_speedups(model, config, accelerator.device, log)  # the one place: allocator, bulk dropout (bert_ft.cpu)
    if config.init_from:
        transfer_encoder(model, config.init_from, log)
    set_frozen(model, config.freeze_encoder, config.freeze_layers)
    if config.lora_r:  # after --init_from: the adapters start from its weights
        apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                   resolve_model_path(config.model_name_or_path), config.trust_remote_code, log)
    groups = parameter_groups(model, config.learning_rate, config.head_learning_rate, config.layer_lr_decay,
                              config.weight_decay)
    log(format_groups(groups) if config.verbose else summarize_groups(groups))
    sparse_off = sparse_updates_off_reason(config, model, accelerator.num_processes)
    if sparse_off and config.sparse_embedding_updates:  # asked for (the default) but not possible here: say why
        log(f"sparse embedding updates: off ({sparse_off})")
    optimizer = build_optimizer(groups, config.weight_decay, None if sparse_off else model.get_input_embeddings())

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
    if config.block_attention != "off":  # per-example attention on packed rows (bert_ft.block_attention)
        if packing != "on":
            switched = "off (padded batches hold one example per row)"
        elif config.torch_compile:
            switched = "off (--torch_compile: the layout is planned in Python every step)"
        else:
            switched = use_block_attention(model.model, config.block_attention)
        log(f"block attention: {switched}")
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
    compiled, compile_note = None, ""
    if config.torch_compile:  # after prepare: the layers of the network the prepared model calls
        compiled, compile_note = compile_encoder_layers(network, accelerator.num_processes, log, accelerator.device)
    return Training(accelerator, model_, network, optimizer, scheduler, train_loader, eval_loaders, collator,
                    sampler, adversary, packing, epochs, class_weights, format_groups(groups),
                    compiled=compiled, compile_note=compile_note, flop_model=flop_model_of(network))


def flop_model_of(network: torch.nn.Module) -> EncoderFlops | None:
    """The FLOP model of a task model's encoder (bert_ft.flops), with a sentence head's [CLS]-only top layer
    counted as what it computes; None for an architecture without BERT's size fields."""
    flop_model = known_flops(network.config)
    model = network.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA: peft's wrapper
    if flop_model is not None and reads_first_token_only(model):
        flop_model = first_token_top_layer(flop_model, network.config)
    return flop_model


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
