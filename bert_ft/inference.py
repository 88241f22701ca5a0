"""The one inference loop, shared by evaluation during training and by `predict`.

It calls the model as a module (`model(**batch, decode=True)`), so whatever wraps it (Accelerate's autocast, DDP,
FSDP) runs its hooks, and gathers each feature's outputs across processes exactly once, in feature order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import Collator, FeatureDataset, LengthGroupedSampler
from .task import Features


def eval_loader(features: Features, collator: Collator, batch_size: int) -> DataLoader:
    """Longest-first sorted batches (ordering changes no score), padded or packed as the collator does."""
    sampler = LengthGroupedSampler(features.lengths, batch_size, seed=0, shuffle=False)
    return DataLoader(FeatureDataset(features.inputs), batch_sampler=sampler, collate_fn=collator)


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


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    return (value.float() if value.is_floating_point() else value).cpu().numpy()


def infer(model: torch.nn.Module, loader, count: int, accelerator: Any = None) -> list[dict]:
    """Per-feature outputs of `model(**batch, decode=True)` (numpy rows), in feature order.

    With an `accelerator` the loader is its prepared (sharded) loader and outputs are gathered with
    `gather_for_metrics`, which drops the duplicates that even sharding adds; without one, the model runs on its
    own device in this process.
    """
    device = accelerator.device if accelerator is not None else _device_of(model)
    model.eval()
    rows: list[dict | None] = [None] * count
    with torch.inference_mode():
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            indices = batch.pop("feature_index")
            _store(rows, indices, model(**batch, decode=True), accelerator)
    return _complete(rows)


def score_batches(model: torch.nn.Module, loader, accelerator: Any = None) -> list[tuple[dict, torch.Tensor]]:
    """Run the encoder once over `loader`: each (local) batch with its raw scores, `model(**batch)["logits"]` (the
    head's `scores`), on the model's device, so that `decode_batches` can decode them at any temperature."""
    device = accelerator.device if accelerator is not None else _device_of(model)
    model.eval()
    scored = []
    with torch.inference_mode():
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            inputs = {key: value for key, value in batch.items() if key not in ("feature_index", "labels")}
            scored.append((batch, model(**inputs)["logits"]))
    return scored


def decode_batches(head: torch.nn.Module, scored: list[tuple[dict, torch.Tensor]], count: int,
                   accelerator: Any = None, temperature: float | None = None) -> list[dict]:
    """Per-feature outputs of `head.decode_scores` on `score_batches`' result (what `infer` returns), with
    confidences at `temperature` (None: the head's own)."""
    rows: list[dict | None] = [None] * count
    with torch.inference_mode():
        for batch, scores in scored:
            inputs = {key: value for key, value in batch.items() if key != "feature_index"}
            _store(rows, batch["feature_index"], head.decode_scores(scores, inputs, temperature), accelerator,
                   while_iterating=False)
    return _complete(rows)


class FeatureOutputs:
    """Per-feature outputs collected batch by batch, for a loop of one's own over a loader (the export's parity
    check runs two models side by side): `add` each batch's decoded outputs with its `feature_index`, then
    `complete()` gives what `infer` returns, one dict of numpy rows per feature in feature order (an error names
    any feature that never came back). With an `accelerator`, outputs are gathered across processes as `infer`
    gathers them."""

    def __init__(self, count: int, accelerator: Any = None) -> None:
        self.rows: list[dict | None] = [None] * count
        self.accelerator = accelerator

    def add(self, indices: torch.Tensor, outputs: dict, while_iterating: bool = True) -> None:
        """`outputs` {name: tensor with one row per feature of `indices` (features,)} of one batch."""
        _store(self.rows, indices, outputs, self.accelerator, while_iterating)

    def complete(self) -> list[dict]:
        return _complete(self.rows)


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _store(rows: list, indices: torch.Tensor, outputs: dict, accelerator: Any, while_iterating: bool = True) -> None:
    """Put one batch's outputs into `rows` (numpy, by feature index), gathered across processes.

    While the prepared loader is being iterated, `gather_for_metrics` drops the duplicates that even sharding
    adds; outside that loop (decoding stored batches) a plain gather is used, and a duplicate only rewrites its
    feature's row with the same values."""
    if accelerator is not None:
        gather = accelerator.gather_for_metrics if while_iterating else accelerator.gather
        indices = gather(indices)
        gathered = {}
        for key, value in outputs.items():
            if value.dim() > 1:  # token-level outputs: ranks may have padded to different lengths
                value = accelerator.pad_across_processes(value, dim=1, pad_index=0)
            gathered[key] = gather(value)
        outputs = gathered
    arrays = {key: _to_numpy(value) for key, value in outputs.items()}
    for row, index in enumerate(indices.tolist()):
        rows[index] = {key: value[row] for key, value in arrays.items()}


def _complete(rows: list) -> list[dict]:
    missing = [index for index, row in enumerate(rows) if row is None]
    if missing:
        raise RuntimeError(f"inference lost {len(missing)} features (first: {missing[:5]}); please report this")
    return rows
