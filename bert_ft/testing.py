"""A test harness for task plugins, bert-ft's own and yours (in the spirit of AllenNLP's
`ensure_model_can_train_save_and_load`):

    from bert_ft.testing import check_task

    def test_my_task(tmp_path):
        check_task(MyTask(), "tests/data/my_train.jsonl", str(tmp_path), inputs=["raw input", ...])

On a tiny randomly initialised BERT (`save_tiny_bert`: 2 layers, hidden 32, the MiniLM tokenizer; or the encoder
folder you give), `check_task`
  1. trains a few epochs on the file through the real loop (`bert_ft.finetune`), scoring validation and test on
     it too, and checks that the training loss is finite and lower after training than before (the same examples,
     dropout off);
  2. reloads the saved model folder, saves it again, reloads that: the decoded outputs are equal;
  3. predicts on raw `inputs` (the predict command's path): one JSON-ready result per input;
  4. for a packable task, checks that packed rows give the same loss and outputs as padded ones.
It raises AssertionError naming the step and what differed, and returns the numbers it checked. A few seconds
per task on a CPU.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer, BertConfig, BertModel

from .api import finetune
from .config import OFFLINE_DEFAULT_MODEL, TrainConfig
from .data import Collator
from .encoder import resolve_model_path
from .inference import eval_loader
from .model_folder import load_model, save_model
from .prediction import predict_examples
from .task import Features, Task
from .training_setup import packing_is_exact


def save_tiny_bert(folder: str, max_position_embeddings: int = 512, seed: int = 0) -> str:
    """Write a randomly initialised 2-layer BERT (hidden 32, 2 heads) with the offline default's (MiniLM's)
    tokenizer to `folder`, a plain transformers folder: trains in seconds. Returns `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(OFFLINE_DEFAULT_MODEL))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_task(task: Task, train_file: str, work_dir: str, inputs: Sequence[Any] | None = None,
               model_dir: str | None = None, epochs: int = 8, learning_rate: float = 5e-3, batch_size: int = 4,
               max_seq_length: int = 64, max_train_samples: int | None = 8, **flags: Any) -> dict:
    """Train, save, reload, predict and compare packed with padded rows for `task` (see the module docstring).

    `train_file`: a labelled file the task reads (also scored as validation and test); `work_dir`: an empty
    folder for the run and the copies; `inputs`: raw predict inputs (strings or dicts, as `predict` takes them);
    `model_dir`: the encoder (default: a tiny random BERT written under `work_dir`); `flags`: more TrainConfig
    fields. Returns {"metrics", "loss_before", "loss_after", "run_dir", "predictions", "packing_exact"}."""
    model_dir = model_dir or save_tiny_bert(os.path.join(work_dir, "tiny-bert"))
    run_dir = os.path.join(work_dir, "run")
    metrics = finetune(task, TrainConfig(
        model_name_or_path=model_dir, train_file=train_file, validation_file=train_file, test_file=train_file,
        output_dir=run_dir, num_train_epochs=epochs, learning_rate=learning_rate, head_learning_rate=None,
        per_device_train_batch_size=batch_size, max_seq_length=max_seq_length, max_train_samples=max_train_samples,
        max_eval_samples=max_train_samples, mixed_precision="no", report_to="none", **flags))

    # 1. The loss: finite, and lower on the training examples after training than before (dropout off).
    folder = os.path.join(run_dir, "model")
    model, tokenizer, meta = load_model(folder, type(task))
    examples = task.read(train_file)
    examples = examples[:max_train_samples] if max_train_samples else examples
    features = task.encode(examples, tokenizer, max_seq_length, model.labels)
    set_seed(TrainConfig(**flags).seed)  # the run's seed: the head starts from the weights training started from
    untrained = task.build_model(model_dir, model.labels, tokenizer, False).eval()
    loss_before, loss_after = _mean_loss(untrained, task, tokenizer, features), _mean_loss(model, task, tokenizer,
                                                                                          features)
    _require(math.isfinite(loss_after) and math.isfinite(loss_before),
             f"train: the loss is not finite (before {loss_before}, after {loss_after})")
    _require(loss_after < loss_before, f"train: the loss did not fall ({loss_before:.4f} before training, "
                                       f"{loss_after:.4f} after {epochs} epochs at learning rate {learning_rate})")

    # 2. Save and reload: the same outputs from the run's folder, from a second save of it, and from that reload.
    again = os.path.join(work_dir, "saved-again")
    save_model(model, tokenizer, again, task.name, {key: value for key, value in meta.items()
                                                    if key in ("max_seq_length", "task_options", "task_module")})
    reloaded, _, _ = load_model(again, type(task))
    first, second = _decoded(model, task, tokenizer, features), _decoded(reloaded, task, tokenizer, features)
    for key in first:
        _require(torch.equal(first[key], second[key]), f"save/reload: output {key!r} differs after a save and reload")

    # 3. Predict on raw inputs, as `run_task.py predict` does.
    predictions = None
    if inputs is not None:
        predictions = predict_examples(task, model, tokenizer, list(inputs), max_seq_length, batch_size)
        _require(len(predictions) == len(inputs), f"predict: {len(predictions)} results for {len(inputs)} inputs")
        for result in predictions:
            _require(isinstance(result, dict), f"predict: a result is a {type(result).__name__}, not a dict")
            json.dumps(result)  # JSON-ready, as the predict command writes it

    # 4. Packing: several examples per row give what one example per row gives.
    packing_exact = None
    if task.packable:
        packing_exact = packing_is_exact(model, features, task.pad_values(tokenizer))
        _require(packing_exact, "packing: packed rows do not reproduce padded rows' loss and outputs")
    return {"metrics": metrics, "loss_before": loss_before, "loss_after": loss_after, "run_dir": run_dir,
            "predictions": predictions, "packing_exact": packing_exact}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"check_task: {message}")


def _batches(task: Task, tokenizer: Any, features: Features, batch_size: int = 16):
    """Padded, length-sorted batches of `features` without their feature_index."""
    for batch in eval_loader(features, Collator(task.pad_values(tokenizer)), batch_size):
        batch.pop("feature_index")
        yield batch


def _mean_loss(model: torch.nn.Module, task: Task, tokenizer: Any, features: Features) -> float:
    """The training loss over `features` in eval mode (no dropout), weighted by batch size."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(task, tokenizer, features):
            size = batch["example_length"].numel()
            total += float(model(**batch)["loss"]) * size
            count += size
    return total / max(count, 1)


def _decoded(model: torch.nn.Module, task: Task, tokenizer: Any, features: Features) -> dict[str, torch.Tensor]:
    """model(**batch, decode=True) of the first batch of `features` (labels left out)."""
    batch = next(_batches(task, tokenizer, features))
    batch.pop("labels", None)
    with torch.no_grad():
        return model.eval()(**batch, decode=True)
