"""The task boundary: the base classes a task plugin subclasses, and the feature/evaluation records it exchanges.

The core (reading, encoding, the training loop, evaluation, predict, saving) calls only the methods declared on
`Task`; it never looks at a task's name, its example type or the keys of its features beyond what a task declares
in `pad_values`. A task lives in its own module (the shipped ones in `tasks/`, others anywhere: see
`bert_ft.plugins`), owns its head class (`head_type`, a `bert_ft.heads.Head`) and is listed in one registry dict.

What a new task writes (the first part of `Task`): `read` or `stream` (file -> examples), `labels_of`,
`build_labels`, `encode` (examples -> Features), `evaluate` (outputs -> Evaluation), `write_predictions`,
`input_examples` + `results` (raw predict inputs -> JSON-ready dicts), and a Head subclass. A label-set task (one
label per example) subclasses `ClassificationTask`, which already has `labels_of`, `build_labels`, `evaluate` (it
writes `score_labels` instead), the per-example merge and `write_predictions`. Everything else has a working
default; Hub datasets, the data report and calibration are optional groups (`HubDatasets`, `DataReport`,
`Calibration`). `bert_ft.testing.check_task` checks a task end to end.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

from .annotation import ToolRecord
from .errors import UsageError
from .io import atomic_write_lines
from .metrics import confusion_matrix

INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class Features:
    """The encoded form of one split: feature i is `inputs[i]`, belongs to example `example_index[i]`.

    `inputs` holds only what the core collates into a batch: the task's token-aligned keys (those named in
    `Task.pad_values`, lists of ints, or lists of lists for a task with several sequences per example such as
    multiple choice) and per-example values (ints or fixed-size lists, stacked). `meta` is the task's own
    bookkeeping (windows, cut kinds): the core carries it and never reads it. `lengths` is the number of tokens each
    feature occupies, which the sampler, the packer and the speed statistics use.
    """

    inputs: Sequence[dict]
    example_index: list[int]
    lengths: list[int]
    meta: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.meta:
            self.meta = [None] * len(self.inputs)
        if not len(self.inputs) == len(self.example_index) == len(self.lengths) == len(self.meta):
            raise ValueError("Features: inputs, example_index, lengths and meta must have one entry per feature")

    def __len__(self) -> int:
        return len(self.inputs)

    def by_example(self, count: int) -> list[list[int]]:
        """Feature indices of each of `count` examples, in feature order."""
        groups: list[list[int]] = [[] for _ in range(count)]
        for feature, example in enumerate(self.example_index):
            groups[example].append(feature)
        return groups


@dataclass
class Evaluation:
    """What a task's `evaluate` returns for one split."""

    metrics: dict[str, float]  # flat, e.g. {"f1": .9, "precision": ...}; the core prefixes "eval_"/"test_"
    report: str  # human-readable tables for report.txt
    predictions: list[Any]  # one per example, in input order (written by `write_predictions`)
    confusion: tuple[list[str], list[list[int]]] | None = None  # (class names, matrix rows=gold) for the plot
    # (confidence, correct) per prediction, for the expected calibration error; None: the task reports none
    confidences: list[tuple[float, bool]] | None = None
    confidence_note: str = ""  # what a confidence and "correct" mean for this task, for the report


@dataclass
class NoOptions:
    """For a task without flags of its own."""


class HubDatasets:
    """Optional group of the Task contract: --dataset_name (a Hugging Face `datasets` dataset). A task that reads
    files only leaves both methods alone."""

    def from_hub(self, dataset: Any, split: str) -> list[Any]:
        """Convert a `datasets` split (from --dataset_name) into examples."""
        raise UsageError(f"--dataset_name: the {self.name} task reads files only; pass --train_file etc.")

    def hub_label_names(self, dataset: Any) -> list[str] | None:
        """The class names a Hub split declares (a ClassLabel), in id order, or None."""
        return None


class DataReport:
    """Optional group of the Task contract: what the --check_data report (bert_ft.check_data) and the duplicate and
    overlap checks read from an example. The defaults use the example's `text`."""

    def example_text(self, example: Any) -> str:
        """The example's input as one string (duplicate and train/test overlap checks)."""
        return str(getattr(example, "text", example))

    def word_count(self, example: Any) -> int:
        return len(self.example_text(example).split())

    def data_notes(self, split: str, examples: list[Any], features: Features, tokenizer: Any) -> list[str]:
        """Task-specific lines for the --check_data report (e.g. tag repairs, words that tokenise to nothing)."""
        return []


class Calibration:
    """Optional group of the Task contract: confidences, for the expected calibration error and the temperature
    fitted at the end of training (bert_ft.calibration)."""

    def confidences(self, examples: list[Any], features: Features, outputs: list[dict], labels: list[str]
                    ) -> list[tuple[float, bool]] | None:
        """(confidence, correct) per prediction: what calibration is judged on (the pairs `evaluate` reports as
        `Evaluation.confidences`) and what the temperature is fitted to, the validation outputs decoded again at
        every temperature tried. The default runs `evaluate` and takes its pairs; a task overrides it with just the
        pairs (faster; `evaluate` must report the same ones). None: the task has no confidences."""
        return self.evaluate(examples, features, outputs, labels, "(calibration)").confidences


class PreAnnotations:
    """Optional group of the Task contract: predict on annotation-tool exports and `predict --output_format
    label-studio|doccano` (bert_ft.annotation)."""

    def tool_inputs(self, inputs: list[Any]) -> list[Any]:
        """Raw predict inputs (`input_examples`' kind) from an export's `ToolRecord`s, for predict's JSON output:
        by default each record's text; other inputs as they are."""
        return [{"text": item.text} if isinstance(item, ToolRecord) else item for item in inputs]

    def pre_annotations(self, inputs: list[Any], predict: Callable[[list[Any]], list[dict]]) -> list[Any]:
        """One `bert_ft.annotation.Prediction` per input text. `inputs` are raw predict inputs or, from an
        annotation-tool export, its `ToolRecord`s; `predict(items)` returns `results` for raw inputs."""
        raise UsageError(f"--output_format: the {getattr(self, 'name', 'this')} task does not write pre-annotations "
                         "for annotation tools; use --output_format json")


class Task(HubDatasets, DataReport, Calibration, PreAnnotations):
    """Base class of every task plugin.

    What a task must write comes first below: the class attributes without a default, and the methods that raise
    NotImplementedError (a concrete subclass that misses one fails at import time, naming it). Then what a task may
    override (working defaults), and three optional groups in their own base classes: Hub datasets
    (`HubDatasets`), the data report (`DataReport`) and calibration (`Calibration`)."""

    name: ClassVar[str]  # the CLI sub-command, e.g. "ner"
    description: ClassVar[str]  # one line for `run_task.py --help`
    options_type: ClassVar[type] = NoOptions  # dataclass of this task's own flags (fields built with config.flag)
    metric: ClassVar[str]  # key of Evaluation.metrics that picks the best checkpoint (higher is better)
    predictions_file: ClassVar[str]  # e.g. "test_predictions.txt"
    head_type: ClassVar[type]  # the bert_ft.heads.Head subclass this task trains, saves and loads
    samples: ClassVar[dict[str, str | None]] = {}  # split -> shipped demo file, used when no data flag is given
    packable: ClassVar[bool] = True  # features are single token sequences that may share a packed row
    # Narrower Arrow types for token-aligned keys whose values are small (the data cache stores int32 otherwise),
    # e.g. {"labels": "int16", "word_starts": "int8"}; a value out of range fails the encoding with an error.
    column_types: ClassVar[dict[str, str]] = {}
    # input_examples(inputs, document=True) is understood: the inputs are consecutive sentences of one document
    # (predict --input_is_document), e.g. for document context
    document_inputs: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.options_type()

    def __init_subclass__(cls, **kwargs) -> None:
        """A checked contract: a concrete task (one that does not set `abstract = True`) must declare every class
        attribute and implement every method the core calls; the error names what is missing at import time."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(cls, name)]
        missing += [f"{name}()" for name in REQUIRED_METHODS if getattr(cls, name) is getattr(Task, name)]
        if cls.read is Task.read and cls.stream is Task.stream:
            missing.append("read() or stream()")
        if missing:
            raise TypeError(f"task class {cls.__module__}.{cls.__name__} must define {', '.join(missing)} "
                            "(see bert_ft.task.Task)")

    # ------------------------------------------------------------------------ must write: data
    def read(self, path: str) -> list[Any]:
        """Parse one data file into examples; raise DataError naming file, line, problem and fix. A task
        implements this or `stream`; the default collects `stream`."""
        return list(self.stream(path))

    def stream(self, path: str) -> Iterator[Any]:
        """The file's examples one at a time (what the data layer writes to its Arrow cache: a task that streams
        keeps memory flat for any corpus size). The default iterates `read`."""
        return iter(self.read(path))

    def fit_to_data(self, train_examples: Any) -> None:
        """Settle, from the training examples, what the data decides before labels are built (e.g. the sentence
        task's problem type: single-label, multi-label or regression). It may set fields of `self.options`, which
        are then saved with the run (config.json) and the model (bert_ft.json), so predict and export rebuild the
        task as trained. Called once per run, before any label check; the default does nothing."""

    def labels_of(self, example: Any) -> Sequence[str]:
        """The gold label strings of one example (used to build and check the label set)."""
        raise NotImplementedError

    def build_labels(self, train_examples: list[Any], declared: list[str] | None = None) -> list[str]:
        """The ordered label list of the model (index = class id); `declared` is a Hub dataset's own order."""
        raise NotImplementedError

    # ---------------------------------------------------------------- must write: model inputs
    def encode(self, examples: list[Any], tokenizer: Any, max_seq_length: int, labels: list[str]) -> Features:
        """Model features for `examples`; several features may share one example (windows)."""
        raise NotImplementedError

    # --------------------------------------------------------------------- must write: scoring
    def evaluate(self, examples: list[Any], features: Features, outputs: list[dict], labels: list[str],
                 source: str) -> Evaluation:
        """Score per-feature model outputs (aligned with `features`) against the examples' gold labels."""
        raise NotImplementedError

    def write_predictions(self, path: str, examples: list[Any], predictions: list[Any]) -> None:
        """Write the predictions file atomically, one entry per example in input order."""
        raise NotImplementedError

    # -------------------------------------------------------- must write: raw inputs (predict)
    def input_examples(self, inputs: list[Any]) -> list[Any]:
        """Examples from raw predict inputs (strings or JSON objects); DataError("input", n, ...) when unusable.
        A task with `document_inputs = True` also takes `document=True` (the inputs form one document)."""
        raise NotImplementedError

    def results(self, examples: list[Any], features: Features, outputs: list[dict], labels: list[str]) -> list[dict]:
        """One JSON-ready dict per input example from the per-feature outputs."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- may override
    def problems(self, config: Any) -> list[str]:
        """Invalid task flags as '--flag: why' lines, judged together with the shared TrainConfig."""
        return []

    def model_meta(self, train_examples: Sequence[Any], labels: list[str]) -> dict:
        """What the model folder's bert_ft.json records about the training data beside the labels (JSON-ready),
        e.g. the entity types and (head type, tail type) pairs a relation model saw. Called once per run, after the
        data stage; the default records nothing."""
        return {}

    def default_files(self) -> dict[str, str | None]:
        """{"train", "validation", "test"} -> path or None: the shipped samples used when no data flag is given."""
        return {split: self.samples.get(split) for split in ("train", "validation", "test")}

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Add task tokens (e.g. entity markers) before the model is built."""

    def head_options(self) -> dict:
        """Keyword options of `head_type.create` taken from this task's flags (e.g. {"use_crf": True})."""
        return {}

    def build_model(self, model_path: str, labels: list[str], tokenizer: Any, trust_remote_code: bool):
        return self.head_type.create(model_path, labels, len(tokenizer), trust_remote_code, **self.head_options())

    def pad_values(self, tokenizer: Any) -> dict[str, int]:
        """Pad value of every token-aligned input key; the core pads (and packs) exactly these keys."""
        values = {"input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}
        if "token_type_ids" in tokenizer.model_input_names:
            values["token_type_ids"] = 0
        return values


class ClassificationTask(Task):
    """A task with one label per example and one feature per example (relation, sentence, multiple choice).

    It writes `score_labels` instead of `evaluate` (this class's `evaluate` turns the outputs into one predicted
    label per example, then adds the confusion matrix and the confidences), and has `labels_of`, `build_labels`
    and `write_predictions` already."""

    abstract = True
    label_attribute: ClassVar[str] = "label"  # the example attribute holding the gold label string

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if (not cls.__dict__.get("abstract", False) and cls.evaluate is ClassificationTask.evaluate
                and cls.score_labels is ClassificationTask.score_labels):
            raise TypeError(f"task class {cls.__module__}.{cls.__name__} must define score_labels() (or evaluate()) "
                            "(see bert_ft.task.ClassificationTask)")

    # ------------------------------------------------------------------------------ must write
    def score_labels(self, gold: list[str], predicted: list[str], labels: list[str], source: str,
                     features: Features) -> tuple[dict[str, float], str]:
        """(metrics, report text) of the `predicted` labels against the `gold` ones, one of each per example in
        example order; `labels` is the model's label list, `source` the scored file, `features` the split's
        features (their `meta`, e.g. how long inputs were cut). `evaluate` does the rest."""
        raise NotImplementedError

    def evaluate(self, examples: list[Any], features: Features, outputs: list[dict], labels: list[str],
                 source: str) -> Evaluation:
        """One predicted and one gold label per example, scored by the task's `score_labels`, with the confusion
        matrix (rows gold) for the plot and the confidences for calibration."""
        predicted = self.predicted_labels(examples, features, outputs, labels)
        gold = [getattr(example, self.label_attribute) for example in examples]
        metrics, report = self.score_labels(gold, predicted, labels, source, features)
        return Evaluation(metrics, report, predicted, (list(labels), confusion_matrix(gold, predicted, labels)),
                          self.confidences(examples, features, outputs, labels), self.CONFIDENCE_NOTE)

    # ---------------------------------------------------------------------------- may override

    def labels_of(self, example: Any) -> list[str]:
        return [getattr(example, self.label_attribute)]

    def build_labels(self, train_examples: list[Any], declared: list[str] | None = None) -> list[str]:
        seen = {label for example in train_examples for label in self.labels_of(example)}
        if declared is not None and seen <= set(declared):
            return list(declared)  # the dataset's own class-id order
        return self.order_labels(seen)

    def order_labels(self, labels: set[str]) -> list[str]:
        """Numeric order when every label is an integer ("2" < "10"), else alphabetical."""
        if labels and all(INTEGER.fullmatch(label) for label in labels):
            return sorted(labels, key=lambda label: (int(label), label))
        return sorted(labels)

    @staticmethod
    def per_example(examples: list[Any], features: Features, outputs: list[dict]) -> list[dict]:
        """The output of each example's (single) feature, in example order."""
        by_example: list[dict | None] = [None] * len(examples)
        for example_index, output in zip(features.example_index, outputs):
            by_example[example_index] = output
        return by_example

    def predicted_labels(self, examples, features, outputs, labels) -> list[str]:
        return [labels[int(output["pred"])] for output in self.per_example(examples, features, outputs)]

    def confidences(self, examples, features, outputs, labels) -> list[tuple[float, bool]]:
        """(probability of the predicted class, prediction == gold) per example: what calibration is judged on and
        fitted to."""
        return [(float(output["probs"][int(output["pred"])]),
                 labels[int(output["pred"])] == getattr(example, self.label_attribute))
                for example, output in zip(examples, self.per_example(examples, features, outputs))]

    CONFIDENCE_NOTE: ClassVar[str] = "the predicted class's probability; correct = the gold class"

    def write_predictions(self, path: str, examples: list[Any], predictions: list[str]) -> None:
        typed = label_typer(sorted({getattr(example, self.label_attribute) for example in examples}
                                   | set(predictions)))
        atomic_write_lines(path, [json.dumps({"id": example.id, "gold": typed(getattr(example, self.label_attribute)),
                                              "pred": typed(prediction)}, ensure_ascii=False)
                                  for example, prediction in zip(examples, predictions)])

    def probabilities(self, output: dict, labels: list[str]) -> dict[str, float]:
        return {label: round(float(value), 6) for label, value in zip(labels, output["probs"])}


_INTEGER = re.compile(r"^-?(0|[1-9][0-9]*)$")


def label_typer(labels: Sequence[str]):
    """label -> what outputs show: integers where every label is one written as such ("1".."5" star ratings, read
    as text from a CSV, come back as 1..5), else the label string unchanged. Labels are strings inside bert-ft."""
    if labels and all(isinstance(label, str) and _INTEGER.match(label) for label in labels):
        return int
    return lambda label: label


def sample_path(module_file: str, name: str) -> str:
    """A shipped sample next to a task module: samples/NAME."""
    return os.path.join(os.path.dirname(os.path.abspath(module_file)), "samples", name)


REQUIRED_ATTRIBUTES = ("name", "description", "metric", "predictions_file", "head_type")
REQUIRED_METHODS = ("labels_of", "build_labels", "encode", "evaluate", "write_predictions", "input_examples",
                    "results")
