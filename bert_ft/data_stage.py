"""The data stage: read the splits (files through the Arrow cache, a Hub dataset, or the task's shipped sample),
build and check the labels, load the tokenizer, encode. Everything that can fail on the user's data happens here,
before a model is built; `--check_data` runs exactly this, and the export's parity check reads a run's data with
`load_splits`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .checks import check_label_variety, clamp_max_seq_length
from .config import TrainConfig
from .dataset import DataCache, take
from .encoder import load_config, load_tokenizer
from .errors import DataError, UsageError
from .io import atomic_write_json
from .task import Features, Task

if TYPE_CHECKING:  # only named in annotations: reading a run's data (the export's parity check) needs no Accelerate
    from accelerate import Accelerator

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
    task.fit_to_data(splits.train)  # what the data decides (the sentence task's problem type)
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
