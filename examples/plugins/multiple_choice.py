"""Multiple choice as a bert-ft plugin: a task defined outside bert-ft, registered with --task_module.

    python run_task.py --task_module multiple_choice multiple_choice --train_file mc_train.jsonl ...
    (with this folder on PYTHONPATH, or the module installed and declared under the "bert_ft.tasks" entry points)

Input: JSONL `{"id"?, "context": "...", "choices": ["...", ...], "label": index of the right choice}`; every record
has the same number of choices. Each example is ONE feature whose `input_ids` has shape (choices, seq): the
context paired with each choice, scored by transformers' `AutoModelForMultipleChoice`. Such inputs cannot share
a packed row, so the task says `packable = False` and the core pads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForMultipleChoice

from bert_ft.data import read_jsonl_records, read_text_lines
from bert_ft.errors import DataError
from bert_ft.heads import ClassifierHead
from bert_ft.metrics import classification_report_dict
from bert_ft.task import ClassificationTask, Features

_FIX = '{"context": "...", "choices": ["...", "..."], "label": 0} per line, the same number of choices in each'


@dataclass
class ChoiceExample:
    id: str
    context: str
    choices: list[str]
    label: str | None  # the right choice's index as a string ("0", "1", ...); None for predict inputs
    path: str
    line: int


class MultipleChoiceHead(ClassifierHead):
    """transformers' multiple-choice model: one score per (context, choice) pair; the base class turns the
    (examples, choices) scores into predictions (soft-max over the choices) and a cross-entropy loss."""

    auto_class = AutoModelForMultipleChoice

    def scores(self, batch: dict) -> torch.Tensor:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        return self.model(**inputs).logits  # (examples, choices): inputs are (examples, choices, seq)


def _example(record: dict, path: str, line: int, need_label: bool) -> ChoiceExample:
    context, choices, label = record.get("context"), record.get("choices"), record.get("label")
    if not isinstance(context, str) or not context.strip():
        raise DataError(path, line, "'context' must be a non-empty string", _FIX)
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)):
        raise DataError(path, line, "'choices' must be a list of at least two non-empty strings", _FIX)
    if need_label and not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices)):
        raise DataError(path, line, f"'label' must be the index of the right choice (0..{len(choices) - 1}), "
                        f"got {label!r}", _FIX)
    return ChoiceExample(str(record.get("id", line)), context, list(choices), str(label) if need_label else None,
                         path, line)


class MultipleChoiceTask(ClassificationTask):
    name = "multiple_choice"
    description = "multiple choice (JSONL context + choices + label index); accuracy"
    metric = "accuracy"
    predictions_file = "test_predictions.jsonl"
    head_type = MultipleChoiceHead
    packable = False

    def read(self, path: str) -> list[ChoiceExample]:
        lines = read_text_lines(path)
        examples = [_example(record, path, number, True) for number, record in read_jsonl_records(path, lines)]
        if not examples:
            raise DataError(path, None, "no examples found", _FIX)
        counts = {len(example.choices) for example in examples}
        if len(counts) > 1:
            raise DataError(path, None, f"records have different numbers of choices {sorted(counts)}", _FIX)
        return examples

    def build_labels(self, train_examples, declared=None) -> list[str]:
        return [str(index) for index in range(len(train_examples[0].choices))]

    def example_text(self, example: ChoiceExample) -> str:
        return example.context + "\t" + "\t".join(example.choices)

    def encode(self, examples, tokenizer, max_seq_length, labels) -> Features:
        inputs, lengths = [], []
        for example in examples:
            encoded = tokenizer([example.context] * len(example.choices), example.choices, truncation=True,
                                max_length=max_seq_length)
            feature = {key: encoded[key] for key in ("input_ids", "token_type_ids") if key in encoded}
            if example.label is not None:
                feature["labels"] = int(example.label)
            inputs.append(feature)  # input_ids: (choices, seq), not flattened into separate examples
            lengths.append(max(len(ids) for ids in encoded["input_ids"]))
        return Features(inputs, list(range(len(examples))), lengths)

    def score_labels(self, gold, predicted, labels, source, features) -> tuple[dict, str]:
        scores = classification_report_dict(gold, predicted, labels)
        return {"accuracy": scores["accuracy"]}, f"scored file: {source}\naccuracy {scores['accuracy']:.4f}"

    def input_examples(self, inputs: list) -> list[ChoiceExample]:
        examples = []
        for number, item in enumerate(inputs, start=1):
            if not isinstance(item, dict):
                raise DataError("input", number, "expected a JSON object with 'context' and 'choices'", _FIX)
            examples.append(_example(item, "input", number, need_label=False))
        return examples

    def results(self, examples, features, outputs, labels) -> list[dict]:
        return [{"context": example.context, "choices": example.choices, "label": int(output["pred"]),
                 "probabilities": [round(float(p), 6) for p in output["probs"]]}
                for example, output in zip(examples, self.per_example(examples, features, outputs))]
