"""An export folder's model at run time: `OnnxModel`, an onnxruntime session that computes the head's `scores`,
decoded by the task head's own `decode_scores` (the CRF's constrained Viterbi and marginals, softmax, the
temperature).

`OnnxModel` is called like a head (`model(**batch, decode=True)`), so `bert_ft.prediction.predict_examples` and
`bert_ft.inference.infer` run an export folder by the same code as a PyTorch folder. Opening a folder
(`bert_ft.model_folder.load_exported`) builds it; writing one is `bert_ft.export`'s job. onnxruntime is imported
only when a session starts (an optional extra; see bert_ft.lazy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UsageError

GRAPH_FILE = "model.onnx"
OUTPUT_NAME = "scores"


class EncoderStandIn(nn.Module):
    """Where a head keeps its encoder, in an export folder's model: the config only (the graph has the weights)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, *args, **kwargs):
        raise RuntimeError("this head has no encoder weights (an export folder): the ONNX graph computes its scores")


class OnnxModel(nn.Module):
    """An export folder's model: the ONNX session computes `scores`, the task head's own `decode_scores` decodes.

    It is called like a head (`model(**batch)` -> {"logits"}, `model(**batch, decode=True)` -> decoded outputs),
    and has the head's `labels` and `temperature`."""

    def __init__(self, session: Any, head: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.session, self.head, self.input_names = session, head, list(input_names)
        self.labels = head.labels

    @property
    def temperature(self) -> float:
        return self.head.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.head.temperature = value

    def scores(self, batch: dict) -> torch.Tensor:
        if "position_ids" in batch:
            raise ValueError("an ONNX export runs padded batches (one example per row), not packed ones")
        feeds = {name: batch[name].detach().cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])

    def decode_scores(self, scores: torch.Tensor, batch: dict, temperature: float | None = None) -> dict:
        return self.head.decode_scores(scores, batch, temperature)

    def calibration_nll(self, scores: torch.Tensor, batch: dict, temperature: float):
        return self.head.calibration_nll(scores, batch, temperature)

    def prediction_scores(self, scores: torch.Tensor, batch: dict, pred: torch.Tensor) -> torch.Tensor:
        return self.head.prediction_scores(scores, batch, pred)

    def forward(self, labels: torch.Tensor | None = None, decode: bool = False, **batch: torch.Tensor) -> dict:
        scores = self.scores(batch)
        return self.decode_scores(scores, batch) if decode else {"logits": scores}



def session(path: str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with all graph optimisations and `threads` intra-op threads (default: torch's)."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("running an ONNX export needs onnxruntime: pip install -e \".[export]\"") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

