"""--torch_compile: the encoder layers compiled by torch.compile (inductor) for the training step; evaluation and
predict run eager.

What is compiled, and why the layers rather than the whole step: each encoder layer (attention, bias, GELU,
residual, LayerNorm, dropout) is where a step's time goes and where inductor fuses the small elementwise kernels
around the matrix products. The layers of a stack share one code path, so one compiled graph (forward and
backward) serves all of them: the compile cost is one layer's, not the model's. Outside the layers the step has
graph breaks a whole-step compile would pay for with more graphs and recompiles: the heads gather examples at
data-dependent positions (`bert_ft.heads.example_tokens` reads the longest example with `.item()`), the CRF
runs a Python loop over words, bulk dropout draws its masks with numpy (`bert_ft.cpu`). Those parts run eager as
they always did; FGM/PGD perturb the word embeddings, which sit before the layers, so the compiled layers serve
their second forward as the first (parameters are graph inputs, not constants: changing them recompiles nothing).

Shape churn: a packed batch is (rows, width) with both varying per batch. The layers are compiled with dynamic
shapes (`dynamic=True`), so rows and width are symbols of one graph rather than constants of one graph per
shape; no row-width bucketing is needed (buckets would add padding compute to every step).
A few more graphs can still appear (a batch of a single row is specialised, a frozen layer traces without
gradients, --unfreeze_at_epoch changes which weights need them): the graphs are counted, each epoch's log line
says how many and what the steps cost, and past `MAX_GRAPHS` the layers go back to eager with one line.

Refused, each with one line naming why (training goes on eager): several processes (DDP's gradient hooks under
compiled layers are untested here), an encoder without a stack of per-depth layers (ALBERT runs one shared
layer group), a CPU without a C++ compiler. A compile that fails anyway goes back to eager with one line.
Checked to train as eager (tiny random models): BERT, RoBERTa, XLM-R, DeBERTa-v3, ELECTRA, DistilBERT, ModernBERT
(two graphs: its first layer has no attention LayerNorm).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .families import encoder_layers

# More compiled graphs than this and the layers run eager again: with dynamic shapes one graph is the norm, a few
# more are legitimate (see the module docstring); many more means shapes or guards churn, and each graph costs
# seconds to tens of seconds of compiling. Below torch._dynamo.config.recompile_limit (8 per code object), so
# dynamo's own long warning never replaces this module's one line.
MAX_GRAPHS = 6


def _graph_count() -> int:
    """Graphs dynamo has handed to a backend in this process so far (every compile and recompile adds one)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@dataclass
class CompiledLayers:
    """The compiled encoder layers of one training run, their graph count and step times."""

    layers: list[nn.Module]
    log: Callable[[str], None]
    graphs_before: int = field(default_factory=lambda: _graph_count())  # the process's count at the start
    breaks_before: int = field(default_factory=lambda: _graph_breaks())
    graphs: int = 0  # graphs compiled for this run so far
    compiling_steps: int = 0  # steps during which at least one graph was compiled
    compiling_seconds: float = 0.0  # their wall time (compiling and computing)
    steady_steps: int = 0  # steps that compiled nothing
    steady_seconds: float = 0.0
    eager_since: str | None = None  # why the layers run eager again (None: compiled)

    def after_step(self, seconds: float, step: int) -> None:
        """Count the graphs a training step compiled and time the step; past MAX_GRAPHS go back to eager."""
        if self.eager_since is not None:
            return
        graphs = _graph_count() - self.graphs_before
        if graphs > self.graphs:
            self.compiling_steps += 1
            self.compiling_seconds += seconds
        else:
            self.steady_steps += 1
            self.steady_seconds += seconds
        self.graphs = graphs
        if graphs > MAX_GRAPHS:
            breaks = _graph_breaks() - self.breaks_before
            self.back_to_eager(f"{graphs} graphs compiled by step {step}, over the cap of {MAX_GRAPHS} (input shapes "
                               f"or guards keep changing{f'; {breaks} graph breaks' if breaks else ''})")

    def back_to_eager(self, why: str) -> None:
        if self.eager_since is not None:
            return
        for layer in self.layers:
            layer._compiled_call_impl = None
        self.eager_since = why
        self.log(f"torch.compile: the encoder layers run eager from here on: {why}")

    def describe(self) -> str:
        """One line for the log at the end of an epoch."""
        if self.graphs:
            compiled = (f"{self.graphs} graph(s) compiled (cap {MAX_GRAPHS}) during {self.compiling_steps} step(s) "
                        f"that took {self.compiling_seconds:.1f} s in all")
        else:  # an earlier run of this process (an --hp_search trial) compiled the same layers
            compiled = "no graph compiled (this process had compiled the same layers before)"
        steady = (f"; {'the other' if self.compiling_steps else 'the'} {self.steady_steps} steps took "
                  f"{1000 * self.steady_seconds / self.steady_steps:.1f} ms each" if self.steady_steps else "")
        breaks = _graph_breaks() - self.breaks_before
        return (f"torch.compile: {compiled}{steady}{f'; {breaks} graph breaks' if breaks else ''}"
                f"{'; eager now: ' + self.eager_since if self.eager_since else ''}")

    def metrics(self) -> dict[str, Any]:
        """The figures metrics.json keeps (compile time is inside train_runtime, as any step's time is)."""
        return {"torch_compile": "on" if self.eager_since is None else f"eager again: {self.eager_since}",
                "compiled_graphs": self.graphs, "compiling_steps_seconds": round(self.compiling_seconds, 3),
                "steady_step_ms": round(1000 * self.steady_seconds / max(self.steady_steps, 1), 2)}


class _TrainingOnly:
    """A compiled layer's call: compiled in training with gradients, its plain call otherwise (evaluation, predict
    and any no_grad forward stay eager and cost no graph). A compile that fails (inductor's C++ build, a construct
    dynamo cannot trace) sends every layer back to eager with one line, and the step goes on eager."""

    def __init__(self, layer: nn.Module, compiled: Callable, layers: CompiledLayers) -> None:
        self.layer, self.compiled, self.layers = layer, compiled, layers

    def __call__(self, *args, **kwargs):
        if self.layer.training and torch.is_grad_enabled():
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self.layers.back_to_eager(f"compiling failed ({type(error).__name__}: {first_line[:200]})")
        return self.layer._call_impl(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied model (a merged LoRA model for saving) runs eager, never through this layer


def why_not_compiled(network: nn.Module, num_processes: int, device: torch.device | str = "cpu") -> str | None:
    """Why --torch_compile cannot apply to this run (one line naming the feature), or None."""
    if num_processes > 1:
        return (f"not with {num_processes} processes (DDP's gradient hooks under compiled layers are untested in "
                "bert-ft); run one process to compile")
    encoder = network.encoder_model() if hasattr(network, "encoder_model") else getattr(network, "base_model",
                                                                                        network)
    family = getattr(getattr(encoder, "config", None), "model_type", "this encoder")
    if encoder_layers(encoder) is None:
        return (f"the {family} encoder has no stack of per-depth layers to compile: ALBERT's layers are one shared "
                "group run num_hidden_layers times")
    if torch.device(device).type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                                     or shutil.which("clang++")):
        return "no C++ compiler found (inductor builds C++ kernels on a CPU): install g++, or set CXX"
    return None


def compile_encoder_layers(network: nn.Module, num_processes: int, log: Callable[[str], None],
                           device: torch.device | str = "cpu") -> tuple[CompiledLayers | None, str]:
    """Compile `network`'s encoder layers for training steps. Returns (the CompiledLayers, "on") or (None, why
    not), having logged one line either way."""
    why = why_not_compiled(network, num_processes, device)
    if why is not None:
        log(f"torch.compile: off, {why}")
        return None, f"off ({why})"
    encoder = network.encoder_model() if hasattr(network, "encoder_model") else network.base_model
    prefix, _ = encoder_layers(encoder)
    stack = encoder.get_submodule(prefix) if prefix else encoder
    # A layer whose forward is replaced on the instance (a sentence classifier's [CLS]-only top layer,
    # bert_ft.heads.read_first_token_only) gathers examples at data-dependent positions: it stays eager.
    layers = [layer for layer in stack if "forward" not in layer.__dict__]
    compiled = CompiledLayers(layers, log)
    for layer in layers:
        # torch.nn.Module.compile's own mechanism (Module.__call__ runs _compiled_call_impl when set), with the
        # training-only switch in front; the "inductor" name (not a wrapper) lets every layer, and every run of
        # this process (--hp_search trials), share the same compiled graphs.
        layer._compiled_call_impl = _TrainingOnly(layer, torch.compile(layer._call_impl, backend="inductor",
                                                                       dynamic=True), compiled)
    eager = len(stack) - len(layers)
    kept = "; the [CLS]-only top layer stays eager" if eager else ""
    log(f"torch.compile: {len(layers)} encoder layer(s) compiled for training steps (inductor, dynamic rows and "
        f"widths; the first step compiles, tens of seconds on 2 cores){kept}; evaluation runs eager")
    return compiled, "on"


def timed_step(compiled: CompiledLayers | None, step_number: int, step: Callable, *args: Any) -> Any:
    """`step(*args)`, one training step; with compiled layers, count the graphs it compiled and time it."""
    if compiled is None:
        return step(*args)
    start = time.perf_counter()
    result = step(*args)
    compiled.after_step(time.perf_counter() - start, step_number)
    return result
