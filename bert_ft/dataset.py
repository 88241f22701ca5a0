"""The data layer: each split's examples and features as Arrow tables (`datasets`), memory-mapped from a cache.

Reading streams a file through the task's `stream` into an Arrow file of examples (one column per field of the
task's example dataclass); encoding runs the task's own `encode` over it with `Dataset.map` (batched, optionally in
worker processes) into an Arrow file of features: the token-aligned inputs as int32 lists, a `length` and an
`example_index` column, and the task's per-feature bookkeeping as JSON. Training then reads rows from the
memory-mapped features (`ArrowRows`), so memory does not grow with the corpus, and a second run on the same data
skips reading and encoding altogether.

The cache key is explicit, never `datasets`' automatic fingerprint (which hashes a path, so an edited file would
reuse a stale cache, and hashes tokenizers unstably):
  examples  the file's content hash (BLAKE2b), the task (class, options, the source of its module and of the
            core's data code) and ENCODE_VERSION;
  features  the examples' key and which of them were selected (--max_train_samples, --validation_split), the
            tokenizer (its full serialisation), max_seq_length and the label list.
Where: --data_cache_dir, else $BERT_FT_CACHE, else ~/.cache/bert_ft. --overwrite_cache rebuilds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import shutil
import sys
import types
import typing
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import data as core_data
from .data import require_file
from .errors import BertFtError, UsageError
from .io import atomic_write_json
from .task import Features

ENCODE_VERSION = 2  # bump when the meaning of cached examples or features changes without a source change
BATCH = 1000  # examples per `Dataset.map` call and per iteration batch


def default_cache_dir() -> str:
    return os.environ.get("BERT_FT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bert_ft")


def _digest(*parts: Any) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        hasher.update(b"\x00")
    return hasher.hexdigest()


def file_digest(path: str) -> str:
    """BLAKE2b of the file's bytes (about 1 s per GB): an edited file never reuses a stale cache."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _source_digest(obj: Any) -> str:
    try:
        with open(inspect.getsourcefile(obj), "rb") as handle:
            return hashlib.blake2b(handle.read(), digest_size=16).hexdigest()
    except (TypeError, OSError):
        return "unknown"


def task_signature(task: Any) -> str:
    """What makes a task read and encode differently: its class, flags and code (and the core's data code)."""
    options = dataclasses.asdict(task.options) if dataclasses.is_dataclass(task.options) else repr(task.options)
    return _digest(ENCODE_VERSION, type(task).__module__, type(task).__qualname__, options,
                   _source_digest(type(task)), _source_digest(core_data), _source_digest(sys.modules[__name__]))


def tokenizer_signature(tokenizer: Any) -> str:
    """The tokenizer's full serialisation (vocabulary, normaliser, added tokens) for a fast tokenizer; its class,
    vocabulary and special tokens otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation/padding settings: runtime state that each call of the tokenizer may change.
        body = {key: value for key, value in json.loads(backend.to_str()).items()
                if key not in ("truncation", "padding")}
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _digest(type(tokenizer).__name__, body, tokenizer.model_input_names, tokenizer.all_special_tokens,
                   getattr(tokenizer, "padding_side", None))


# ----------------------------------------------------------------------------------------- example records

def _arrow_type(hint: Any):
    """datasets feature type of a field's type hint, or None when it is stored as JSON text (dicts, Any)."""
    import datasets

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _arrow_type(inner[0]) if len(inner) == 1 else None
    scalar = {str: "string", int: "int64", float: "float64", bool: "bool"}
    if hint in scalar:
        return datasets.Value(scalar[hint])
    if origin in (list, tuple, Sequence):
        args = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        if args and all(arg == args[0] for arg in args):
            inner = _arrow_type(args[0])
            return datasets.List(inner) if inner is not None else None
    return None


SOURCE_FIELD = "path"  # an example field naming its file: not stored per row, restored from the file read


class ExampleSchema:
    """How a task's example dataclass maps to Arrow columns and back (fields of other types are JSON text). A `path`
    field equal to the file being read is stored as null and restored on access (the path of this run's file, so a
    moved file's messages name where it is now): 40-odd bytes a row saved."""

    def __init__(self, example_type: type, source: str = "") -> None:
        self.source = source
        import datasets

        self.example_type = example_type
        hints = typing.get_type_hints(example_type)
        self.fields = [item.name for item in dataclasses.fields(example_type)]
        columns, self.json_fields = {}, set()
        for name in self.fields:
            arrow = _arrow_type(hints[name])
            if arrow is None:
                arrow = datasets.Value("string")
                self.json_fields.add(name)
            columns[name] = arrow
        self.features = datasets.Features(columns)

    @staticmethod
    def supports(example: Any) -> bool:
        return dataclasses.is_dataclass(example) and not isinstance(example, type)

    def record(self, example: Any) -> dict:
        row = {name: (json.dumps(getattr(example, name)) if name in self.json_fields else getattr(example, name))
               for name in self.fields}
        if row.get(SOURCE_FIELD) == self.source and SOURCE_FIELD not in self.json_fields:
            row[SOURCE_FIELD] = None
        return row

    def examples(self, columns: dict[str, list]) -> list:
        """Examples from a batch of columns."""
        names = list(columns)
        rows = zip(*(columns[name] for name in names))
        built = []
        for values in rows:
            row = dict(zip(names, values))
            for name in self.json_fields:
                row[name] = json.loads(row[name]) if row[name] is not None else None
            if SOURCE_FIELD in row and row[SOURCE_FIELD] is None and SOURCE_FIELD not in self.json_fields:
                row[SOURCE_FIELD] = self.source
            built.append(self.example_type(**row))
        return built


class ExampleTable(Sequence):
    """A split's examples on disk: a read-only sequence that builds example objects on access (`__iter__` in
    batches), so a million training sentences cost no Python objects until they are used. The Arrow file is
    memory-mapped on first use; `release` unmaps it (see there)."""

    def __init__(self, path: str, schema: ExampleSchema, key: str, positions: np.ndarray | None = None) -> None:
        self.path, self.schema, self.key, self.positions = path, schema, key, positions
        self._dataset = None
        self._length = len(self.dataset)

    @property
    def dataset(self) -> Any:
        """The `datasets.Dataset` over the file (only the rows at `positions` for a sub-table)."""
        if self._dataset is None:
            import datasets

            dataset = datasets.Dataset.from_file(self.path)
            self._dataset = dataset if self.positions is None else dataset.select(self.positions)
        return self._dataset

    def release(self) -> None:
        """Unmap the file. A full pass (the label checks, encoding) leaves every page of it resident and counted in
        this process's RSS (file-backed, about 0.25 KB per CoNLL sentence) for as long as it stays mapped; once the
        split is encoded nothing needs it, and a later access maps it again."""
        self._dataset = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.schema.examples(self.dataset[index: index + 1])[0]

    def __iter__(self) -> Iterator[Any]:
        for columns in self.dataset.iter(batch_size=BATCH):
            yield from self.schema.examples(columns)

    def select(self, indices: Sequence[int]) -> "ExampleTable":
        """A sub-table (no copy: an index map); its key says exactly which rows it holds."""
        positions = np.asarray(indices, dtype=np.int64)
        rows = positions if self.positions is None else self.positions[positions]
        return ExampleTable(self.path, self.schema, _digest(self.key, positions.tobytes()), rows)


def take(examples: Sequence, indices: Sequence[int]) -> Sequence:
    """The examples at `indices` (a sub-table for an ExampleTable, a list otherwise)."""
    if isinstance(examples, ExampleTable):
        return examples.select(indices)
    return [examples[index] for index in indices]


# ------------------------------------------------------------------------------------------------ features

class ArrowRows(Sequence):
    """Feature rows of a features table as {key: list} dicts (what the collator takes), read on demand."""

    def __init__(self, dataset: Any, keys: list[str]) -> None:
        self.dataset, self.keys = dataset.select_columns(keys), keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[int(index)]

    def rows(self, indices: Sequence[int]) -> list[dict]:
        """Several rows in one Arrow read (what a DataLoader batch asks for)."""
        columns = self.dataset[[int(index) for index in indices]]
        return [dict(zip(self.keys, values)) for values in zip(*(columns[key] for key in self.keys))]


class JsonColumn(Sequence):
    """A column of JSON text decoded on access (the task's per-feature `meta`); lists come back as tuples."""

    def __init__(self, column: Any) -> None:
        self.column = column  # a pyarrow ChunkedArray of strings

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index: int):
        return _tuples(json.loads(self.column[int(index)].as_py()))

    def __iter__(self):
        for chunk in self.column.chunks:
            for text in chunk.to_pylist():
                yield _tuples(json.loads(text))


def _tuples(value):
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def _feature_types(sample: Features, narrow: dict[str, str]):
    """datasets feature types of a task's encoded inputs: int lists as int32 (nested for several sequences per
    example) or the narrower type the task declares (`Task.column_types`, e.g. int8 for 0/1 flags), ints as int64,
    floats as float32; plus the core's columns."""
    import datasets

    def kind(value):
        if isinstance(value, bool):
            return datasets.Value("bool")
        if isinstance(value, (int, np.integer)):
            return datasets.Value("int64")
        if isinstance(value, (float, np.floating)):
            return datasets.Value("float32")
        if isinstance(value, (list, tuple)):
            if value and isinstance(value[0], (list, tuple)):
                inner = kind(value[0][0]) if value[0] else datasets.Value("int32")
                return datasets.List(datasets.List(_narrow(inner)))
            return datasets.List(_narrow(kind(value[0]))) if value else datasets.List(datasets.Value("int32"))
        raise UsageError(f"a task feature value of type {type(value).__name__} cannot be stored in the data cache")

    columns = {key: kind(value) for key, value in sample.inputs[0].items()}
    for key, value_type in narrow.items():
        if key in columns and isinstance(columns[key], datasets.List):
            inner = columns[key].feature
            columns[key] = datasets.List(datasets.List(datasets.Value(value_type))
                                         if isinstance(inner, datasets.List) else datasets.Value(value_type))
    columns.update(example_index=datasets.Value("int64"), length=datasets.Value("int32"),
                   meta=datasets.Value("string"))
    return datasets.Features(columns)


def _narrow(value_type):
    import datasets

    return datasets.Value("int32") if value_type == datasets.Value("int64") else value_type


def arrow_features(dataset: Any) -> Features:
    """A `Features` record backed by a features table."""
    keys = [name for name in dataset.column_names if name not in ("example_index", "length", "meta")]
    table = dataset.data
    return Features(ArrowRows(dataset, keys), table.column("example_index").to_numpy(),
                    table.column("length").to_numpy(), JsonColumn(table.column("meta")))


# ------------------------------------------------------------------------------------------------- errors

def unwrap(error: BaseException) -> BaseException:
    """The bert-ft error inside whatever `datasets` wrapped it in (generation and map errors), else `error`."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        if isinstance(current, BertFtError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (the reader's warnings, replayed on a cache hit)."""

    def __init__(self, target) -> None:
        self.target, self.copy = target, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()


# -------------------------------------------------------------------------------------------------- cache

class DataCache:
    """Reads and encodes splits through the Arrow cache (see the module docstring).

    `first` is a context manager under which the main process builds a missing entry before the others read it
    (Accelerate's `main_process_first`); `overwrite` rebuilds every entry this run touches (give it to the main
    process only)."""

    def __init__(self, root: str | None = None, overwrite: bool = False, num_workers: int | None = None,
                 first: Callable[[], Any] = contextlib.nullcontext, log=print) -> None:
        self.root = os.path.abspath(root or default_cache_dir())
        self.overwrite, self.num_workers, self.first, self.log = overwrite, num_workers, first, log
        self.rebuilt: set[str] = set()
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--data_cache_dir {self.root}: cannot create it ({error.strerror}); choose a writable "
                             "folder (or set BERT_FT_CACHE)") from None

    def _fresh(self, key: str) -> bool:
        """Whether this run must (re)build `key`: --overwrite_cache rebuilds each entry once per run."""
        if self.overwrite and key not in self.rebuilt:
            self.rebuilt.add(key)
            return True
        return False

    # ---------------------------------------------------------------------------------------------- reading
    def examples(self, task: Any, path: str) -> Sequence:
        """The file's examples as an ExampleTable (a list for a task whose examples are not dataclasses)."""
        from datasets.arrow_writer import ArrowWriter

        require_file(path)
        key = _digest("examples", task_signature(task), file_digest(path))
        folder = os.path.join(self.root, "examples", key)
        done = os.path.join(folder, "done.json")
        with self.first():
            if self._fresh(key) and os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
            if os.path.isfile(done):
                with open(done, encoding="utf-8") as handle:
                    info = json.load(handle)
                for line in info.get("notes", []):
                    self.log(line)
                if info["kind"] == "list":  # not a dataclass: nothing stored, read again
                    return list(task.stream(path))
                schema = ExampleSchema(_import_type(info["kind"]), path)
                return ExampleTable(os.path.join(folder, "examples.arrow"), schema, key)
            os.makedirs(folder, exist_ok=True)
            temp = os.path.join(folder, f".examples-{os.getpid()}.arrow")
            tee = _Tee(sys.stdout)
            schema = writer = None
            kept: list | None = None
            try:
                with contextlib.redirect_stdout(tee):
                    for example in task.stream(path):
                        if kept is None and schema is None:
                            if ExampleSchema.supports(example):
                                schema = ExampleSchema(type(example), path)
                                writer = ArrowWriter(features=schema.features, path=temp)
                            else:
                                kept = []
                        if kept is not None:
                            kept.append(example)
                        else:
                            writer.write(schema.record(example))
                if writer is not None:
                    writer.finalize()
                    writer.close()
            except BaseException as error:
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raised = unwrap(error)
                if raised is not error:
                    raise raised from None
                raise
            notes = [line for line in tee.copy.getvalue().splitlines() if line.strip()]
            if kept is not None:
                atomic_write_json(done, {"kind": "list", "notes": notes})
                return kept
            final = os.path.join(folder, "examples.arrow")
            os.replace(temp, final)
            atomic_write_json(done, {"kind": f"{schema.example_type.__module__}:{schema.example_type.__qualname__}",
                                     "source": os.path.abspath(path), "notes": notes})
            return ExampleTable(final, schema, key)

    # --------------------------------------------------------------------------------------------- encoding
    def features(self, task: Any, examples: Sequence, tokenizer: Any, max_seq_length: int,
                 labels: list[str]) -> Features:
        """The encoded split: `task.encode` through `Dataset.map` for an ExampleTable (cached), in memory else."""
        if not isinstance(examples, ExampleTable):
            return task.encode(list(examples), tokenizer, max_seq_length, labels)
        key = _digest("features", examples.key, task_signature(task), tokenizer_signature(tokenizer),
                      max_seq_length, labels)
        folder = os.path.join(self.root, "features", key)
        final = os.path.join(folder, "features.arrow")
        with self.first():
            fresh = self._fresh(key)
            if fresh and os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder, exist_ok=True)
            sample = task.encode(examples[0:1], tokenizer, max_seq_length, labels)
            schema = _feature_types(sample, {"token_type_ids": "int8", **getattr(task, "column_types", {})})
            encode = _Encoder(task, examples.schema, tokenizer, max_seq_length, labels, list(sample.inputs[0]))
            workers = self.num_workers if self.num_workers and self.num_workers > 1 else None
            try:
                mapped = examples.dataset.map(
                    encode, batched=True, batch_size=BATCH, with_indices=True,
                    remove_columns=examples.dataset.column_names, features=schema, num_proc=workers,
                    cache_file_name=final, load_from_cache_file=not fresh, new_fingerprint=key,
                    desc="encoding")
            except Exception as error:
                raised = unwrap(error)
                if raised is not error:
                    raise raised from None
                raise
        examples.release()  # encoded: its pages need not stay resident through training (see `release`)
        return arrow_features(mapped)


class _Encoder:
    """The `Dataset.map` function: a batch of example columns -> the task's features as columns (picklable, for
    worker processes). `example_index` is the example's row in the table being encoded."""

    def __init__(self, task, schema, tokenizer, max_seq_length, labels, keys) -> None:
        self.task, self.schema, self.tokenizer = task, schema, tokenizer
        self.max_seq_length, self.labels, self.keys = max_seq_length, labels, keys

    def __call__(self, columns: dict, indices: list[int]) -> dict:
        examples = self.schema.examples(columns)
        features = self.task.encode(examples, self.tokenizer, self.max_seq_length, self.labels)
        out = {key: [feature[key] for feature in features.inputs] for key in self.keys}
        out["example_index"] = [indices[int(position)] for position in features.example_index]
        out["length"] = [int(length) for length in features.lengths]
        out["meta"] = [json.dumps(meta) for meta in features.meta]
        return out


def _import_type(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
